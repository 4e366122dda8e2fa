"""Parameter-efficient fine-tuning: LoRA adapters on megatron-core's parallel linears (`lora.py`), put
on a built model by `apply_lora`, and converted to and from HF PEFT adapter directories (`peft_io.py`)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

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
# An MoE layer's experts (checkpoint name; megatron's module is mlp.experts.local_experts.{j}.linear_fc*).
# transformers 5 fuses each layer's experts into two tensors, gate_up_proj [E, 2I, H] and down_proj [E, H, I],
# and peft adapts those (`target_parameters`): what the targets gate_proj + up_proj mean there is one adapter
# of rank 2r and alpha 2*alpha over [gate; up] per expert (peft's conversion of the two), down_proj one of rank
# r. In an MoE model the MLP targets mean the experts (a Qwen3-MoE's dense layers, which no release has,
# keep their MLP frozen, as peft leaves them).
EXPERTS = "mlp.experts.experts."
EXPERT_LINEARS = {EXPERTS + "linear_fc1": ("column", ("gate_proj", "up_proj"), "gate_up_proj"),
                  EXPERTS + "linear_fc2": ("row", ("down_proj",), "down_proj")}
EXPERT_PARTS = {fused: parts for _, parts, fused in EXPERT_LINEARS.values()}  # HF fused tensor -> its projections


@dataclass(frozen=True)
class Adapted:
    """One adapted linear of a layer: where it is, which HF projections it holds and which are adapted."""

    path: str  # its checkpoint name inside the layer (the weight is path + ".weight")
    kind: str  # column | row
    parts: tuple[str, ...]  # the HF projections the linear holds
    adapted: tuple[str, ...]  # those with an adapter (experts: the one fused tensor, all parts under one adapter)
    rank: int
    alpha: float
    expert: bool = False  # a leading global-expert axis in checkpoints; one adapter per expert

    def module_paths(self, num_local_experts: int) -> list[str]:
        """Where the linear is in megatron's layer module (one per local expert)."""
        if not self.expert:
            return [self.path]
        name = self.path[len(EXPERTS):]
        return [f"mlp.experts.local_experts.{j}.{name}" for j in range(num_local_experts)]


def _targets(peft) -> set[str]:
    return set(HF_TARGETS if "all-linear" in peft.target_modules else peft.target_modules)


def layer_adapters(cfg, peft, sparse: bool) -> list[Adapted]:
    """The adapted linears of a dense (`sparse` False) or MoE layer of the model `cfg` under `peft`."""
    from megatron_soaes.config import ConfigError

    targets, out = _targets(peft), []
    for path, (kind, parts) in LAYER_LINEARS.items():
        adapted = tuple(p for p in parts if p in targets)
        if adapted and not (cfg.is_moe and path.startswith("mlp.")):
            out.append(Adapted(path, kind, parts, adapted, peft.rank, peft.alpha))
    if sparse:
        for path, (kind, parts, fused) in EXPERT_LINEARS.items():
            hit = tuple(p for p in parts if p in targets)
            if hit and hit != parts:
                raise ConfigError(f"peft: target_modules has {hit[0]} without {', '.join(set(parts) - set(hit))}: "
                                  "an MoE model's experts fuse them (transformers 5), so both are adapted or neither")
            if hit and peft.dora:
                raise ConfigError("peft.dora: DoRA on MoE experts is not supported (nor by peft's expert adapters); "
                                  "target the attention projections only, or turn dora off")
            if hit:
                n = len(parts)
                out.append(Adapted(path, kind, parts, (fused,), n * peft.rank, n * peft.alpha, expert=True))
    return out


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


def adapted_rows(cfg, spec: Adapted) -> torch.Tensor | None:
    """Which output rows of a fused dense linear belong to an adapted part (None: all of them)."""
    layout = _layout(spec.path, cfg, 1) if len(spec.parts) > 1 and not spec.expert else None
    if layout is None:
        return None
    return torch.isin(layout.row_part, torch.tensor([layout.parts.index(p) for p in spec.adapted]))


def init_dora(model) -> int:
    """Set every DoRA magnitude from the loaded base (a fresh adapter); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.dora]
    for m in layers:
        m.init_magnitude()
    return len(layers)


def apply_lora(model, peft, cfg, seed: int = 0) -> list[str]:
    """Wrap the targeted linears of every local transformer layer of `model` (one GPTModel chunk) in
    `LoRALinear` and freeze everything else; returns the wrapped module names. The adapters' initial
    values depend only on `seed`, the global layer number and the global expert index, never on TP/PP/EP."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_soaes.config import ConfigError

    for p in model.parameters():
        p.requires_grad_(False)
    sparse = cfg.moe_layers() if cfg.is_moe else None
    local_experts = cfg.num_experts // ps.get_expert_model_parallel_world_size() if cfg.is_moe else 0
    first_expert = ps.get_expert_model_parallel_rank() * local_experts
    wrapped = []
    for layer in model.decoder.layers:
        i = layer.layer_number - 1  # global (layer_number is 1-based) under PP too
        for spec in layer_adapters(cfg, peft, bool(sparse and sparse[i])):
            for j, module_path in enumerate(spec.module_paths(local_experts)):
                parent_path, name = module_path.rsplit(".", 1)
                try:
                    parent = layer.get_submodule(parent_path)
                    base, what = getattr(parent, name), "a"
                except AttributeError:  # TE's grouped experts hold no per-expert modules
                    base, what = layer.get_submodule(spec.path.rsplit(".", 2)[0]), "inside a"
                want = ColumnParallelLinear if spec.kind == "column" else RowParallelLinear
                if not isinstance(base, want):
                    raise ConfigError(f"peft: LoRA needs megatron's local linears; {module_path} is {what} "
                                      f"{type(base).__name__} (set train.transformer_impl: local)")
                key = f"{layer.layer_number}.{spec.path}" + (f".{first_expert + j}" if spec.expert else "")
                tp_size = torch.distributed.get_world_size(base.tp_group)
                fused = len(spec.parts) > 1 and not spec.expert
                setattr(parent, name, LoRALinear(
                    base, spec.kind, spec.rank, spec.alpha, peft.dropout, peft.rslora, spec.adapted,
                    _layout(spec.path, cfg, tp_size) if fused else None,
                    init_seed=seed * 1_000_003 + zlib.crc32(key.encode()),
                    glu=spec.path.endswith("linear_fc1") and model.config.gated_linear_unit, dora=peft.dora))
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


def check_structure(adapter_meta: dict, peft, where) -> None:
    """Refuse an adapter checkpoint whose tensors the job's peft section would not build (one line)."""
    from megatron_soaes.config import ConfigError
    from megatron_soaes.config.job import PeftSection

    have = PeftSection(**adapter_meta["adapter"])
    for name, a, b in (("rank", have.rank, peft.rank), ("dora", have.dora, peft.dora),
                       ("target_modules", sorted(_targets(have)), sorted(_targets(peft)))):
        if a != b:
            raise ConfigError(f"{where}: this adapter has peft.{name}={a}, the job's peft section says {b}")


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
