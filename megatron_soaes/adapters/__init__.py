"""Parameter-efficient fine-tuning: LoRA adapters on megatron-core's parallel linears (`lora.py`), put
on a built model by `apply_lora`, and converted to and from HF PEFT adapter directories (`peft_io.py`)."""

from __future__ import annotations

import zlib

import torch

from megatron_soaes.adapters.lora import FusedLayout, LoRALinear
from megatron_soaes.checkpoint.load import adapter_entries
from megatron_soaes.config.job import LORA_TARGETS

# HF projection -> (megatron module path inside a layer, kind); fused modules list their parts in order
LAYER_LINEARS = {
    "self_attention.linear_qkv": ("column", ("q_proj", "k_proj", "v_proj")),
    "self_attention.linear_proj": ("row", ("o_proj",)),
    "mlp.linear_fc1": ("column", ("gate_proj", "up_proj")),
    "mlp.linear_fc2": ("row", ("down_proj",)),
}
HF_TARGETS = tuple(p for _, parts in LAYER_LINEARS.values() for p in parts)
assert HF_TARGETS == LORA_TARGETS, (HF_TARGETS, LORA_TARGETS)


def _layout(path: str, cfg, tp_size: int) -> FusedLayout | None:
    """Part index of every local output row of a fused column-parallel layer on one TP rank."""
    if path == "self_attention.linear_qkv":
        d, ng = cfg.head_dim, cfg.num_key_value_heads
        hpg = cfg.num_attention_heads // ng
        group = torch.tensor([0] * (hpg * d) + [1] * d + [2] * d)
        return FusedLayout(("q_proj", "k_proj", "v_proj"), group.repeat(ng // tp_size))
    if path == "mlp.linear_fc1":
        f = cfg.intermediate_size // tp_size
        return FusedLayout(("gate_proj", "up_proj"), torch.tensor([0] * f + [1] * f))
    return None


def apply_lora(model, peft, cfg, seed: int = 0) -> list[str]:
    """Wrap the targeted linears of every local transformer layer of `model` (one GPTModel chunk) in
    `LoRALinear` and freeze everything else; returns the wrapped module names. The adapters' initial
    values depend only on `seed` and the global layer number, never on TP/PP."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_soaes.config import ConfigError

    targets = set(HF_TARGETS if "all-linear" in peft.target_modules else peft.target_modules)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for layer in model.decoder.layers:
        for path, (kind, parts) in LAYER_LINEARS.items():
            adapted = tuple(p for p in parts if p in targets)
            if not adapted:
                continue
            parent_path, name = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, name)
            want = ColumnParallelLinear if kind == "column" else RowParallelLinear
            if not isinstance(base, want):
                raise ConfigError(f"peft: LoRA needs megatron's local linears; {path} is {type(base).__name__} "
                                  "(set train.transformer_impl: local)")
            key = f"{layer.layer_number}.{path}"  # layer_number is global (1-based) under PP too
            setattr(parent, name, LoRALinear(
                base, kind, peft.rank, peft.alpha, peft.dropout, peft.rslora, adapted,
                _layout(path, cfg, tp_size) if len(parts) > 1 else None, base.sequence_parallel,
                tp_rank, tp_size, init_seed=seed * 1_000_003 + zlib.crc32(key.encode()),
                glu=path == "mlp.linear_fc1" and model.config.gated_linear_unit))
            wrapped.append(key)
    return wrapped


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of this rank's model chunk."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_identity(base_checkpoint) -> dict:
    """What names the base an adapter belongs to: its path and a checksum of its manifest (which lists
    every file's checksum), so another base -- or the same path rewritten -- is told apart."""
    from pathlib import Path

    import xxhash

    from megatron_soaes.checkpoint.manifest import MANIFEST

    manifest = Path(base_checkpoint) / MANIFEST
    return {"path": str(base_checkpoint),
            "manifest_xxh3_128": xxhash.xxh3_128(manifest.read_bytes()).hexdigest() if manifest.exists() else None}


def check_base(adapter_meta: dict, base_checkpoint, where) -> None:
    """Refuse an adapter trained on another base (one line naming both)."""
    from megatron_soaes.config import ConfigError

    want = adapter_meta.get("base") or {}
    have = base_identity(base_checkpoint)
    if want.get("manifest_xxh3_128") and want["manifest_xxh3_128"] != have["manifest_xxh3_128"]:
        raise ConfigError(f"{where}: this adapter was trained on the base {want.get('path')}, not on "
                          f"{base_checkpoint} (their manifests differ)")


def save_adapter(model, out_dir, cfg, peft, base: dict | None = None) -> None:
    """Collective: write this model's adapters (every rank's shards) as an adapter checkpoint."""
    import shutil
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from megatron_soaes.checkpoint.manifest import write_manifest
    from megatron_soaes.checkpoint.meta import write_meta

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    rank = torch.distributed.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(adapter_entries(model.sharded_state_dict()), str(tmp))
    torch.distributed.barrier()
    if rank == 0:
        write_meta(tmp, cfg, adapter=peft.model_dump(), base=base)
        write_manifest(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    torch.distributed.barrier()
