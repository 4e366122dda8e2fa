#!/usr/bin/env python
"""Packed SFT rows through the two no-TE attention paths, side by side: the dense [b, 1, s, s]
block-causal mask (SDPA with an explicit mask) and FlexAttention's document block mask.

Random rows of several examples each (position ids restart per example), the same megatron model,
forward + backward per step. Prints ms/step, peak memory and the max |per-token loss| difference
(the two must agree: the mask is the same, only its representation differs). FlexAttention has no
backward on CPU: there the steps are forward-only.

  python benchmarks/packed_attention.py                       # CPU, the test shape
  python benchmarks/packed_attention.py --device cuda --dtype bf16 --preset qwen2.5-0.5b --seq 2048 --mbs 4
"""

from __future__ import annotations

import argparse
import time

import torch
from provenance import write_results


def packed_rows(b: int, s: int, per_row: int, vocab: int, device, seed: int = 0) -> dict:
    """Rows of `per_row` examples of random lengths filling `s` tokens; segment ids from 1."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(b, s, dtype=torch.long)
    pos = torch.zeros(b, s, dtype=torch.long)
    for r in range(b):
        cuts = torch.sort(torch.randperm(s - 1, generator=g)[:per_row - 1] + 1).values.tolist()
        for k, (lo, hi) in enumerate(zip([0] + cuts, cuts + [s])):
            seg[r, lo:hi] = k + 1
            pos[r, lo:hi] = torch.arange(hi - lo)
    tokens = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    return {k: v.to(device) for k, v in dict(tokens=tokens, labels=labels, position_ids=pos, segment_ids=seg).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="test")
    ap.add_argument("--vocab", type=int, default=8064)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--per-row", type=int, default=6, help="examples packed into each row")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from megatron_soaes.models import build_model, preset
    from megatron_soaes.runtime import ParallelConfig, initialize
    from megatron_soaes.sft.task import packed_mask

    initialize(ParallelConfig(), seed=0)
    cfg = preset(args.preset, vocab_size=args.vocab, max_position_embeddings=max(args.seq, 512))
    model = build_model(cfg, args.dtype, use_te=False, attention="sdpa").to(args.device)
    rows = packed_rows(args.mbs, args.seq, args.per_row, cfg.vocab_size, args.device)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results, losses = {}, {}
    for kind in ("dense_mask", "flex"):
        def step():
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(cuda):
                loss = model(rows["tokens"], rows["position_ids"], packed_mask(rows["segment_ids"], kind),
                             labels=rows["labels"])
            if cuda:
                loss.float().mean().backward()
            return loss.detach().float()

        losses[kind] = step()  # warm-up (FlexAttention compiles here on CUDA)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        ms = (time.perf_counter() - t0) / args.steps * 1e3
        results[kind] = dict(ms_per_step=ms, tokens_per_s=args.mbs * args.seq / ms * 1e3,
                             peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    diff = float((losses["flex"] - losses["dense_mask"]).abs().max())
    mean_rel = float((losses["flex"].mean() - losses["dense_mask"].mean()).abs() / losses["dense_mask"].mean().abs())
    out = dict(backward=cuda, preset=args.preset, seq=args.seq, mbs=args.mbs, per_row=args.per_row, dtype=args.dtype, device=args.device,
               max_abs_loss_diff=diff, mean_rel_loss_diff=mean_rel, speedup_flex=results["dense_mask"]["ms_per_step"] / results["flex"]["ms_per_step"],
               **{k: v for k, v in results.items()})
    print(f"{args.preset}, {args.mbs} x {args.seq} tokens, {args.per_row} examples/row, {args.dtype} on {args.device}"
          f"{'' if cuda else ' (forward only: no FlexAttention backward on CPU)'}")
    for kind, r in results.items():
        mem = f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
        print(f"  {kind:<11} {r['ms_per_step']:8.1f} ms/step  {r['tokens_per_s']:10,.0f} tok/s{mem}")
    print(f"  flex vs dense: {out['speedup_flex']:.2f}x; max |per-token loss diff| {diff:.2e}, mean rel {mean_rel:.2e}")
    if args.json:
        write_results(args.json, [out])


if __name__ == "__main__":
    main()
