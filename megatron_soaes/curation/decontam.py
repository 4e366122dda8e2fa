"""Decontamination: the evaluation items a pipeline scores on, indexed by their long character n-grams,
so that a training document sharing one with any of them is found (and removed by `curate`)."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_soaes.curation.rules import content


class EvalIndex:
    """Every `n`-gram of every item's `content()` (items shorter than n: the whole item, when at least
    `min_item` characters). `match(text)` names the first item a text overlaps and the shared span."""

    def __init__(self, items, n: int, min_item: int):
        self.n, self.ngrams, self.whole = n, {}, {}
        for item_id, text in items:
            c = content(text)
            if len(c) >= n:
                for i in range(len(c) - n + 1):
                    self.ngrams.setdefault(c[i:i + n], item_id)
            elif len(c) >= min_item:
                self.whole.setdefault(c, item_id)
        self.lengths = sorted({len(c) for c in self.whole})
        self.items = len({*self.ngrams.values(), *self.whole.values()})

    def match(self, text: str) -> tuple[str, str] | None:
        c = content(text)
        for n, table in ((self.n, self.ngrams), *((m, self.whole) for m in self.lengths)):
            if not table:
                continue
            for i in range(len(c) - n + 1):
                hit = table.get(c[i:i + n])
                if hit is not None:
                    return hit, c[i:i + n]
        return None


def text_of(record: dict) -> str:
    """A corpus document's text, or an SFT example's turns joined (system prompts left out: shared by
    every example of a set, they would make unrelated examples look alike)."""
    if "text" in record:
        return record["text"]
    return "\n".join(m.get("content") or "" for m in record["messages"] if m.get("role") != "system")


def jsonl_items(path, tag: str | None = None):
    """(item id, text) of a jsonl corpus or SFT file: documents whole; for SFT examples each turn that is
    not a system prompt apart (a question alone, a reference answer alone)."""
    tag = tag or Path(path).name
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            rec = json.loads(line)
            rid = f"{tag}#{rec.get('id', n)}"
            if "messages" in rec:
                for k, m in enumerate(rec["messages"]):
                    if m.get("role") != "system" and m.get("content"):
                        yield f"{rid}/{m['role']}{k}", m["content"]
            else:
                yield rid, rec["text"]
