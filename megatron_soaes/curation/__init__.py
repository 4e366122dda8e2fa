"""Corpus curation before tokenization: exact and near duplicates (MinHash + LSH, datasketch), quality
rules (`rules`), and decontamination against evaluation items (`decontam`), each counted per source.

`curate` streams jsonl sources (corpus documents or SFT examples) in order: worker processes compute
each record's normalised key, rule verdict, evaluation overlap and MinHash signature; the main process
makes the order-dependent decisions (first copy kept) so the result is the same for any worker count.
Kept records are written verbatim; every removal goes to removed.jsonl with its rule, evaluation
overlaps also to contamination.jsonl. A state file saved every `checkpoint_every` records lets a killed
run resume where it stopped (outputs truncated back to that point); finished outputs appear by rename.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_soaes.config.curation import CurationConfig
from megatron_soaes.curation.decontam import EvalIndex, text_of
from megatron_soaes.curation.rules import content, normalise, quality_reason
from megatron_soaes.utils.files import atomic_write_json, read_json

SUMMARY, STATE = "curation.json", ".curation_state.pkl"
RULES = ("malformed", "exact_duplicate", "near_duplicate", "contaminated")  # then the quality rules' names


class CurationError(ValueError):
    pass


# set before the worker pool forks (workers inherit them)
_CFG: CurationConfig | None = None
_INDEX: EvalIndex | None = None
_QUALITY: frozenset = frozenset()
_PERM = None


def _minhash(c: str):
    """The MinHash signature of a text's character shingles, hashed by xxh32 (C; datasketch's default
    SHA-1 in Python was most of the time)."""
    import xxhash
    from datasketch import MinHash

    n = _CFG.shingle
    if len(c) < n:
        return None
    m = MinHash(num_perm=_CFG.num_perm, seed=_CFG.seed, permutations=_PERM, scheme="affine32",
                hashfunc=xxhash.xxh32_intdigest)
    m.update_batch([c[i:i + n].encode("utf-8") for i in range(len(c) - n + 1)])
    return m.hashvalues


def _analyse(job):
    """(source, line) -> what the main process needs to decide; no state, so any worker may run it."""
    source, line = job
    try:
        rec = json.loads(line)
        text = text_of(rec)
        if not isinstance(text, str):
            raise TypeError("no text")
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        return {"bad": f"malformed record ({e})"}
    out = {"id": rec.get("id") if isinstance(rec, dict) else None}
    if _CFG.exact_dedup:
        out["key"] = hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()
    if source in _QUALITY:
        out["quality"] = quality_reason(text, _CFG.quality)
    if _INDEX is not None:
        out["contam"] = _INDEX.match(text)
    if _CFG.near_dedup:
        out["sig"] = _minhash(content(text))
    return out


def _fingerprint(sources: dict, cfg: CurationConfig, quality, index: EvalIndex | None) -> str:
    h = hashlib.sha1(cfg.model_dump_json(exclude={"workers", "checkpoint_every"}).encode())  # same outputs either way
    for name, p in sources.items():
        st = Path(p).stat()
        h.update(f"{name}|{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}|{name in quality}".encode())
    if index is not None:
        h.update(hashlib.sha1(pickle.dumps((sorted(index.ngrams.items()), sorted(index.whole.items())))).digest())
    return h.hexdigest()


class _State:
    """Everything a resumed run needs: decisions so far (exact keys, LSH of kept documents, their
    signatures), counts, and how far each output file got."""

    def __init__(self, cfg: CurationConfig, fingerprint: str):
        from datasketch import MinHashLSH

        self.fingerprint, self.done, self.source, self.line = fingerprint, [], None, 0
        self.offsets = {"out": 0, "removed": 0, "contamination": 0}
        self.exact: set = set()
        self.lsh = MinHashLSH(threshold=cfg.near_threshold, num_perm=cfg.num_perm) if cfg.near_dedup else None
        self.sigs: dict = {}
        self.stats: dict = {}
        self.seconds = 0.0

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(self, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _near(state: _State, sig, cfg: CurationConfig):
    from datasketch import MinHash

    if sig is None or state.lsh is None:
        return None
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashvalues=sig, permutations=_PERM, scheme="affine32")
    best = None
    for key in sorted(state.lsh.query(m)):  # LSH candidates (sorted: a set's order varies), confirmed on the signatures
        j = float(np.mean(state.sigs[key] == sig))
        if j >= cfg.near_threshold and (best is None or j > best[1]):
            best = (key, j)
    return best, m


def curate(sources: dict, out_dir, cfg: CurationConfig | None = None, eval_items=(), quality_sources=(),
           progress: bool = True, log=print) -> dict:
    """Curate jsonl `sources` ({name: path}) into `out_dir/<name>.jsonl`; returns the summary (also in
    out_dir/curation.json). Duplicates are found across all sources (the first copy, in source order,
    is kept); quality rules apply to the sources named in `quality_sources`; `eval_items` ((id, text)
    pairs) are what no kept record may overlap. A finished run with the same inputs and config is reused."""
    global _CFG, _INDEX, _QUALITY, _PERM
    from datasketch import MinHash

    cfg = cfg or CurationConfig()
    out = Path(out_dir)
    for name, p in sources.items():
        if not Path(p).is_file():
            what = "is a directory, expected a JSONL file" if Path(p).is_dir() else "no such file"
            raise CurationError(f"source {name!r}: {p}: {what}")
    t0 = time.time()
    index = EvalIndex(eval_items, cfg.decontam_ngram, cfg.decontam_min_item) if cfg.decontaminate and eval_items else None
    if index is not None:
        log(f"curate: decontamination index of {index.items} evaluation items ({len(index.ngrams):,} "
            f"{cfg.decontam_ngram}-grams, {len(index.whole)} short items) in {time.time() - t0:.1f}s")
    quality = frozenset(quality_sources)
    fp = _fingerprint(sources, cfg, quality, index)
    summary_file = out / SUMMARY
    if summary_file.exists() and read_json(summary_file).get("fingerprint") == fp and all(
            (out / f"{n}.jsonl").exists() for n in sources):
        log(f"curate: {out} is up to date, reused")
        return read_json(summary_file)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / STATE
    state = None
    if state_file.exists():
        with open(state_file, "rb") as f:
            state = pickle.load(f)  # our own file, written by this function
        if state.fingerprint != fp:
            state = None
        else:
            log(f"curate: resuming at {state.source or 'the next source'} after {state.line} records "
                f"({len(state.done)} source(s) done)")
    if state is None:
        state = _State(cfg, fp)
        for f in (out / "removed.jsonl", out / "contamination.jsonl"):
            f.unlink(missing_ok=True)
    _CFG, _INDEX, _QUALITY = cfg, index, quality
    _PERM = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme="affine32").permutations
    pool = mp.get_context("fork").Pool(cfg.workers) if cfg.workers > 1 else None
    removed = _open_at(out / "removed.jsonl", state.offsets["removed"])
    contam = _open_at(out / "contamination.jsonl", state.offsets["contamination"])
    base_seconds, since_save = state.seconds, 0
    try:
        for name, path in sources.items():
            if name in state.done:
                continue
            part = out / f"{name}.jsonl.part"
            if state.source != name:
                state.source, state.line, state.offsets["out"] = name, 0, 0
                state.stats[name] = {"read": 0, "kept": 0, "bytes_read": 0, "bytes_kept": 0, "removed": {}}
            st = state.stats[name]
            if not part.exists() and (out / f"{name}.jsonl").exists():  # killed between the rename and marking it done
                os.replace(out / f"{name}.jsonl", part)
            kept = _open_at(part, state.offsets["out"])
            bar = tqdm(desc=f"curating {name}", unit="doc", disable=not progress)
            for batch in _batches(path, state.line, BATCH):
                jobs = [(name, raw) for _, raw in batch]
                results = pool.map(_analyse, jobs, chunksize=max(1, len(jobs) // (4 * cfg.workers))) if pool \
                    else list(map(_analyse, jobs))
                for (lineno, raw), res in zip(batch, results):
                    _decide(state, st, cfg, name, f"{path}:{lineno}", lineno, raw, res, kept, removed, contam)
                state.line = batch[-1][0]
                bar.update(len(batch))
                since_save += len(batch)
                if since_save >= cfg.checkpoint_every:
                    state.seconds = base_seconds + time.time() - t0
                    _checkpoint(state, state_file, kept, removed, contam)
                    since_save = 0
            bar.close()
            kept.close()
            os.replace(part, out / f"{name}.jsonl")
            state.done.append(name)
            state.source, state.line = None, 0
            state.seconds = base_seconds + time.time() - t0
            _checkpoint(state, state_file, None, removed, contam)
            r = st["removed"]
            log(f"curate {name}: kept {st['kept']:,} of {st['read']:,}" + "".join(f"; {k} {v:,}" for k, v in sorted(r.items())))
    finally:
        if pool is not None:
            pool.terminate()
        removed.close()
        contam.close()
    seconds = base_seconds + time.time() - t0
    total = sum(s["read"] for s in state.stats.values())
    summary = {"fingerprint": fp, "config": cfg.model_dump(), "sources": {n: str(p) for n, p in sources.items()},
               "quality_sources": sorted(quality), "eval_items": index.items if index else 0,
               "per_source": state.stats, "seconds": round(seconds, 2),
               "docs_per_s": round(total / max(seconds, 1e-9), 1),
               "removed_file": str(out / "removed.jsonl"), "contamination_file": str(out / "contamination.jsonl")}
    atomic_write_json(summary_file, summary)
    state_file.unlink(missing_ok=True)
    return summary


def _open_at(path: Path, offset: int):
    """An output file cut back to what the last saved state covers, positioned at its end."""
    f = open(path, "a+b")
    f.truncate(offset)
    f.seek(0, os.SEEK_END)
    return f


BATCH = 1024  # records analysed per pool round (bounds memory: the input is streamed)


def _batches(path, after_line: int, size: int):
    """Lists of (line number, raw line) after `after_line`, blank lines skipped."""
    batch = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno > after_line and raw.strip():
                batch.append((lineno, raw))
                if len(batch) == size:
                    yield batch
                    batch = []
    if batch:
        yield batch


def _decide(state: _State, st: dict, cfg: CurationConfig, name: str, where: str, lineno: int, raw: bytes, res: dict,
            kept, removed, contam) -> None:
    """Keep or remove one record, in input order (the first copy of a duplicate is the one kept)."""
    rule, detail, near = None, None, None
    if "bad" in res:
        rule, detail = "malformed", res["bad"]
    elif cfg.exact_dedup and res["key"] in state.exact:
        rule = "exact_duplicate"
    elif res.get("contam"):  # before the quality rules: every contaminated record is listed as such
        rule, detail = "contaminated", {"item": res["contam"][0], "shared": res["contam"][1]}
    elif res.get("quality"):
        rule = res["quality"]
    else:
        near = _near(state, res.get("sig"), cfg)
        if near and near[0]:
            rule, detail = "near_duplicate", {"of": near[0][0], "jaccard": round(near[0][1], 3)}
    st["read"] += 1
    st["bytes_read"] += len(raw)
    if rule is None:
        if cfg.exact_dedup:  # only kept texts claim their key: a copy of a removed one is judged on its own
            state.exact.add(res["key"])
        if near:
            key = f"{name}:{lineno}"
            state.lsh.insert(key, near[1])
            state.sigs[key] = res["sig"]
        kept.write(raw if raw.endswith(b"\n") else raw + b"\n")
        st["kept"] += 1
        st["bytes_kept"] += len(raw)
        return
    st["removed"][rule] = st["removed"].get(rule, 0) + 1
    row = (json.dumps({"source": name, "where": where, "id": res.get("id"), "rule": rule, "detail": detail},
                      ensure_ascii=False) + "\n").encode("utf-8")
    removed.write(row)
    if rule == "contaminated":
        contam.write(row)


def _checkpoint(state: _State, state_file: Path, kept, removed, contam) -> None:
    for f in (kept, removed, contam):
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
    if kept is not None:
        state.offsets["out"] = kept.tell()
    state.offsets["removed"], state.offsets["contamination"] = removed.tell(), contam.tell()
    state.save(state_file)
