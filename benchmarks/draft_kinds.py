#!/usr/bin/env python
"""Draft kinds side by side on the main job's target: the separate distilled draft (whole vocabulary and the
head's reduced one), the EAGLE-3 head, with --mtp megatron-core's MTP layer as a head, and transformers' assisted
generation as the outside baseline.

Same target run, same held-out prompts (the knowledge questions' test split, chat-formatted), batch 1 and 4;
per setting tau, alpha, tokens/s and speedup over target-only greedy, and per draft its cost per token
relative to the target (one cached decode step each, median of many). Every output is checked against
target-only greedy at batch 1; the run exits 1 when any differs. Needs a main job run through `speculative`
(or at least `export` with `draft_head` on).

  python benchmarks/draft_kinds.py --config examples/smollm2/pipeline.yaml [--prompts 32] [--batch-sizes 1 4] [--mtp]

--mtp trains an MTP head with the run's draft_head settings (same data, steps, vocabulary size, training-time
test) into <run>/draft_mtp, once (a finished one is reused, with its recorded training time). --mtp-steps /
--mtp-examples also compare an MTP head given a longer budget (into <run>/draft_mtp_s<steps>_e<examples>):
what more training buys, beside the equal-budget rows. --kinds MTP measures only the kinds named so (and the
target), e.g. into a results file of its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from provenance import write_results

from megatron_soaes.config.pipeline import load_pipeline_config
from megatron_soaes.speculative.bench import format_table, run_benchmark, target_baseline, hf_rows
from megatron_soaes.workflows.pipeline import Pipeline


@torch.no_grad()
def step_seconds(model, context: int = 128, steps: int = 48) -> float:
    """Median seconds of one cached single-token forward after `context` tokens (a head is fed zeros as hidden)."""
    cache = model.new_cache(1, context + steps + 1)
    toks = torch.randint(0, 1000, (1, context + steps), generator=torch.Generator().manual_seed(0))
    is_head = hasattr(model, "hidden_in")
    d = model.cfg.hidden_size
    if is_head:
        model.hidden_in = torch.zeros(1, context, d)
    model.forward(toks[:, :context], torch.arange(context)[None], cache, capture=False)
    cache.lengths += context
    times = []
    for i in range(steps):
        if is_head:
            model.hidden_in = torch.zeros(1, 1, d)
        t0 = time.perf_counter()
        model.forward(toks[:, context + i:context + i + 1], cache.lengths[:, None], cache)
        times.append(time.perf_counter() - t0)
        cache.lengths += 1
    return statistics.median(times)


def training_seconds(pipe) -> dict:
    """Seconds each draft kind's training phase took (the pipeline's phase records, and the MTP head's)."""
    out = {}
    for phase in ("distill", "draft_head"):
        f = pipe.phase_file(phase)
        if f.exists():
            out[phase] = json.loads(f.read_text()).get("seconds")
    for mtp in sorted(pipe.out.glob(f"draft_mtp*/{MTP_RECORD}")):
        out[mtp.parent.name] = json.loads(mtp.read_text())["seconds"]
    return out


DISTILLED = "draft model (distilled, 4 layers)"  # the separate draft's row name (HF assisted generation uses it too)
MTP_RECORD = "mtp_training.json"  # checkpoint and training seconds of the --mtp head


def mtp_head(pipe, name: str = "draft_mtp") -> str:
    """An MTP head trained like the run's draft head (its job with distill.draft mtp), in <run>/<name>."""
    from megatron_soaes.utils.files import atomic_write_json

    out = pipe.out / name
    if (out / MTP_RECORD).exists():
        return json.loads((out / MTP_RECORD).read_text())["checkpoint"]
    job = pipe.draft_head_job()
    head = job.distill.head.model_copy(update={"feature_layers": None})
    job = job.model_copy(update={"distill": job.distill.model_copy(update={"draft": "mtp", "head": head}),
                                 "train": job.train.model_copy(update={"output_dir": str(out)})})
    t0 = time.time()
    ckpt = pipe._train(job)
    atomic_write_json(out / MTP_RECORD, {"checkpoint": ckpt, "seconds": round(time.time() - t0, 1)})
    return ckpt


