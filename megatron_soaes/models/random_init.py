"""Randomly initialised HF checkpoints with our presets' shapes: the demo's and the pipeline's
starting point, and the tests' independent reference (transformers builds them, not us)."""

from __future__ import annotations

import torch


def make_random_hf_model(out_dir, preset_name: str = "tiny", seed: int = 0, dtype=torch.float32, **overrides):
    """Save a randomly initialised HF model (Qwen2ForCausalLM, Qwen3ForCausalLM, ...) with one of our
    presets' shapes, built by transformers from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_soaes.models.config import preset

    cfg = preset(preset_name, **overrides)
    torch.manual_seed(seed)
    hf = cfg.to_hf("float32")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    with torch.no_grad():  # HF inits biases to zero; give them values so the QKV bias path is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).save_pretrained(str(out_dir))
    return cfg
