"""Merge a LoRA adapter checkpoint into its base: a full torch_dist checkpoint with W + scaling * B A in
every adapted linear (computed in fp32, cast once to the base's dtype), every other tensor copied. Offline
and streamed layer by layer like conversion; the result loads at any TP/PP and converts to HF as usual."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_soaes.adapters import adapted_rows, check_base
from megatron_soaes.adapters.lora import lora_scaling
from megatron_soaes.adapters.peft_io import AdapterError, adapted_layers, adapter_key


def merge_adapter(base_dir, adapter_dir, out_dir, overwrite: bool = False, progress: bool = True) -> Path:
    from tqdm import tqdm

    from megatron_soaes.checkpoint.dcp_io import DcpReader, DcpWriter
    from megatron_soaes.checkpoint.manifest import verify, write_manifest
    from megatron_soaes.checkpoint.meta import atomic_directory, read_meta, write_meta
    from megatron_soaes.config.job import PeftSection
    from megatron_soaes.models.config import Qwen2Config

    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    verify(base_dir), verify(adapter_dir)
    meta, ameta = read_meta(base_dir), read_meta(adapter_dir)
    if "adapter" not in ameta:
        raise AdapterError(f"{adapter_dir}: not an adapter checkpoint (its meta has no adapter section)")
    check_base(ameta, base_dir, adapter_dir)
    from megatron_soaes.checkpoint import qwen2_hf
    from megatron_soaes.checkpoint.qwen2_hf import layer_key

    cfg, peft = Qwen2Config(**meta["model"]), PeftSection(**ameta["adapter"])
    shapes = lambda c: {t.key: t.shape for t in qwen2_hf.megatron_tensors(c)}  # noqa: E731
    if shapes(Qwen2Config(**ameta["model"])) != shapes(cfg):
        raise AdapterError(f"{adapter_dir}: its model's tensor shapes differ from the base's ({base_dir})")
    base, lora = DcpReader(base_dir), DcpReader(adapter_dir)
    adapted = {}  # base weight key -> [(layer index, Adapted)]
    for i, spec in adapted_layers(cfg, peft):
        adapted.setdefault(layer_key(cfg, spec.path + ".weight", i), []).append((i, spec))
    keys = [t.key for t in qwen2_hf.megatron_tensors(cfg)]  # the model's weights (not a training save's optimizer)
    with atomic_directory(out_dir, overwrite) as tmp:
        w = DcpWriter(tmp)
        for key in keys:
            w.declare(key, base.shape(key), base.dtype(key))
        for key in tqdm(keys, desc="merging", disable=not progress, unit="tensor"):
            if key not in adapted:
                w.write(key, (0,) * len(base.shape(key)), base.read(key))
                continue
            for i, spec in adapted[key]:
                # one slice at a time: a layer of a stacked (dense) model, an expert of an MoE layer
                slices = [i] if not cfg.is_moe else range(cfg.num_experts) if spec.expert else [None]
                scaling = lora_scaling(spec.rank, spec.alpha, peft.rslora)
                for n in slices:
                    weight = base.read(key, n)
                    a = lora.read(adapter_key(cfg, spec.path, "A", i), n).float()
                    b = lora.read(adapter_key(cfg, spec.path, "B", i), n).float()
                    merged = weight.float() + scaling * (b @ a)
                    if peft.dora:  # m / ||W + s B A|| per row; rows of a part without adapter keep scale 1
                        scale = lora.read(adapter_key(cfg, spec.path, "magnitude", i), n).float() / merged.norm(dim=1)
                        rows = adapted_rows(cfg, spec)
                        merged = merged * (scale if rows is None else torch.where(rows, scale, 1.0)).unsqueeze(1)
                    merged = merged.to(weight.dtype)
                    if n is None:
                        w.write(key, (0,) * weight.dim(), merged)
                    else:
                        w.write(key, (n,) + (0,) * weight.dim(), merged.unsqueeze(0))
        w.close()
        extra = {k: v for k, v in meta.items() if k not in ("format", "architecture", "model", "iteration", "world_size")}
        write_meta(tmp, cfg, **extra, merged_adapter={"path": str(adapter_dir), "adapter": peft.model_dump()})
        if (base_dir / "tokenizer").is_dir():
            import shutil

            shutil.copytree(base_dir / "tokenizer", tmp / "tokenizer")
        write_manifest(tmp)
    return Path(out_dir)
