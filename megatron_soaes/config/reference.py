"""The configuration reference, generated from the typed config models themselves: every field's dotted
path, type, default and the comment written beside it in the source (a section's docstring heads its
table). The docs site renders it (`docs/hooks.py`) and a test fails when a field has no comment, so the
reference cannot fall behind the code."""

from __future__ import annotations

import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

# the config files a user writes, in the order the manual presents them
ROOTS = {
    "Job (`soaes train`, `soaes sft`, `soaes distill`)": "megatron_soaes.config.job:JobConfig",
    "Curriculum (`soaes sft --curriculum`)": "megatron_soaes.config.curriculum:Recipe",
    "Pipeline (`soaes pipeline`)": "megatron_soaes.config.pipeline:PipelineConfig",
    "Curation (`soaes curate`)": "megatron_soaes.config.curation:CurationConfig",
}


@dataclass
class Row:
    path: str  # dotted, as in YAML and --set
    type: str
    default: str
    doc: str  # the source comment ("" when there is none)
    owner: str  # the class that declares it


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: comment} from `cls`'s own source: the comment on the field's line, after the comment lines
    directly above it."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    out = {}
    lines = src.splitlines()
    for i, line in enumerate(lines, 1):
        name = line.strip().split(":", 1)[0]
        if name not in cls.__annotations__ or not line.startswith(" " * 4) or line.startswith(" " * 5):
            continue
        above, j = [], i - 1
        while j in comments and j not in code_lines:
            above.insert(0, comments[j])
            j -= 1
        parts = above + ([comments[i]] if i in comments else [])
        out[name] = " ".join(p for p in parts if p)
    return out


def _models(annotation) -> list[type[BaseModel]]:
    """The config sections a field's type holds (X, X | None, list[X], dict[str, X])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        return [m for a in typing.get_args(annotation) for m in _models(a)]
    return []


def _type_name(annotation) -> str:
    s = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    s = s or str(annotation)
    return s.replace("typing.", "").replace("NoneType", "None").replace("megatron_soaes.config.", "")


def _default(info) -> str:
    if info.default_factory is not None:
        try:
            v = info.default_factory()
        except TypeError:
            return "(computed)"
        return "(section)" if isinstance(v, BaseModel) else repr(v)
    return "required" if info.default is PydanticUndefined else repr(info.default)


def rows(model: type[BaseModel], prefix: str = "", stop: tuple = ()) -> list[Row]:
    """Every field of `model` and of the sections it holds, depth first; sections of a type in `stop`
    (another file's root, documented there) are one row."""
    out = []
    for name, info in model.model_fields.items():
        owner = next(c for c in model.__mro__ if name in getattr(c, "__annotations__", {}))
        path = f"{prefix}{name}"
        patched = getattr(model, "__patch_of__", None)  # a stage's patch: the section's own comments
        doc = info.description or field_comments(patched or owner).get(name, "")
        subs = [m for m in _models(info.annotation) if m is not model]
        if subs and not doc:
            doc = _summary(subs[0])
        out.append(Row(path, _type_name(info.annotation), _default(info), doc, owner.__name__))
        for sub in subs:
            if sub not in stop:
                out += rows(sub, f"{path}.", stop)
    return out


def load(target: str) -> type[BaseModel]:
    import importlib

    mod, _, name = target.partition(":")
    return getattr(importlib.import_module(mod), name)


def _summary(cls: type) -> str:
    """The first paragraph of the class's own docstring (not one it inherits)."""
    doc = cls.__dict__.get("__doc__") or ""
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ") if doc else ""


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """The whole reference: a table per config file."""
    md, roots = [], {t: load(target) for t, target in ROOTS.items()}
    for title, model in roots.items():
        others = tuple(m for m in roots.values() if m is not model)
        md += [f"## {title}", "", _summary(model), "",
               "| field | type | default | what it does |", "|---|---|---|---|"]
        md += [f"| `{r.path}` | `{_cell(r.type)}` | `{_cell(r.default)}` | {_cell(r.doc)} |" for r in rows(model, stop=others)]
        md.append("")
    return "\n".join(md)
