"""`soaes demo`, the one-minute smoke run: a tiny random Qwen2 through HF -> Megatron -> HF,
bit-exact round trip and logit parity at the chosen TP/PP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def run_demo(out: str, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> int:
    from safetensors.torch import load_file

    from megatron_soaes.checkpoint.compare import compare_logits
    from megatron_soaes.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from megatron_soaes.models.random_init import make_random_hf_model
    from megatron_soaes.runtime.launch import ensure_world_size

    ensure_world_size(tensor_parallel * pipeline_parallel)
    from megatron_soaes.runtime.distributed import world_info

    rank = world_info()[0]
    out = Path(out)
    hf_dir, mc_dir, back_dir = out / "hf", out / "megatron", out / "hf_roundtrip"
    report = {}
    if rank == 0:
        t0 = time.time()
        if not hf_dir.exists():
            make_random_hf_model(hf_dir, "tiny")
        hf_to_megatron(hf_dir, mc_dir, tensor_parallel, pipeline_parallel, overwrite=True)
        megatron_to_hf(mc_dir, back_dir, overwrite=True)
        a, b = load_file(hf_dir / "model.safetensors"), load_file(back_dir / "model.safetensors")
        report["roundtrip_bit_exact"] = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        report["roundtrip_tensors"] = len(a)
        report["convert_seconds"] = round(time.time() - t0, 2)
    stats = compare_logits(hf_dir, tensor_parallel, pipeline_parallel, mcore_dir=mc_dir)
    if rank == 0:
        report["logits"] = stats
        print(json.dumps(report, indent=2))
        (out / "report.json").write_text(json.dumps(report, indent=2))
        ok = report["roundtrip_bit_exact"] and stats["max_abs_diff"] < 1e-5 and stats["top1_agreement"] == 1.0
        print("demo:", "OK" if ok else "FAILED")
        return 0 if ok else 1
    return 0
