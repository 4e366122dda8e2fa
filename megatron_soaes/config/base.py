"""What every config schema shares: strict sections, one error type, YAML loading with `--set`
overrides, and typed patches (`replace`, `partial`) so a stage or a phase is a validated copy of a
job, never a merged dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

TEMPLATE = {"template": True}  # validation context: a job with its run-specific fields still open


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and field."""


class StrictModel(BaseModel):
    """Config sections reject unknown keys."""

    model_config = ConfigDict(extra="forbid")


def is_template(info) -> bool:
    return bool(info.context and info.context.get("template"))


def _format(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        line = f"{loc}: {msg}" if loc else msg
        lines.append(f"{source}: {line}" if source else line)
    return ("\n" if source else "; ").join(lines)


def parse_config(data: dict, source: str = "config", model=None, template: bool = False):
    """Validate `data` as `model` (default JobConfig); every problem in one ConfigError."""
    if model is None:
        from megatron_soaes.config.job import JobConfig as model
    try:
        return model.model_validate(data, context=TEMPLATE if template else None)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def read_yaml(path: str | Path, overrides: list[str] | None = None) -> dict:
    """YAML as a dict, with ``a.b.c=value`` overrides applied (values parsed as YAML)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    return apply_overrides(data, overrides)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """``a.b.c=value`` overrides (values parsed as YAML) applied to a config dict in place."""
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=10")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, model=None, template: bool = False):
    """Read YAML as `model` (default JobConfig); `overrides` like ``train.steps=10`` are applied first."""
    return parse_config(read_yaml(path, overrides), str(path), model, template)


def replace(section: BaseModel, /, **changes):
    """A validated copy of `section` with some fields replaced (dataclasses.replace for configs)."""
    fields = {k: getattr(section, k) for k in type(section).model_fields if k in section.model_fields_set or k in changes}
    try:
        return type(section)(**{**fields, **changes})
    except ValidationError as e:
        raise ConfigError(_format(e, type(section).__name__)) from None


_PARTIALS: dict[type, type] = {}


def partial(section: type[BaseModel]) -> type[BaseModel]:
    """The patch type of a section: the same fields, each optional; only the fields set are applied."""
    if section not in _PARTIALS:
        fields = {k: (Optional[f.annotation], None) for k, f in section.model_fields.items()}
        _PARTIALS[section] = create_model(f"{section.__name__}Patch", __base__=StrictModel, **fields)
        _PARTIALS[section].__patch_of__ = section  # its fields mean what the section's do (config.reference)
    return _PARTIALS[section]


def apply(section: BaseModel, patch: BaseModel | None, **changes):
    """`section` with the fields `patch` sets (and `changes`) replaced, validated as `section`'s type."""
    updates: dict[str, Any] = patch.model_dump(exclude_unset=True) if patch is not None else {}
    return replace(section, **{**updates, **changes})
