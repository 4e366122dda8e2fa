#!/usr/bin/env python
"""Our corpus preprocessing against Megatron-LM's own `tools/preprocess_data.py`, side by side.

Same input, same tokenizer (the real Qwen2.5 vocabulary), same worker counts; both tools run as
subprocesses with the same interpreter and are timed end to end (start-up included). Prints, per
worker count: seconds, tokens/s, our speed relative to Megatron-LM, and whether the `.bin` and `.idx`
files are byte-identical. Writes <out>/preprocess_vs_megatron.json and .png.

  python benchmarks/preprocess_vs_megatron.py --megatron-lm /path/to/Megatron-LM [--workers 1 2]
      [--input a.jsonl ...] [--repeat 2] [--out outputs/bench/preprocess]

Megatron-LM reads the Qwen vocabulary through its HuggingFaceTokenizer, so the benchmark writes the
same BPE as an HF `tokenizer.json` (eos = <|endoftext|>, as the Qwen2.5 base releases); ours runs both
its offline tiktoken path (`--tokenizer qwen`) and that HF directory. The default input is the demo
corpora (`soaes prepare-demo-data`) repeated `--repeat` times, plus edge-case records (an empty text,
a literal special token, whitespace only, control characters). Megatron-LM's `megatron.training`
imports `triton`; on a machine without it, `pip install triton` into the interpreter used here (or
pass `--megatron-pythonpath DIR` holding it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from provenance import write_results

ROOT = Path(__file__).resolve().parents[1]
EDGE_CASES = ["", "<|endoftext|>前文与后文", "   \n\t ", "控制\u0000字符\u0007", "第一条 为了规范企业国有资产 😀 ABC 123"]


def build_input(args, out: Path) -> Path:
    inputs = [Path(p) for p in args.input] or [ROOT / "data/demo/corpora/domain.train.jsonl",
                                                 ROOT / "data/demo/corpora/general.train.jsonl"]
    for p in inputs:
        if not p.exists():
            sys.exit(f"error: {p} does not exist (run `soaes prepare-demo-data --out data/demo` or pass --input)")
    dst = out / "input.jsonl"
    with open(dst, "wb") as f:
        for _ in range(args.repeat):
            for p in inputs:
                f.write(p.read_bytes())
        for text in EDGE_CASES:
            f.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode())
    return dst


def qwen_hf_dir(out: Path) -> Path:
    from megatron_soaes.data.tokenizer import load_tokenizer

    d = out / "qwen2.5-tokenizer"
    load_tokenizer("qwen").save_tokenizer_json(d)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "bos_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 131072}))
    return d


def run(cmd, env, cwd) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    secs = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"error: {' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}")
    return secs


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count_tokens(prefix: Path) -> tuple[int, int]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return int(ds.sequence_lengths.sum()), len(ds.document_indices) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megatron-lm", required=True, help="a Megatron-LM checkout (its tools/preprocess_data.py)")
    ap.add_argument("--megatron-pythonpath", default=None, help="extra PYTHONPATH for Megatron-LM (e.g. triton)")
    ap.add_argument("--input", nargs="*", default=[])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="outputs/bench/preprocess")
    args = ap.parse_args()
    mlm = Path(args.megatron_lm).resolve()
    script = mlm / "tools" / "preprocess_data.py"
    if not script.exists():
        sys.exit(f"error: {script} not found: --megatron-lm must be a Megatron-LM checkout")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    inp = build_input(args, out)
    hf_dir = qwen_hf_dir(out)
    env = dict(os.environ)
    mlm_env = dict(env)
    if args.megatron_pythonpath:
        mlm_env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.megatron_pythonpath, env.get("PYTHONPATH")]))
    py = sys.executable
    print(f"input {inp} ({inp.stat().st_size / 1e6:.1f} MB), Megatron-LM at {mlm}")

    rows = []
    for w in args.workers:
        ref = out / f"megatron_w{w}"
        secs = run([py, script, "--input", inp, "--output-prefix", ref, "--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", hf_dir, "--append-eod", "--workers", str(w), "--log-interval", "100000"],
                   mlm_env, mlm)
        ref = Path(f"{ref}_text_document")
        tokens, docs = count_tokens(ref)
        rows.append(dict(tool="Megatron-LM (HF tokenizer)", workers=w, seconds=secs, tokens=tokens, documents=docs,
                         tokens_per_s=tokens / secs, ratio=1.0, identical=True))
        base = secs
        for name, tok in (("ours (tiktoken qwen)", "qwen"), ("ours (same HF tokenizer)", str(hf_dir))):
            dst = out / f"ours_{'tiktoken' if tok == 'qwen' else 'hf'}_w{w}"
            secs = run([py, ROOT / "tools" / "preprocess_data.py", "--input", inp, "--output-prefix", dst,
                        "--tokenizer", tok, "--workers", str(w)], env, ROOT)
            same = all(digest(Path(f"{dst}{ext}")) == digest(Path(f"{ref}{ext}")) for ext in (".bin", ".idx"))
            t, d = count_tokens(dst)
            rows.append(dict(tool=name, workers=w, seconds=secs, tokens=t, documents=d, tokens_per_s=t / secs,
                             ratio=base / secs, identical=same))
    print(f"{'tool':28s} {'workers':>7s} {'seconds':>8s} {'tokens':>10s} {'tok/s':>10s} {'vs Megatron':>11s} identical")
    for r in rows:
        print(f"{r['tool']:28s} {r['workers']:7d} {r['seconds']:8.2f} {r['tokens']:10,d} {r['tokens_per_s']:10,.0f} "
              f"{r['ratio']:10.2f}x {r['identical']}")
    write_results(out / "preprocess_vs_megatron.json", rows)
    plot(rows, out / "preprocess_vs_megatron.png")
    if not all(r["identical"] for r in rows):
        sys.exit("error: outputs differ from Megatron-LM's")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = list(dict.fromkeys(r["tool"] for r in rows))
    workers = sorted({r["workers"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        vals = [next(r["tokens_per_s"] for r in rows if r["tool"] == tool and r["workers"] == w) for w in workers]
        ax.bar([x + i * width for x in range(len(workers))], vals, width, label=tool)
    ax.set_xticks([x + width * (len(tools) - 1) / 2 for x in range(len(workers))], [f"{w} workers" for w in workers])
    ax.set_ylabel("tokens/s (end to end)")
    ax.set_title("corpus preprocessing, Qwen2.5 vocabulary")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
