"""Load model weights from a torch_dist checkpoint into a megatron model at any TP/PP layout."""

from __future__ import annotations

import json
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader


def _match_checkpoint(sharded_sd: dict, ckpt_dir: Path) -> dict:
    """Ask `ckpt_dir` only for what it can have: converted checkpoints carry no ``_extra_state`` objects (TE FP8
    metadata; skipped), and a checkpoint saved with the other layer spec names an MoE layer's norm its own way
    (te_layout)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_soaes.checkpoint import te_layout

    present = set(FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata)
    kept = {k: v for k, v in sharded_sd.items() if not (isinstance(v, ShardedObject) and v.unique_key not in present)}
    return te_layout.match_checkpoint(kept, present)


ADAPTER_KEY = ".lora_"  # what names an adapter tensor (adapters.lora: lora_A / lora_B / lora_magnitude)


def adapter_entries(sharded_state_dict: dict) -> dict:
    """The adapter entries of a model's sharded state dict (what an adapter checkpoint holds)."""
    return {k: v for k, v in sharded_state_dict.items() if ADAPTER_KEY in k}


def _verify(ckpt_dir: Path) -> None:
    """Refuse weights that do not match their manifest (every rank checks a share of the files)."""
    import torch

    from megatron_soaes.checkpoint.manifest import CheckpointCorrupt, verify, verify_distributed

    if torch.distributed.is_initialized():
        error = verify_distributed(ckpt_dir)
        if error:
            raise CheckpointCorrupt(error)
    else:
        verify(ckpt_dir)


def load_model_weights(model, ckpt_dir: str | Path, prefix: str = "") -> None:
    """Fill `model` (one GPTModel chunk of this rank) from `ckpt_dir`, resharding as needed. LoRA adapters
    (adapters/) are not part of the base's weights: `load_adapter` fills them."""
    _load_into(model, ckpt_dir, prefix, adapters=False)


def load_adapter(model, ckpt_dir: str | Path) -> None:
    """Fill the LoRA adapters of `model` from an adapter checkpoint (adapters.peft_io or an adapter
    training save), resharding as needed."""
    _load_into(model, ckpt_dir, "", adapters=True)


def _load_into(model, ckpt_dir, prefix: str, adapters: bool) -> None:
    """Load the base weights (adapters=False) or the adapters (True) of `model` from a verified checkpoint."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    _verify(ckpt_dir)
    sharded = {k: v for k, v in model.sharded_state_dict(prefix=prefix).items() if (ADAPTER_KEY in k) == adapters}
    if adapters and not sharded:
        raise RuntimeError(f"{ckpt_dir}: the model has no LoRA adapters to load it into")
    sharded = _match_checkpoint(sharded, ckpt_dir)
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    # a training checkpoint also returns its non-sharded common items (scheduler, iteration, ...)
    state = {k: v for k, v in state.items() if k in sharded}
    load_complete(model, state, ckpt_dir, adapters)


def load_complete(model, state: dict, where, adapters: bool) -> None:
    """`model.load_state_dict(state)`, refusing a state that leaves any of the model's weights (adapters: its
    adapter tensors) unfilled or holds tensors the model lacks. Only TE's `_extra_state` may be absent, and an
    adapter load leaves the base's weights as they are."""
    from megatron_soaes.checkpoint.manifest import CheckpointCorrupt

    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and (ADAPTER_KEY in k) == adapters]
    if missing or (unexpected and not adapters):
        what = "adapter tensors" if adapters else "weights"
        raise CheckpointCorrupt(f"{where}: {what} do not match the model: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")


RETENTION_FILE = "retention.json"  # a run's retention-gate record; with keep_best it names the published checkpoint


def resolve_checkpoint(path) -> Path:
    """The one reading of a checkpoint path, for every command that takes one: a checkpoint dir, a
    `checkpoints/` dir or its `latest` file, or a run dir holding `checkpoints/` (or the checkpoint its
    retention gate published: `retention.json` with keep_best), or a Megatron-Bridge checkpoint root (its newest
    iteration). Anything else is returned as it is (an HF directory, say)."""
    from megatron_soaes.config import ConfigError

    p = Path(path)
    if p.name == "latest" and p.is_file():
        return p.parent / p.read_text().strip()
    gate = p / RETENTION_FILE
    if gate.exists():
        published = json.loads(gate.read_text()).get("published")
        if published:
            return resolve_checkpoint(p / published)  # absolute as written; a run directory resolves in turn
    for base in (p, p / "checkpoints"):
        if (base / "latest").exists():
            return base / (base / "latest").read_text().strip()
    from megatron_soaes.checkpoint import bridge

    if (p / bridge.TRACKER).exists():  # a Megatron-Bridge root: its newest iteration
        return bridge.iteration_dir(p)
    if not p.exists():
        raise ConfigError(f"checkpoint {p} does not exist")
    return p