def hf_pair(pipe, dist) -> tuple[str, str]:
    """The target and draft as HF directories (the export phase's, or written here once)."""
    if pipe.done("export") is not None:
        exp = pipe.result("export")
        return exp.target.dir, exp.draft.dir
    from megatron_soaes.workflows.export import export_hf

    out = []
    for name, ckpt in (("target", dist.target), ("draft", dist.checkpoint)):
        dst = pipe.out / "draft_kinds_hf" / name
        if not (dst / "config.json").exists():
            export_hf(ckpt, dst, pipe.tokenizer_spec, dtype=None, default_system=None, overwrite=True)
        out.append(str(dst))
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/smollm2/pipeline.yaml")
    ap.add_argument("--set", action="append", default=[], help="pipeline overrides the run used (e.g. its draft_head)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--gammas", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--trees", nargs="*", default=["dynamic"])
    ap.add_argument("--mtp", action="store_true", help="also an MTP head (trained here once with the draft head's settings)")
    ap.add_argument("--mtp-steps", type=int, default=None, help="also an MTP head trained this many steps")
    ap.add_argument("--mtp-examples", type=int, default=None, help="... on this many training examples")
    ap.add_argument("--kinds", nargs="*", default=None,
                    help="only the draft kinds whose name contains one of these (e.g. MTP); without the distilled "
                         "draft, no HF rows")
    ap.add_argument("--out", default="benchmarks/results/draft_kinds_cpu.json")
    args = ap.parse_args()

    from megatron_soaes.data.sft import Template
    from megatron_soaes.eval.qa import load_qa
    from megatron_soaes.heads.inference import load_head
    from megatron_soaes.inference import load_inference_model

    pipe = Pipeline(load_pipeline_config(args.config, args.set), log=print)
    dist, head_res = pipe.result("distill"), pipe.result("draft_head")
    if head_res.skipped:
        raise SystemExit(f"{args.config}: the run has no draft head (draft_head is off)")
    target = load_inference_model(dist.target)
    head = load_head(head_res.checkpoint, target)
    draft = load_inference_model(dist.checkpoint)
    reduced = load_inference_model(dist.checkpoint)
    reduced.restrict_vocab(head.draft_ids)
    prompts = [Template(None).render(c, pipe.tokenizer, for_generation=True)[0]
               for c in load_qa(pipe.sft_file("soae_qa", "test"), args.prompts)]
    kinds = {DISTILLED: draft,
             f"draft model, {len(head.draft_ids)}-token vocabulary": reduced,
             f"EAGLE-3 head ({len(head.draft_ids)}-token vocabulary)": head}
    mtp_ckpt = mtp_head(pipe) if args.mtp else None
    if mtp_ckpt:
        from megatron_soaes.training.metrics import last_eval

        mtp = load_head(mtp_ckpt, target)
        kinds[f"MTP head ({len(mtp.draft_ids)}-token vocabulary)"] = mtp
        mtp_eval = {"draft_mtp": last_eval(pipe.out / "draft_mtp")}
        if args.mtp_steps or args.mtp_examples:
            h = pipe.cfg.draft_head
            steps, examples = args.mtp_steps or h.steps, args.mtp_examples or h.examples
            name = f"draft_mtp_s{steps}_e{examples}"
            longer = Pipeline(load_pipeline_config(args.config, [*args.set, f"draft_head.steps={steps}",
                                                                 f"draft_head.examples={examples}"]), log=print)
            kinds[f"MTP head, {steps} steps on {examples} examples"] = load_head(mtp_head(longer, name), target)
            mtp_eval[name] = last_eval(pipe.out / name)
    if args.kinds:
        kinds = {k: m for k, m in kinds.items() if any(sel in k for sel in args.kinds)}
    t_step = step_seconds(target)
    cost = {name: step_seconds(m) / t_step for name, m in kinds.items()}
    for name, c in cost.items():
        print(f"{name}: {c:.3f} of a target forward per token")
    rows, exact = [], True
    for bs in args.batch_sizes:
        base = target_baseline(target, prompts, args.max_new_tokens, batch_size=bs)
        rows.append({**base.row, "draft": "none", "draft_cost": None})
        for name, m in kinds.items():
            for r in run_benchmark(target, m, prompts, args.max_new_tokens, args.gammas, args.trees, log=print,
                                   batch_size=bs, baseline=base)[1:]:
                rows.append({**r, "draft": name, "draft_cost": cost[name]})
        if bs == 1 and DISTILLED in kinds:
            for r in hf_rows(hf_pair(pipe, dist), prompts, args.max_new_tokens, target.device,
                              target.dtype, base.outputs, sum(map(len, base.outputs)), base.seconds, None):
                rows.append({**r, "draft": DISTILLED if "assisted" in r["method"] else "none",
                             "draft_cost": None})
    for r in rows:
        exact &= bool(r["exact"])
    print(format_table(rows))
    write_results(args.out, rows, settings=dict(
        config=args.config, prompts=len(prompts), max_new_tokens=args.max_new_tokens, batch_sizes=args.batch_sizes,
        gammas=args.gammas, trees=args.trees, target=dist.target, draft=dist.checkpoint, head=head_res.checkpoint,
        draft_vocab=len(head.draft_ids), target_step_seconds=t_step, draft_cost=cost,
        draft_head=pipe.cfg.draft_head.model_dump() if pipe.cfg.draft_head else None, head_eval=head_res.eval,
        mtp=mtp_ckpt, mtp_eval=mtp_eval if mtp_ckpt else None, training_seconds=training_seconds(pipe)))
    if not exact:
        print("NOT LOSSLESS: some output differs from target-only greedy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
