"""Supervised fine-tuning data: chat records -> the tokenizer's chat format -> (packed) training rows.

Records: every shape `utils.records` reads (messages, ShareGPT conversations, Alpaca, ms-swift query/response),
from jsonl / json / parquet / an HF `datasets` directory.
Rendered in the tokenizer's `data.chat.ChatFormat` (ChatML ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
for Qwen, Llama 3's headers for Llama). The loss covers assistant content and its closing turn-end
token (so the model learns to stop), nothing else; optionally only
the last assistant turn. Packing puts several examples in one row; `segment_ids` keep them from
attending to each other and `position_ids` restart per example.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_soaes.data.chat import ChatTemplateError


from megatron_soaes.utils.records import ROLES, SFTDataError, read_records, to_messages  # noqa: F401  (their home)


@dataclass
class Template:
    default_system: str | None = "You are a helpful assistant."
    last_turn_only: bool = False

    def render(self, messages: list[dict], tok, for_generation: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and a per-token target mask (1: the model is trained to produce this token).

        for_generation: drop the final assistant turn and end with the assistant header (a prompt).
        """
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}] + messages
        if for_generation:
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            learn = set()
        else:
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            learn = {turns[-1]} if self.last_turn_only else set(turns)
        return tok.chat.render(messages, tok, learn, for_generation)


def example_hash(messages: list[dict]) -> int:
    return int.from_bytes(hashlib.sha1(json.dumps(messages, ensure_ascii=False).encode()).digest()[:8], "big") >> 1


@dataclass
class SFTExamples:
    ids: list[np.ndarray]
    mask: list[np.ndarray]
    hashes: list[int]
    stats: dict


def tokenize_files(files: list[tuple[str, int]], tok, seq_length: int, template: Template, truncation: str = "truncate",
                   strict: bool = True, progress: bool = True, extra: list[list[dict]] | None = None) -> SFTExamples:
    """Render every record of `files` ([(path, repeat)]) and `extra` message lists.

    Each example becomes seq_length + 1 tokens at most (inputs and shifted labels of one row).
    truncation: 'truncate' cuts the tail (dropping examples left without a target), 'drop' skips
    examples that do not fit. Bad records raise with file:line when strict, else are counted.
    """
    ids_l, mask_l, hashes = [], [], []
    stats = {"examples": 0, "tokens": 0, "target_tokens": 0, "truncated": 0, "dropped_too_long": 0,
             "dropped_no_target": 0, "bad_records": 0, "files": {}}
    limit = seq_length + 1

    def add(messages, where="extra example"):
        try:
            ids, mask = template.render(messages, tok)
        except ChatTemplateError as e:
            raise SFTDataError(f"{where}: {e}") from None
        if len(ids) > limit:
            if truncation == "drop":
                stats["dropped_too_long"] += 1
                return
            ids, mask = ids[:limit], mask[:limit]
            stats["truncated"] += 1
        if sum(mask[1:]) == 0:
            stats["dropped_no_target"] += 1
            return
        ids_l.append(np.asarray(ids, dtype=np.int32))
        mask_l.append(np.asarray(mask, dtype=np.uint8))
        hashes.append(example_hash(messages))
        stats["examples"] += 1
        stats["tokens"] += len(ids)
        stats["target_tokens"] += int(sum(mask[1:]))

    for path, repeat in files:
        n0 = stats["examples"]
        msgs = []
        for where, rec in tqdm(read_records(path), desc=f"tokenizing {Path(path).name}", disable=not progress,
                               unit="rec", leave=False):
            try:
                msgs.append((where, to_messages(rec, where)))
            except SFTDataError:
                if strict:
                    raise
                stats["bad_records"] += 1
        for _ in range(repeat):
            for where, m in msgs:
                add(m, where)
        stats["files"][str(path)] = stats["examples"] - n0
    for m in extra or []:
        add(m)
    return SFTExamples(ids_l, mask_l, hashes, stats)


