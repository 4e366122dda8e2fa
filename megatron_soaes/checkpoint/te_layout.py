"""One checkpoint for either layer spec: the keys where Transformer Engine's layers and megatron's local layers
differ, mapped in both directions (every reader and writer of megatron checkpoints here goes through this).

megatron-core saves the two specs under almost the same keys: the local spec renames its norms onto TE's fused
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` (its ``sharded_state_dict_keys_map``), and
TE's grouped experts save SequentialMLP's keys. Two things differ (megatron-core 0.16 ``gpt_layer_specs``, TE 2.x):

- an MoE layer's pre-MLP norm: TE's spec builds a separate ``pre_mlp_layernorm`` (experts have no fused norm);
  the local spec still maps its norm onto ``mlp.linear_fc1.layer_norm_weight``;
- ``_extra_state`` objects: every TE module with weights except the embedding, output layer and router saves one
  (its FP8 scaling state; an empty byte tensor without FP8); megatron's local linears save ``None`` under the
  same keys, its norms nothing. A loader asks for the objects its modules have and fails on a missing one, so a
  checkpoint for TE layers carries one for each of those modules (`extra_state_keys`).
"""

from __future__ import annotations

import re

import torch

EXTRA_STATE = "_extra_state"
LOCAL_SPARSE_NORM = "mlp.linear_fc1.layer_norm_weight"  # an MoE layer's pre-MLP norm, local spec
TE_SPARSE_NORM = "pre_mlp_layernorm.weight"  # the same weight, TE spec
ROUTER = "mlp.router.weight"
_PER_LAYER = re.compile(r"^(decoder\.layers\.\d+\.)(.+)$")
_LAYER = re.compile(r"^(decoder\.layers\.(?:\d+\.)?)(.+)$")  # per-layer or layer-stacked
_NO_EXTRA_STATE = ("embedding.", "output_layer.")  # and the router


def alias(key: str) -> str | None:
    """The other spec's name of `key`, where the specs differ (an MoE layer's pre-MLP norm), else None."""
    m = _LAYER.match(key)
    if m is None:
        return None
    other = {LOCAL_SPARSE_NORM: TE_SPARSE_NORM, TE_SPARSE_NORM: LOCAL_SPARSE_NORM}.get(m.group(2))
    return m.group(1) + other if other else None


def te_name(key: str, keys) -> str:
    """`key` as TE's spec saves it; `keys`: all of the checkpoint's keys (an MoE layer is one with a router)."""
    m = _PER_LAYER.match(key)
    if m and m.group(2) == LOCAL_SPARSE_NORM and m.group(1) + ROUTER in keys:
        return m.group(1) + TE_SPARSE_NORM
    return key


def match_checkpoint(sharded_state_dict: dict, present) -> dict:
    """Point each requested tensor that `present` (the checkpoint's keys) lacks at its other-spec name, where the
    checkpoint has that: a TE checkpoint into local layers and the reverse."""
    for value in sharded_state_dict.values():
        key = getattr(value, "key", None)
        if key is not None and key not in present and alias(key) in present:
            value.key = alias(key)
    return sharded_state_dict


def extra_state_keys(shapes: dict) -> list[str]:
    """The ``_extra_state`` objects TE layers ask for, as megatron-core names them (ShardedObject unique keys),
    given the checkpoint's tensors (TE names) and global shapes: one per layer of a layer-stacked module, one per
    expert of an expert-stacked one, else one."""
    out = {}
    for key, shape in shapes.items():
        if key.startswith(_NO_EXTRA_STATE) or key.endswith(ROUTER):
            continue
        module = key.rsplit(".", 1)[0]  # a fused norm's weight belongs to its linear: one object for both
        stacked = key.startswith("decoder.layers.") and not _PER_LAYER.match(key)
        n = shape[0] if stacked or ".experts.experts." in key else 1
        for i in range(n):
            out[f"{module}.{EXTRA_STATE}/shard_{i}_{n}"] = None
    return list(out)


def empty_extra_state() -> torch.Tensor:
    """What a TE module without FP8 saves as its extra state (TE's own ``get_extra_state``)."""
    return torch.empty(0, dtype=torch.uint8)
