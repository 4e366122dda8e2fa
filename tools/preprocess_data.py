#!/usr/bin/env python
"""jsonl / parquet / HF datasets dir -> megatron indexed dataset (.bin/.idx + .stats.json).

  python tools/preprocess_data.py --input a.jsonl b.jsonl --output-prefix data/corpus \\
      --tokenizer qwen --workers 8 [--dedup --min-chars 20 --max-garbage-ratio 0.3 --strict]
"""

import argparse
import sys

from megatron_soaes.data.preprocess import CleanConfig, PreprocessError, preprocess


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer", required=True, help="qwen (Qwen2.5), qwen3, llama3, *.tiktoken, *.model or an HF tokenizer dir")
    p.add_argument("--text-key", default="text")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--no-eod", action="store_true")
    p.add_argument("--special-tokens-as-text", action="store_true",
                   help="tokenise a literal '<|endoftext|>' etc. as text (default: the special token, like Megatron-LM)")
    p.add_argument("--dedup", action="store_true")
    p.add_argument("--min-chars", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=None)
    p.add_argument("--max-control-ratio", type=float, default=None)
    p.add_argument("--max-garbage-ratio", type=float, default=None)
    a = p.parse_args(argv)
    clean = CleanConfig(a.dedup, a.min_chars, a.max_chars, a.max_control_ratio, a.max_garbage_ratio)
    try:
        s = preprocess(a.input, a.output_prefix, a.tokenizer, a.text_key, a.workers, clean, a.strict, not a.no_eod,
                       special_tokens=not a.special_tokens_as_text)
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    empty = f" (+{s.empty_documents} empty)" if s.empty_documents else ""
    print(f"{s.documents} documents{empty}, {s.tokens} tokens, {s.tokens / max(s.seconds, 1e-9):,.0f} tok/s; dropped {s.dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
