"""Decontamination: the evaluation items a pipeline scores on, indexed by their long character n-grams,
so that a training document sharing one with any of them is found (and removed by `curate`)."""

from __future__ import annotations

from pathlib import Path

from megatron_soaes.curation.rules import content
from megatron_soaes.utils.records import read_records, record_text, record_turns


class EvalIndex:
    """Every `n`-gram of every item's `content()`, and the items shorter than n (short questions) whole when
    at least `min_item` characters, found through their first `min_item` characters. `match(text)` names the
    first item a text overlaps and the shared span; one pass over the text either way."""

    def __init__(self, items, n: int, min_item: int):
        self.n, self.min_item, self.ngrams, self.short = n, min_item, {}, {}
        whole = {}
        for item_id, text in items:
            c = content(text)
            if len(c) >= n:
                for i in range(len(c) - n + 1):
                    self.ngrams.setdefault(c[i:i + n], item_id)
            elif len(c) >= min_item:
                whole.setdefault(c, item_id)
        for c, item_id in whole.items():
            self.short.setdefault(c[:min_item], []).append((c, item_id))
        self.items = len({*self.ngrams.values(), *whole.values()})
        self.whole = whole

    def match(self, text: str) -> tuple[str, str] | None:
        c, n, m = content(text), self.n, self.min_item
        for i in range(len(c) - m + 1):
            if len(c) - i >= n:
                hit = self.ngrams.get(c[i:i + n])
                if hit is not None:
                    return hit, c[i:i + n]
            for item, item_id in self.short.get(c[i:i + m], ()):
                if c.startswith(item, i):
                    return item_id, item
        return None


def text_of(record: dict, where: str = "record") -> str:
    """A corpus document's text, or a chat example's turns joined, in any shape the SFT reader takes
    (`utils.records.record_text`)."""
    return record_text(record, where)


def jsonl_items(path, tag: str | None = None):
    """(item id, text) of a corpus or chat file (any shape and format `utils.records` reads): documents
    whole; for chat examples each turn that is not a system prompt apart (a question alone, a reference
    answer alone)."""
    tag = tag or Path(path).name
    for n, (where, rec) in enumerate(read_records(path), 1):
        rid = f"{tag}#{rec.get('id', n) if isinstance(rec, dict) else n}"
        turns = record_turns(rec, where)
        if len(turns) == 1 and turns[0]["role"] == "document":
            yield rid, turns[0]["content"]
            continue
        for k, m in enumerate(turns):
            if m["role"] != "system" and m["content"]:
                yield f"{rid}/{m['role']}{k}", m["content"]
