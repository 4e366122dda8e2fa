#!/usr/bin/env python
"""What each no-TE attention path lets a token see, read off the model itself.

Comparing losses has no teeth on a random-init model: non-causal attention moves its mean loss by ~1e-3 and
a missing document mask barely more, inside bf16 rounding. This probe asks an exact question instead.
Change one input token j and rerun the forward: the per-token losses that change must be exactly those at
the positions allowed to see j -- j itself and the later tokens of its own example -- and every other loss
must stay bit-identical (a masked score's softmax weight is exactly 0, in any dtype). Any leak into an
earlier token (non-causal attention), into another packed example (no document mask) or across a
boundary (an off-by-one mask) changes a loss that must not change.

  --probe causal: megatron's local attention and SDPA on unpacked rows.
  --probe packed: packed rows through the dense block-causal mask and FlexAttention's document mask,
                  also compared with the examples run one by one (plain causal): per-token losses, and the
                  parameter gradients of the summed loss where a backward exists (not FlexAttention on CPU).

  python benchmarks/attention_probe.py --probe packed --device cuda --dtype bf16 --json packed_probe.json
  --plant noncausal | no-document-mask | boundary: the bug the probe must find (the check must fail)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from packed_attention import packed_rows
from provenance import write_results

# Bounds of the comparison with the examples run one by one (the exact probes have none: zero is zero).
TOLERANCES = {"fp32": {"loss_abs": 1e-4, "grad_rel": 1e-4}, "bf16": {"loss_abs": 0.25, "grad_rel": 5e-2}}
PLANTS = ("noncausal", "no-document-mask", "boundary")


def plant(kind: str) -> None:
    """Plant a masking bug in the attention the probe runs (never in the library's files)."""
    from megatron_soaes.models import attention

    if kind == "noncausal":  # SDPA without its causal mask
        sdpa = F.scaled_dot_product_attention

        def leaky(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False, **kw)

        attention.F.scaled_dot_product_attention = leaky
        return

    def block_mask(self):  # FlexAttention's document mask, wrong
        from torch.nn.attention.flex_attention import create_block_mask

        seg = self.segment_ids
        b, s = seg.shape
        if kind == "no-document-mask":
            def mask(bi, h, q, kv):
                return q >= kv
        else:  # boundary: each example's first token also sees the token before it (the last of the previous)
            def mask(bi, h, q, kv):
                return ((seg[bi, q] == seg[bi, kv]) | (kv == q - 1)) & (q >= kv)
        return create_block_mask(mask, b, None, s, s, device=seg.device, _compile=seg.is_cuda)

    attention.DocumentMask.block_mask = block_mask


def probe_positions(segment_ids: torch.Tensor, row: int, n_random: int, seed: int = 0) -> list[int]:
    """Positions to perturb in `row`: the first and last token of every example (where off-by-one masks
    leak) and a few others."""
    seg = segment_ids[row].tolist()
    starts = [i for i in range(1, len(seg)) if seg[i] != seg[i - 1]]
    edges = {0, len(seg) - 1, *starts, *(i - 1 for i in starts)}
    g = torch.Generator().manual_seed(seed)
    return sorted(edges | set(torch.randint(0, len(seg), (n_random,), generator=g).tolist()))


@torch.no_grad()
def leak_probe(model, rows: dict, mask_fn, positions: list[int], vocab: int, row: int = 0) -> dict:
    """Perturb each position j of `row` in turn: the losses that change must be exactly the allowed ones."""
    seg = rows["segment_ids"][row]
    s = seg.numel()
    idx = torch.arange(s, device=seg.device)

    def losses(tokens):
        return model(tokens, rows["position_ids"], mask_fn(rows["segment_ids"]), labels=rows["labels"]).float()

    base = losses(rows["tokens"])
    again = losses(rows["tokens"])
    deterministic = bool(torch.equal(base, again))
    leaks, reached, allowed_total = [], 0, 0
    for j in positions:
        tokens = rows["tokens"].clone()
        tokens[row, j] = (tokens[row, j] + 1) % vocab
        changed = losses(tokens) != base
        allowed = (seg == seg[j]) & (idx >= j)
        other_rows = torch.ones(changed.shape[0], dtype=torch.bool, device=seg.device)
        other_rows[row] = False
        bad = (changed[row] & ~allowed).nonzero().flatten().tolist()
        if changed[other_rows].any():
            bad.append("another row")
        if bad:
            leaks.append({"perturbed": j, "changed_but_masked": bad[:8]})
        reached += int((changed[row] & allowed).sum())
        allowed_total += int(allowed.sum())
    return dict(deterministic=deterministic, perturbed=len(positions), leaks=leaks,
                reach=reached / max(allowed_total, 1))


def one_by_one(model, rows: dict, row: int, grads: bool):
    """Per-token losses of `row`'s examples run alone (plain causal), and the gradients of their sum."""
    seg = rows["segment_ids"][row]
    out = torch.empty(seg.numel(), device=seg.device)
    model.zero_grad(set_to_none=True)
    for k in seg.unique().tolist():
        where = (seg == k).nonzero().flatten()
        lo, hi = int(where[0]), int(where[-1]) + 1
        with torch.set_grad_enabled(grads):
            loss = model(rows["tokens"][row:row + 1, lo:hi], rows["position_ids"][row:row + 1, lo:hi], None,
                         labels=rows["labels"][row:row + 1, lo:hi]).float()
            if grads:
                loss.sum().backward()
        out[lo:hi] = loss.detach()[0]
    return out, _grads(model) if grads else None


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def packed_vs_one_by_one(model, rows: dict, mask_fn, grads: bool, row: int = 0) -> dict:
    ref, ref_grads = one_by_one(model, rows, row, grads)
    model.zero_grad(set_to_none=True)
    single = {k: v[row:row + 1] for k, v in rows.items()}
    with torch.set_grad_enabled(grads):
        loss = model(single["tokens"], single["position_ids"], mask_fn(single["segment_ids"]),
                     labels=single["labels"]).float()
        if grads:
            loss.sum().backward()
    r = dict(max_abs_loss_diff=float((loss.detach()[0] - ref).abs().max()))
    if grads:
        r["grad_rel_diff"] = float((_grads(model) - ref_grads).norm() / ref_grads.norm())
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", choices=["causal", "packed"], required=True)
    ap.add_argument("--preset", default="test")
    ap.add_argument("--vocab", type=int, default=8064)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--per-row", type=int, default=6, help="examples packed into each row")
    ap.add_argument("--positions", type=int, default=6, help="random positions perturbed besides the edges")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--plant", choices=PLANTS, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from megatron_soaes.models import build_model, preset
    from megatron_soaes.models.attention import have_flex_attention
    from megatron_soaes.runtime import ParallelConfig, initialize
    from megatron_soaes.sft.task import packed_mask

    if args.plant:
        plant(args.plant)
    initialize(ParallelConfig(), seed=0)
    cfg = preset(args.preset, vocab_size=args.vocab, max_position_embeddings=max(args.seq, 512))
    per_row = 1 if args.probe == "causal" else args.per_row
    rows = packed_rows(args.mbs, args.seq, per_row, cfg.vocab_size, args.device)
    cuda = args.device.startswith("cuda")
    tol = TOLERANCES[args.dtype]
    results = []
    if args.probe == "causal":
        paths = [(a, a, lambda seg: None) for a in ("megatron_local", "sdpa")]
    else:
        paths = [("dense_mask", "sdpa", lambda seg: packed_mask(seg, "dense_mask"))]
        if have_flex_attention():
            paths.append(("flex", "sdpa", lambda seg: packed_mask(seg, "flex")))
    for name, attention, mask_fn in paths:
        initialize(ParallelConfig(), seed=0)  # the same weights for every path
        model = build_model(cfg, args.dtype, use_te=False, attention=attention).to(args.device).eval()
        positions = probe_positions(rows["segment_ids"], 0, args.positions)
        r = dict(probe=args.probe, path=name, dtype=args.dtype, device=args.device, preset=args.preset,
                 seq=args.seq, per_row=per_row, plant=args.plant, **leak_probe(model, rows, mask_fn, positions, cfg.vocab_size))
        if args.probe == "packed":
            r.update(packed_vs_one_by_one(model, rows, mask_fn, grads=cuda or name != "flex"))
        wrong = [f"perturbing token {x['perturbed']} changed masked losses at {x['changed_but_masked']}" for x in r["leaks"][:3]]
        if r["reach"] < 0.5:
            wrong.append(f"only {r['reach']:.0%} of the allowed losses changed: the probe cannot see")
        if not r["deterministic"]:
            wrong.append("the same forward twice gave different losses: exact probes need a deterministic forward")
        if r.get("max_abs_loss_diff", 0) > tol["loss_abs"]:
            wrong.append(f"packed vs one by one: max |loss diff| {r['max_abs_loss_diff']:.2e} > {tol['loss_abs']}")
        if r.get("grad_rel_diff", 0) > tol["grad_rel"]:
            wrong.append(f"packed vs one by one: gradients differ, rel {r['grad_rel_diff']:.2e} > {tol['grad_rel']}")
        r["wrong"] = wrong
        results.append(r)
        extra = "".join(f", {k} {r[k]:.2e}" for k in ("max_abs_loss_diff", "grad_rel_diff") if k in r)
        print(f"{args.probe:<6} {name:<14} {r['perturbed']} tokens perturbed, {len(r['leaks'])} leaked, "
              f"reach {r['reach']:.0%}{extra}: {'WRONG: ' + '; '.join(wrong) if wrong else 'ok'}", flush=True)
    if args.json:
        write_results(args.json, results)
    if any(r["wrong"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