def pack(ex: SFTExamples, seq_length: int, packing: bool = True, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows of `seq_length` inputs with shifted labels; first-fit-decreasing bin packing.

    Each example of n tokens contributes n - 1 (input, label) positions; labels never cross
    examples. segment_ids: 1, 2, ... per example in the row, 0 for padding.
    """
    lengths = [len(x) - 1 for x in ex.ids]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if packing else list(range(len(lengths)))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if packing:
            for b, r in enumerate(room):
                if r >= lengths[i]:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(seq_length - lengths[i])
        else:
            bins.append([i])
            room.append(seq_length - lengths[i])
    n = len(bins)
    out = {k: np.zeros((n, seq_length), dtype=np.int32) for k in ("tokens", "labels", "position_ids", "segment_ids")}
    out["tokens"][:] = pad_id
    out["loss_mask"] = np.zeros((n, seq_length), dtype=np.float32)
    out["example_hash"] = np.zeros((n, max((len(b) for b in bins), default=1)), dtype=np.int64)
    for r, b in enumerate(bins):
        at = 0
        for s, i in enumerate(b, 1):
            ids, mask, L = ex.ids[i], ex.mask[i], lengths[i]
            out["tokens"][r, at:at + L] = ids[:-1]
            out["labels"][r, at:at + L] = ids[1:]
            out["loss_mask"][r, at:at + L] = mask[1:]
            out["position_ids"][r, at:at + L] = np.arange(L)
            out["segment_ids"][r, at:at + L] = s
            out["example_hash"][r, s - 1] = ex.hashes[i]
            at += L
        out["position_ids"][r, at:] = np.arange(seq_length - at)  # padding: its own segment 0
    return out


def cached_pack(files, tok, seq_length: int, template: Template, cache_dir, truncation="truncate", packing=True,
                replay: tuple[list, float, int] | None = None, progress: bool = True) -> tuple[dict, dict]:
    """pack(tokenize_files(...)) cached on disk by content: the same inputs are never redone.

    replay: (earlier files [(path, repeat)], fraction, seed) -- add round(fraction * n) examples
    drawn from earlier stages' data (without replacement) before packing.
    """
    key = {"files": [[str(p), r, os.path.getsize(p) if Path(p).is_file() else 0,
                      os.path.getmtime(p)] for p, r in files],
           "tokenizer": tok.name, "chat": tok.chat.jinja(None), "seq": seq_length,
           "template": [template.default_system, template.last_turn_only],
           "truncation": truncation, "packing": packing,
           "replay": None if not replay else [[[str(p), r, os.path.getmtime(p)] for p, r in replay[0]], replay[1], replay[2]]}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"sft-{digest}.npz"
    if cache.exists():
        with np.load(cache) as z:
            rows = {k: z[k] for k in z.files if k != "stats"}
            stats = json.loads(str(z["stats"]))
        return rows, stats
    ex = tokenize_files(files, tok, seq_length, template, truncation, progress=progress)
    if replay and replay[1] > 0:
        old = tokenize_files(replay[0], tok, seq_length, template, truncation, progress=progress)
        k = min(len(old.ids), round(replay[1] * len(ex.ids)))
        pick = sorted(random.Random(replay[2]).sample(range(len(old.ids)), k))
        ex.ids += [old.ids[i] for i in pick]
        ex.mask += [old.mask[i] for i in pick]
        ex.hashes += [old.hashes[i] for i in pick]
        ex.stats["replayed_examples"] = k
    rows = pack(ex, seq_length, packing, tok.pad_id)
    stats = {**ex.stats, "rows": int(rows["tokens"].shape[0]),
             "fill": float(rows["loss_mask"].size and (rows["segment_ids"] > 0).mean())}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, stats=np.array(json.dumps(stats)), **rows)
    os.replace(tmp, cache)
    return rows, stats


class PackedSFTDataset:
    """Rows in a fresh seeded order each epoch; index i is global (epoch = i // rows)."""

    global_index = True

    def __init__(self, rows: dict, seed: int, shuffle: bool = True):
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.n = int(rows["tokens"].shape[0])
        self._perm = {}

    def __len__(self) -> int:
        return self.n

    def row(self, i: int) -> int:
        epoch, j = divmod(int(i), self.n)
        if not self.shuffle:
            return j
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n)}
        return int(self._perm[epoch][j])

    def __getitem__(self, i: int) -> dict:
        r = self.row(i)
        return {k: self.rows[k][r] for k in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids")}
