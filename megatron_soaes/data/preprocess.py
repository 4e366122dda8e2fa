"""Raw text (jsonl / parquet / HF `datasets` directory) -> megatron-core indexed dataset (.bin/.idx).

Default mode matches Megatron-LM's ``tools/preprocess_data.py`` (one document per record, EOD
appended, same dtype choice), so outputs are byte-identical. Cleaning filters are opt-in. Bad
records are reported as ``file:line: reason``; `strict` turns the first one into an error. Output
files appear only when complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm


class PreprocessError(ValueError):
    pass


@dataclass
class CleanConfig:
    dedup: bool = False  # drop exact duplicates (sha1 of the text)
    min_chars: int = 0
    max_chars: int | None = None
    max_control_ratio: float | None = None  # control characters (except \n \t) / characters
    max_garbage_ratio: float | None = None  # chars that are not letters, digits, punctuation or space


@dataclass
class Stats:
    documents: int = 0
    empty_documents: int = 0  # kept as empty index entries, like Megatron-LM (no tokens, no EOD)
    tokens: int = 0
    records_read: int = 0
    dropped: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)  # first bad records: "file:line: reason"
    seconds: float = 0.0

    def drop(self, reason: str, where: str, keep: int = 20):
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.examples) < keep:
            self.examples.append(f"{where}: {reason}")


def iter_records(path: str | Path, text_key: str = "text"):
    """Yield (where, text_or_None, problem_or_None) for every record of a jsonl/parquet/datasets input."""
    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict: every split in turn
            splits = [(f"{path}[{k}]", ds[k]) for k in ds.keys()]
        else:
            splits = [(str(path), ds)]
        for name, split in splits:
            if text_key not in split.column_names:
                raise PreprocessError(f"{name}: no column {text_key!r} (columns: {split.column_names})")
            for i, text in enumerate(split[text_key]):
                yield f"{name}#{i}", text, None if isinstance(text, str) else f"field {text_key!r} is not a string"
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_key not in table.column_names:
            raise PreprocessError(f"{path}: no column {text_key!r} (columns: {table.column_names})")
        for i, text in enumerate(table.column(text_key).to_pylist()):
            yield f"{path}#{i}", text, None if isinstance(text, str) else f"field {text_key!r} is not a string"
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, None, f"invalid UTF-8 at byte {e.start}"
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, None, f"malformed JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(obj, dict) or text_key not in obj:
                yield where, None, f"missing field {text_key!r}"
            elif not isinstance(obj[text_key], str):
                yield where, None, f"field {text_key!r} is not a string"
            else:
                yield where, obj[text_key], None


def _bad_char_ratios(text: str) -> tuple[float, float]:
    n = max(len(text), 1)
    control = garbage = 0
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] == "C" and ch not in "\n\t\r":
            control += 1
        elif cat[0] not in "LNPZ" and not ch.isspace():
            garbage += 1
    return control / n, (control + garbage) / n


def clean_reason(text: str, clean: CleanConfig) -> str | None:
    if len(text) < clean.min_chars:
        return "too short"
    if clean.max_chars is not None and len(text) > clean.max_chars:
        return "too long"
    if clean.max_control_ratio is not None or clean.max_garbage_ratio is not None:
        control, garbage = _bad_char_ratios(text)
        if clean.max_control_ratio is not None and control > clean.max_control_ratio:
            return "control characters"
        if clean.max_garbage_ratio is not None and garbage > clean.max_garbage_ratio:
            return "garbage ratio"
    return None


_TOKENIZER = None  # set before the worker pool forks, so workers inherit it
_SPECIALS = True


def _encode(text):
    """A document's ids; tokenizers that open documents with a BOS (Llama 3) get it, as Megatron-LM's
    preprocessing of HF Llama tokenizers does."""
    ids = _TOKENIZER.encode(text, allow_special=_SPECIALS)
    return [_TOKENIZER.bos_id] + ids if ids and _TOKENIZER.bos_id is not None else ids


def optimal_dtype(vocab_size: int):
    """Megatron's choice: uint16 when every id fits, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def preprocess(inputs, output_prefix, tokenizer_spec, text_key: str = "text", workers: int = 1,
               clean: CleanConfig | None = None, strict: bool = False, append_eod: bool = True,
               progress: bool = True, special_tokens: bool = True) -> Stats:
    """Tokenise `inputs` into `output_prefix`.bin/.idx (+ .stats.json). Returns the stats.

    Defaults reproduce Megatron-LM's `tools/preprocess_data.py --append-eod` byte for byte on valid input
    (benchmarks/preprocess_vs_megatron.py): special-token strings in the text (e.g. a literal
    "<|endoftext|>") become the special token, as HF tokenizers do; `special_tokens=False` keeps them as
    plain text. An empty text is an empty document (no EOD), as there. Unlike Megatron-LM, bad records
    are skipped and counted (or fail with file:line in strict mode) instead of crashing the run."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_soaes.data.tokenizer import load_tokenizer

    clean = clean or CleanConfig()
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    for p in inputs:
        if not p.exists():
            raise PreprocessError(f"{p}: no such file or directory")
    tokenizer = load_tokenizer(tokenizer_spec)
    out = Path(output_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = out.with_name(out.name + ".bin.tmp"), out.with_name(out.name + ".idx.tmp")
    stats, seen = Stats(), set()
    start = time.time()

    def accepted():
        for path in inputs:
            for where, text, problem in iter_records(path, text_key):
                stats.records_read += 1
                if problem is None:
                    problem = clean_reason(text, clean)
                    if problem is None and clean.dedup:
                        digest = hashlib.sha1(text.encode("utf-8")).digest()
                        problem = "duplicate" if digest in seen else None
                        seen.add(digest)
                if problem is not None:
                    if strict:
                        raise PreprocessError(f"{where}: {problem}")
                    stats.drop(problem, where)
                    continue
                yield text

    global _TOKENIZER, _SPECIALS
    _TOKENIZER, _SPECIALS = tokenizer, special_tokens
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=optimal_dtype(tokenizer.vocab_size))
    pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        if pool is None:
            encoded = map(_encode, accepted())
        else:
            encoded = pool.imap(_encode, accepted(), chunksize=32)
        bar = tqdm(encoded, desc=f"tokenising -> {out.name}", unit="doc", disable=not progress)
        for ids in bar:
            if not ids:
                builder.add_document(np.zeros(0, dtype=np.int64), [])
                stats.empty_documents += 1
                continue
            if append_eod:
                ids = ids + [tokenizer.eod_id]
            builder.add_document(np.asarray(ids), [len(ids)])
            stats.documents += 1
            stats.tokens += len(ids)
            if stats.documents % 256 == 0:
                bar.set_postfix(tok_per_s=f"{stats.tokens / max(time.time() - start, 1e-9):,.0f}")
        builder.finalize(str(tmp_idx))
    except BaseException:
        for p in (tmp_bin, tmp_idx):
            p.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    stats.seconds = time.time() - start
    os.replace(tmp_bin, out.with_name(out.name + ".bin"))
    os.replace(tmp_idx, out.with_name(out.name + ".idx"))
    # megatron-core caches its sample indexes under <prefix>/cache by default, keyed by the settings and not
    # by the data: left in place they would index the old .bin (wrong sample lengths, or silently wrong text)
    shutil.rmtree(out / "cache", ignore_errors=True)
    record = {**asdict(stats), "tokens_per_second": stats.tokens / max(stats.seconds, 1e-9),
              "tokenizer": tokenizer.name, "inputs": [str(p) for p in inputs], "clean": asdict(clean)}
    out.with_name(out.name + ".stats.json").write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return stats
