#!/usr/bin/env python
"""Speculative decoding benchmark: one run, same prompts, same target/draft pair, side by side.

  target-only greedy (our engine)          - the baseline, tokens/s
  chain speculative (gamma = 2, 4, ...)    - tokens/s, tau (tokens per target forward), alpha, speedup
  static and dynamic token trees           - same, by tree size
  HF transformers generate(assistant_model=draft) on the same pair in HF format, and HF greedy alone

Every speculative output is checked token-for-token against the target-only greedy output; the run
exits 1 when any differs. Writes <out>/spec_decode.json (with its provenance) and <out>/spec_decode.png.

  python benchmarks/spec_decode.py --target T --draft D [--tokenizer data/demo/tokenizer.json --prompts file.jsonl]
      [--batch-sizes 1 4 16] [--tp 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from provenance import write_results

from megatron_soaes.inference import load_inference_model
from megatron_soaes.utils.dtypes import torch_dtype
from megatron_soaes.speculative.bench import format_table, plot, run_benchmark


def load_prompts(args, vocab: int) -> list[list[int]]:
    if args.prompts:
        from megatron_soaes.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer or args.target)
        prompts = []
        for line in Path(args.prompts).read_text(encoding="utf-8").splitlines():
            if line.strip() and len(prompts) < args.num_prompts:
                rec = json.loads(line)
                if "text" in rec:  # a document: its opening, to be continued
                    prompts.append(tok.encode(rec["text"])[:args.prompt_len])
                else:  # a prompt or question: its end is what the model answers
                    prompts.append(tok.encode(rec.get("prompt") or rec["question"])[-args.prompt_len:])
        return prompts
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_prompts)]


def model_config(spec: str):
    """The config of a checkpoint / HF directory, or of a preset name (for dry runs before the weights exist)."""
    from megatron_soaes.checkpoint.meta import model_config_of
    from megatron_soaes.models import preset

    return model_config_of(spec) if Path(spec).exists() else preset(spec)


def check_layout(target: str, draft: str, tp: int) -> str:
    from megatron_soaes.inference.tp import TensorParallel

    t, d = model_config(target), model_config(draft)
    TensorParallel(size=tp).check(t)
    if t.padded_vocab_size != d.padded_vocab_size:
        raise ValueError(f"draft vocabulary {d.vocab_size} differs from the target's {t.vocab_size}")
    gb = lambda c: c.num_parameters() * 2 / 1e9  # noqa: E731  (bf16 weights)
    return (f"OK: target {target} ({gb(t):.0f} GB bf16, {gb(t) / tp:.1f} GB per rank at TP {tp}), draft {draft} "
            f"({gb(d):.1f} GB, replicated on every rank)")


def as_hf_dir(path: str, dst: Path) -> Path:
    p = Path(path)
    if (p / "config.json").exists():
        return p
    from megatron_soaes.checkpoint.convert import megatron_to_hf

    return megatron_to_hf(p, dst, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--prompts", default=None, help="jsonl with prompt/text/question (default: random tokens)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gammas", type=int, nargs="*", default=[2, 4, 6])
    ap.add_argument("--trees", nargs="*", default=["2,1,1", "2,2,1,1", "3,2,2,1,1", "4,3,2,1,1", "dynamic"])
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1], help="decode the prompts this many at a time")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel target (relaunches under torchrun; draft replicated)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--cuda-graphs", action="store_true", help="capture draft steps and tree verification as CUDA graphs")
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--plant-bug", action="store_true", help="a lossy verifier (wrong bonus token): the run must fail")
    ap.add_argument("--dry-run", action="store_true", help="check the pair and the TP layout from the configs (a "
                                                           "directory or a preset name), load nothing")
    args = ap.parse_args()
    if args.dry_run:
        from megatron_soaes.inference.tp import TensorParallelError

        try:
            print(check_layout(args.target, args.draft, args.tp))
        except (TensorParallelError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        return
    if args.plant_bug:
        plant_lossy_verifier()
    dtype = torch_dtype(args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tp, rank = None, 0
    if args.tp > 1:
        from megatron_soaes.inference.tp import TensorParallel
        from megatron_soaes.runtime import ParallelConfig, initialize
        from megatron_soaes.runtime.launch import ensure_world_size

        ensure_world_size(args.tp)
        initialize(ParallelConfig(tensor_parallel=args.tp))
        tp = TensorParallel.from_env()
        rank, args.no_hf = tp.rank, True
    target = load_inference_model(args.target, dtype, args.device, tp=tp, cuda_graphs=args.cuda_graphs)
    draft = load_inference_model(args.draft, dtype, args.device, cuda_graphs=args.cuda_graphs)
    prompts = load_prompts(args, target.vocab_size)
    n = args.max_new_tokens

    hf_dirs, tmp = None, None
    if not args.no_hf:
        tmp = tempfile.TemporaryDirectory()
        hf_dirs = (as_hf_dir(args.target, Path(tmp.name) / "target"), as_hf_dir(args.draft, Path(tmp.name) / "draft"))
    rows = []
    for b in args.batch_sizes:
        rows += run_benchmark(target, draft, prompts, n, args.gammas, args.trees, hf_dirs, log=lambda s: None, batch_size=b)
    if rank:
        return
    print(f"{len(prompts)} prompts x {n} new tokens, device {args.device}, {args.dtype}, TP {args.tp}, "
          f"batch sizes {args.batch_sizes} (speedup: against target-only at the same batch size)")
    print(format_table(rows))
    write_results(out / "spec_decode.json", rows, settings=dict(
        target=args.target, draft=args.draft, prompts=args.prompts, num_prompts=len(prompts), prompt_len=args.prompt_len,
        max_new_tokens=n, device=args.device, dtype=args.dtype, tp=args.tp, cuda_graphs=args.cuda_graphs))
    plot(rows, out / "spec_decode.png", f"speculative decoding ({args.device})")
    inexact = [f"batch {r['batch']} {r['method']}" for r in rows if not r["exact"]]
    if inexact:
        raise SystemExit(f"error: output differs from target-only greedy: {', '.join(inexact)}")


def plant_lossy_verifier() -> None:
    """For checking the checkers: the bonus token after each accepted path is off by one."""
    from megatron_soaes.speculative import decode

    real = decode.tree_verify

    def lossy(*a, **kw):
        path, length, nxt = real(*a, **kw)
        return path, length, (nxt + 1) % a[2].shape[-1]

    decode.tree_verify = lossy


if __name__ == "__main__":
    main()
