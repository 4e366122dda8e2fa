"""Chat and corpus records, read one way everywhere (SFT data, curation, decontamination, evaluation):

  {"text": ...}                                                                     (a corpus document)
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}      (multi-turn)
  {"instruction": ..., "input": ..., "output": ..., "system"?: ...}                 (Alpaca)
  {"system"?: ..., "query": ..., "response": ..., "history"?: [[q, a], ...]}        (ms-swift)
  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}         (ShareGPT)

in jsonl / json / parquet / an HF `datasets` directory. A bad record is an `SFTDataError` naming its file and
line."""

from __future__ import annotations

import json
from pathlib import Path


class SFTDataError(ValueError):
    pass


ROLES = ("system", "user", "assistant")
_SHAREGPT = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(rec: dict, where: str) -> list[dict]:
    if not isinstance(rec, dict):
        raise SFTDataError(f"{where}: record is not an object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise SFTDataError(f"{where}: messages must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise SFTDataError(f"{where}: messages[{i}] needs role in {ROLES} and string content")
            out.append({"role": m["role"], "content": m["content"]})
    elif "conversations" in rec:
        out = []
        for i, m in enumerate(rec["conversations"]):
            role = _SHAREGPT.get(m.get("from")) if isinstance(m, dict) else None
            if role is None or not isinstance(m.get("value"), str):
                raise SFTDataError(f"{where}: conversations[{i}] needs from in {list(_SHAREGPT)} and string value")
            out.append({"role": role, "content": m["value"]})
    elif "instruction" in rec and "output" in rec:
        prompt = rec["instruction"] + (("\n" + rec["input"]) if rec.get("input") else "")
        out = ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": rec["output"]}]
    elif "query" in rec and "response" in rec:
        out = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
        for pair in rec.get("history") or []:
            out += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        out += [{"role": "user", "content": rec["query"]}, {"role": "assistant", "content": rec["response"]}]
    else:
        raise SFTDataError(f"{where}: unknown record shape (keys {sorted(rec)[:6]}); expected messages, "
                           "conversations, instruction/output or query/response")
    for m in out:
        if not isinstance(m["content"], str):
            raise SFTDataError(f"{where}: non-string content in a {m['role']} turn")
    if not any(m["role"] == "assistant" for m in out):
        raise SFTDataError(f"{where}: no assistant turn to learn from")
    return out


def read_records(path: str | Path):
    """Yield (where, record) with `where` = 'file:line' (or 'file:row')."""
    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # DatasetDict: take the train split
            ds = ds["train"]
        for i, rec in enumerate(ds):
            yield f"{path}:row {i}", rec
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", rec
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        for i, rec in enumerate(data):
            yield f"{path}:item {i}", rec
    else:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise SFTDataError(f"{path}:{n}: not valid UTF-8") from None
                except json.JSONDecodeError as e:
                    raise SFTDataError(f"{path}:{n}: malformed JSON ({e.msg})") from None


def record_turns(rec: dict, where: str) -> list[dict]:
    """A chat record's turns (any shape `to_messages` takes), or a corpus document as one turn."""
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return [{"role": "document", "content": rec["text"]}]
    return to_messages(rec, where)


def record_text(rec: dict, where: str) -> str:
    """A document's text, or a chat record's turns joined without system prompts (shared by every example
    of a set, they would make unrelated examples look alike)."""
    return "\n".join(m["content"] for m in record_turns(rec, where) if m["role"] != "system")
