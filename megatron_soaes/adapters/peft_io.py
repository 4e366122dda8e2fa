"""LoRA adapters between HF PEFT directories (``adapter_config.json`` + ``adapter_model.safetensors``, HF
module names) and megatron-soaes adapter checkpoints (torch_dist, adapter tensors only, stacked per layer
like the base's, resharded by megatron at load).

The fused layers hold one adapter per HF projection: q/k/v (and gate/up) each keep their own r rows of A,
and B's rows are megatron's -- grouped per query group for QKV ``[q_g | k_g | v_g]``, ``[gate; up]`` for
fc1 -- with each part's rows only in its own r columns. Both directions are exact (a copy of every value).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from megatron_soaes.adapters import EXPERT_PARTS, HF_TARGETS
from megatron_soaes.checkpoint.qwen2_hf import _group_qkv, _ungroup_qkv

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HF_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
             "down_proj": "mlp.down_proj"}
# peft's `target_parameters` for transformers 5's fused experts: both adapted nest two wrappers on the experts
# module, gate_up_proj inside (`experts.base_layer.lora_*`), down_proj outside (`experts.lora_*`); one alone
# is `experts.lora_*`. gate_up's rank and alpha (2r, 2*alpha: adapters.EXPERT_PARTS) come by a pattern, as
# peft's conversion of gate_proj + up_proj writes them.
EXPERT_PARAMS = {"gate_up_proj": "mlp.experts.gate_up_proj", "down_proj": "mlp.experts.down_proj"}
GATE_UP_PATTERN = r".*\.gate_up_proj"


class AdapterError(ValueError):
    """An adapter that cannot be converted or does not belong to the base; the message names the file."""


def adapter_key(cfg, path: str, ab: str, i: int) -> str:
    """The checkpoint key of layer i's adapter factor `ab` (A or B) of the linear `path`: stacked over layers
    (dense models) or the layer's own (MoE models), like the base's weights."""
    from megatron_soaes.checkpoint.qwen2_hf import layer_key

    return layer_key(cfg, f"{path}.lora_{ab}", i)


def adapted_layers(cfg, peft):
    """(layer index, Adapted) for every adapted linear of the model."""
    from megatron_soaes.adapters import layer_adapters

    sparse = cfg.moe_layers() if cfg.is_moe else [False] * cfg.num_layers
    return [(i, spec) for i in range(cfg.num_layers) for spec in layer_adapters(cfg, peft, sparse[i])]


def adapter_section(adapter_dir):
    """The job config's `peft` section for an HF PEFT LoRA adapter directory (refusing what we do not run)."""
    from megatron_soaes.config.job import PeftSection

    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    c = json.loads(path.read_text())
    params = [str(t).removeprefix("mlp.experts.") for t in c.get("target_parameters") or []]
    r, alpha, n = c["r"], c["lora_alpha"], len(EXPERT_PARTS["gate_up_proj"])
    fused_pattern = ({GATE_UP_PATTERN: n * r}, {GATE_UP_PATTERN: n * alpha}) if "gate_up_proj" in params else ({}, {})
    unsupported = {"peft_type": c.get("peft_type") not in (None, "LORA"), "bias": c.get("bias", "none") != "none",
                   "use_dora": bool(c.get("use_dora")) and bool(params), "fan_in_fan_out": bool(c.get("fan_in_fan_out")),
                   "layers_to_transform": c.get("layers_to_transform") is not None,
                   "rank_pattern": (c.get("rank_pattern") or {}) != fused_pattern[0],
                   "alpha_pattern": (c.get("alpha_pattern") or {}) != fused_pattern[1],
                   "modules_to_save": bool(c.get("modules_to_save")),
                   "target_parameters": any(t not in EXPERT_PARAMS for t in params)}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        hint = {"rank_pattern": f" (the experts' gate_up_proj must have rank 2r and alpha 2*alpha by a pattern, "
                                f"{fused_pattern[0]}, as peft writes for target_modules gate_proj + up_proj)"
                                if fused_pattern[0] else " (plain LoRA, one rank)",
                "alpha_pattern": " (only the experts' gate_up_proj at 2*alpha)",
                "use_dora": " on MoE experts (target_parameters; peft refuses it there too)",
                "target_parameters": " (only the experts' gate_up_proj and down_proj; the router is not adapted)"}
        raise AdapterError(f"{path}: {bad[0]}={c.get(bad[0])!r} is not supported{hint.get(bad[0], ' (plain LoRA on linear layers only)')}")
    targets = c.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if targets != ["all-linear"] and any(t not in HF_TARGETS for t in targets):
        raise AdapterError(f"{path}: target_modules {targets}: only {', '.join(HF_TARGETS)} can be adapted")
    if params and targets == ["all-linear"]:
        raise AdapterError(f"{path}: all-linear with target_parameters {params}: list the target modules")
    targets += [p for t in params for p in EXPERT_PARTS[t] if p not in targets]
    dora = bool(c.get("use_dora"))  # dropout off: a DoRA job here trains without it (config.job.PeftSection)
    return PeftSection(rank=r, alpha=alpha, dropout=0.0 if dora else c.get("lora_dropout", 0.0),
                       target_modules=targets, rslora=bool(c.get("use_rslora")), dora=dora)


