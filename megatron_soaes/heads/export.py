"""The head as vLLM and SGLang load an EAGLE-3 draft: `config.json` (`LlamaForCausalLMEagle3`, one
layer, `draft_vocab_size`, `target_hidden_size`, `eagle_aux_hidden_state_layer_ids` -- the target layers
whose inputs feed `fc`, counted as vLLM does: 0 is the embedding output) and `model.safetensors` with
`midlayer.*`, `fc`, `norm`, `lm_head`, `d2t` (draft id -> target id offsets) and `t2d`. No embedding
table: both engines share the target's. Written to a temporary directory and renamed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_soaes.heads.config import HeadConfig

ARCHITECTURE = "LlamaForCausalLMEagle3"
RECORD = "soaes_draft_head"  # our own record in config.json: the exact HeadConfig, for reading it back


def is_eagle3_dir(path) -> bool:
    """Whether `path` is an EAGLE-3 head directory (its config.json names the EAGLE-3 architecture)."""
    f = Path(path) / "config.json"
    return f.is_file() and ARCHITECTURE in (json.loads(f.read_text()).get("architectures") or [])


def eagle3_config(hcfg: HeadConfig, dtype: torch.dtype) -> dict:
    lc, t = hcfg.layer_config(), hcfg.target_config
    ids = list(hcfg.feature_layers)
    cfg = {
        "architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": lc.hidden_size, "intermediate_size": lc.intermediate_size,
        "num_attention_heads": lc.num_attention_heads, "num_key_value_heads": lc.num_key_value_heads,
        "head_dim": lc.head_dim, "hidden_act": "silu", "rms_norm_eps": lc.rms_norm_eps, "rope_theta": lc.rope_theta,
        "max_position_embeddings": t.max_position_embeddings, "vocab_size": t.vocab_size,
        "draft_vocab_size": hcfg.draft_vocab_size, "target_hidden_size": t.hidden_size, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": ids,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
        RECORD: hcfg.to_dict(),
    }
    if lc.rope_scaling:
        cfg["rope_scaling"] = lc.rope_scaling
    return cfg


def export_eagle3(head_path, out, dtype: torch.dtype | None = torch.bfloat16, overwrite: bool = False) -> Path:
    """Write the head at `head_path` (a training run or checkpoint) as an EAGLE-3 directory `out`."""
    from megatron_soaes.heads.inference import load_head_weights

    hcfg, sd = load_head_weights(head_path)
    if hcfg.kind != "eagle3":
        raise ValueError(f"{head_path}: a {hcfg.kind} head, not an EAGLE-3 one; vLLM and SGLang load MTP layers only "
                         "inside their own model families' checkpoints, so it is decoded here only")
    return write_eagle3(hcfg, sd, out, dtype, overwrite)


def write_eagle3(hcfg: HeadConfig, sd: dict[str, torch.Tensor], out, dtype: torch.dtype | None = None,
                 overwrite: bool = False) -> Path:
    """An EAGLE-3 state dict (`heads.layout` names) and its config as a directory, atomically."""
    from safetensors.torch import save_file

    from megatron_soaes.checkpoint.meta import atomic_directory

    dtype = dtype or sd["fc.weight"].dtype
    tensors = {k: (v if k in ("d2t", "t2d") else v.to(dtype)).contiguous() for k, v in sd.items()}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(eagle3_config(hcfg, dtype), indent=2))
    return Path(out)


def read_eagle3(path) -> tuple[HeadConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of an EAGLE-3 directory this project wrote."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json; not an EAGLE-3 head directory")
    cfg = json.loads(cfg_file.read_text())
    if RECORD not in cfg:
        raise ValueError(f"{cfg_file}: no {RECORD} record (an EAGLE-3 head written elsewhere needs its target's config)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return HeadConfig.from_dict(cfg[RECORD]), sd
