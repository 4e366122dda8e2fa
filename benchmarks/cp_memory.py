#!/usr/bin/env python
"""Activation memory per GPU against sequence length and context-parallel size, computed from the model
shapes (`megatron_soaes.models.memory.activation_bytes`: bf16, no recomputation, 1F1B first stage, micro-batch
1), for the layouts of the long-context sbatch scripts. Writes <out> (JSON) for the manual's table.

  python benchmarks/cp_memory.py --out benchmarks/results/cp_memory.json
"""

from __future__ import annotations

import argparse

from provenance import write_results

from megatron_soaes.models import preset
from megatron_soaes.models.memory import activation_bytes

LAYOUTS = {"qwen2.5-7b": 4, "qwen2.5-72b": 8}  # model -> TP of its sbatch layouts
SEQS = (4096, 32768, 131072)
CPS = (1, 2, 4, 8, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for model, tp in LAYOUTS.items():
        cfg = preset(model)
        for seq in SEQS:
            gb = {cp: activation_bytes(cfg, seq, cp=cp, tp=tp) / 1e9 for cp in CPS}
            rows.append({"model": model, "tp": tp, "seq_length": seq, "activation_gb": {str(k): round(v, 1) for k, v in gb.items()}})
            print(f"{model:12} TP {tp}  {seq:>7}: " + "  ".join(f"CP{cp} {v:6.1f} GB" for cp, v in gb.items()))
    write_results(args.out, rows, note="activation memory per GPU, bf16, no recomputation, micro-batch 1, first "
                  "pipeline stage under 1F1B (L layers' worth), sequence parallel; computed, not measured")


if __name__ == "__main__":
    main()