def adapter_max_rank(adapter_dir) -> int:
    """The largest rank in an HF PEFT adapter (an engine's max LoRA rank): r, or 2r with adapted experts."""
    adapter_section(adapter_dir)  # refuses what we do not run
    c = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    return max([c["r"], *(c.get("rank_pattern") or {}).values()])


def _fuse(cfg, path: str, full: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every part's rows in megatron's order: grouped per query group (QKV) or [gate; up]."""
    if path == "self_attention.linear_qkv":
        return _group_qkv(cfg, full["q_proj"], full["k_proj"], full["v_proj"])
    return torch.cat([full["gate_proj"], full["up_proj"]])


def _fused_rows(cfg, path: str, blocks: dict[str, torch.Tensor], adapted, r: int) -> torch.Tensor:
    """B of a fused layer from each part's B ([rows_p, r]): megatron row order, part j in columns j*r.."""
    dtype = next(iter(blocks.values())).dtype
    full = {p: torch.zeros(n, len(adapted) * r, dtype=dtype) for p, n in _part_rows(cfg, path).items()}
    for j, p in enumerate(adapted):
        full[p][:, j * r:(j + 1) * r] = blocks[p]
    return _fuse(cfg, path, full)


def _fused_magnitude(cfg, path: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """DoRA's magnitude of a fused layer from each adapted part's; a part not adapted gets zeros (unused:
    its rows keep scale 1)."""
    dtype = next(iter(parts.values())).dtype
    return _fuse(cfg, path, {p: parts.get(p, torch.zeros(n, dtype=dtype)) for p, n in _part_rows(cfg, path).items()})


def _split_rows(cfg, path: str, b: torch.Tensor) -> dict[str, torch.Tensor]:
    if path == "self_attention.linear_qkv":
        return dict(zip(("q_proj", "k_proj", "v_proj"), _ungroup_qkv(cfg, b)))
    f = cfg.intermediate_size
    return {"gate_proj": b[:f], "up_proj": b[f:]}


def _part_rows(cfg, path: str) -> dict[str, int]:
    if path == "self_attention.linear_qkv":
        d = cfg.head_dim
        return {"q_proj": cfg.num_attention_heads * d, "k_proj": cfg.num_key_value_heads * d,
                "v_proj": cfg.num_key_value_heads * d}
    return {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}


def _expert_names(cfg, peft, i: int) -> dict[str, str]:
    """HF module names of layer i's expert adapters (fused tensor -> peft's wrapper name)."""
    from megatron_soaes.adapters import layer_adapters

    fused = [s.adapted[0] for s in layer_adapters(cfg, peft, True) if s.expert]
    m = f"base_model.model.model.layers.{i}.mlp.experts"
    return {f: m + (".base_layer" if f == "gate_up_proj" and len(fused) == 2 else "") for f in fused}


# peft's expert factors: A [E*rk, in] (expert e's rows e*rk..), B [out, rk*E] (expert e's columns e, e+E, ...);
# ours are stacked per expert: A [E, rk, in], B [E, out, rk]
def _experts_from_peft(a: torch.Tensor, b: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    return a.reshape(e, -1, a.shape[-1]).contiguous(), b.reshape(b.shape[0], -1, e).permute(2, 0, 1).contiguous()


def _experts_to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e, rk = a.shape[0], a.shape[1]
    return a.reshape(e * rk, a.shape[-1]).contiguous(), b.permute(1, 2, 0).reshape(b.shape[1], rk * e).contiguous()


def from_peft(adapter_dir, cfg, out_dir, base: dict | None = None) -> Path:
    """Write an HF PEFT LoRA adapter as a megatron-soaes adapter checkpoint (exact)."""
    from safetensors.torch import load_file

    from megatron_soaes.checkpoint.dcp_io import DcpWriter
    from megatron_soaes.checkpoint.manifest import write_manifest
    from megatron_soaes.checkpoint.meta import atomic_directory, write_meta

    peft = adapter_section(adapter_dir)
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    sd = {k.replace(".default", ""): v for k, v in load_file(str(path)).items()}
    if cfg.is_moe and any(re.search(r"\.mlp\.experts\.\d+\.", k) for k in sd):
        raise AdapterError(f"{path}: per-expert adapters (transformers 4's layout); load the adapter with peft on "
                           "transformers 5 and save it again, which writes the fused experts' layout read here")
    r, used = peft.rank, set()

    def get(name: str, ab: str) -> torch.Tensor:
        key = f"{name}.lora_magnitude_vector" if ab == "magnitude" else f"{name}.lora_{ab}.weight"
        if key not in sd:
            raise AdapterError(f"{path}: missing tensor {key}")
        used.add(key)
        return sd[key]

    layers = adapted_layers(cfg, peft)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        w = DcpWriter(tmp)
        for i, spec in layers:
            if spec.expert:
                name = _expert_names(cfg, peft, i)[spec.adapted[0]]
                a, b = _experts_from_peft(get(name, "A"), get(name, "B"), cfg.num_experts)
            else:
                hf = {p: f"base_model.model.model.layers.{i}.{HF_MODULE[p]}" for p in spec.adapted}
                a = torch.cat([get(hf[p], "A") for p in spec.adapted])
                if len(spec.parts) > 1:
                    b = _fused_rows(cfg, spec.path, {p: get(hf[p], "B") for p in spec.adapted}, spec.adapted, r)
                else:
                    b = get(hf[spec.adapted[0]], "B")
            tensors = [("A", a), ("B", b)]
            if peft.dora:
                mags = {p: get(hf[p], "magnitude") for p in spec.adapted}
                tensors.append(("magnitude", _fused_magnitude(cfg, spec.path, mags) if len(spec.parts) > 1
                                else mags[spec.adapted[0]]))
            for ab, t in tensors:
                key = adapter_key(cfg, spec.path, ab, i)
                if cfg.is_moe:
                    w.declare(key, t.shape, t.dtype)
                    w.write(key, (0,) * t.dim(), t.contiguous())
                    continue
                if i == 0:
                    w.declare(key, (cfg.num_layers, *t.shape), t.dtype)
                w.write(key, (i,) + (0,) * t.dim(), t.unsqueeze(0).contiguous())
        w.close()
        if set(sd) - used:  # e.g. an MoE model's dense-layer MLP, which peft does not adapt either
            raise AdapterError(f"{path}: tensors this model has no adapter for: {sorted(set(sd) - used)[:4]}")
        write_meta(tmp, cfg, adapter=peft.model_dump(), base=base, source=str(adapter_dir))
        write_manifest(tmp)
    return Path(out_dir)


def to_peft(adapter_ckpt, out_dir, base_model_name_or_path: str | None = None) -> Path:
    """An HF PEFT adapter directory from a megatron-soaes adapter checkpoint (exact)."""
    from safetensors.torch import save_file

    from megatron_soaes.checkpoint.dcp_io import DcpReader
    from megatron_soaes.checkpoint.manifest import verify
    from megatron_soaes.checkpoint.meta import atomic_directory, read_meta
    from megatron_soaes.config.job import PeftSection
    from megatron_soaes.models.config import Qwen2Config

    verify(adapter_ckpt)
    meta = read_meta(adapter_ckpt)
    if "adapter" not in meta:
        raise AdapterError(f"{adapter_ckpt}: not an adapter checkpoint (its meta has no adapter section)")
    cfg, peft = Qwen2Config(**meta["model"]), PeftSection(**meta["adapter"])
    reader = DcpReader(adapter_ckpt)
    r, out, modules, params, pattern = peft.rank, {}, set(), set(), None
    for i, spec in adapted_layers(cfg, peft):
        idx = None if cfg.is_moe else i
        a = reader.read(adapter_key(cfg, spec.path, "A", i), idx)
        b = reader.read(adapter_key(cfg, spec.path, "B", i), idx)
        if spec.expert:
            name = _expert_names(cfg, peft, i)[spec.adapted[0]]
            out[name + ".lora_A.weight"], out[name + ".lora_B.weight"] = _experts_to_peft(a, b)
            params.add(EXPERT_PARAMS[spec.adapted[0]])
            if spec.rank != r:  # gate_up: 2r, 2*alpha
                pattern = ({GATE_UP_PATTERN: spec.rank}, {GATE_UP_PATTERN: spec.alpha})
            continue
        split = (lambda t: _split_rows(cfg, spec.path, t)) if len(spec.parts) > 1 else (lambda t: {spec.adapted[0]: t})
        rows = split(b)
        mags = split(reader.read(adapter_key(cfg, spec.path, "magnitude", i), idx)) if peft.dora else {}
        for j, p in enumerate(spec.adapted):
            name = f"base_model.model.model.layers.{i}.{HF_MODULE[p]}"
            out[name + ".lora_A.weight"] = a[j * r:(j + 1) * r].contiguous()
            out[name + ".lora_B.weight"] = rows[p][:, j * r:(j + 1) * r].contiguous()
            if peft.dora:
                out[name + ".lora_magnitude_vector"] = mags[p].contiguous()
            modules.add(p)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": peft.alpha,
              # peft refuses dropout on expert tensors; an exported adapter is for inference, where it is off
              "lora_dropout": 0.0 if params else peft.dropout,
              "target_modules": [p for p in HF_TARGETS if p in modules], "use_rslora": peft.rslora,
              "use_dora": peft.dora, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "base_model_name_or_path": base_model_name_or_path or (meta.get("base") or {}).get("path")}
    if params:
        config["target_parameters"] = sorted(params, key=list(EXPERT_PARAMS.values()).index)
        if pattern:
            config["rank_pattern"], config["alpha_pattern"] = pattern
    with atomic_directory(out_dir, overwrite=True) as tmp:
        save_file(out, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def attach_peft_adapter(model, adapter_dir, cfg) -> None:
    """Collective: put an HF PEFT LoRA adapter on a built model whose base weights are loaded (rank 0
    converts it to an adapter checkpoint in a temporary directory the ranks share; single node)."""
    import tempfile

    from megatron_soaes.adapters import apply_lora
    from megatron_soaes.checkpoint.load import load_adapter

    tmp, where = None, [None]
    if torch.distributed.get_rank() == 0:
        tmp = tempfile.TemporaryDirectory(prefix="soaes-adapter-")
        try:
            where = [str(from_peft(adapter_dir, cfg, Path(tmp.name) / "adapter"))]
        except AdapterError as e:
            where = [e]
    torch.distributed.broadcast_object_list(where, src=0)  # the path, or rank 0's error for every rank
    if isinstance(where[0], Exception):
        raise AdapterError(str(where[0]))
    apply_lora(model, adapter_section(adapter_dir), cfg)
    load_adapter(model, where[0])
    torch.distributed.barrier()
    if tmp is not None:
        tmp.cleanup()
