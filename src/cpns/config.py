"""Configuration files: TOML with environment overrides (DESIGN §7).

Each program keeps a frozen dataclass of settings. :func:`load_settings` reads the
program's TOML file, then applies ``CPNS_<PROGRAM>_<FIELD>`` environment variables, and
validates every value with a clear :class:`~cpns.errors.ConfigurationError`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cpns.errors import ConfigurationError

__all__ = ["dump_toml", "load_settings"]


def _coerce(name: str, raw: object, default: object) -> object:
    """Convert a TOML or environment value to the type of the field's default."""
    if isinstance(default, bool):
        if isinstance(raw, str):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
        elif isinstance(raw, bool):
            return raw
    elif isinstance(default, int):
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                pass
    elif isinstance(default, tuple):
        if isinstance(raw, str):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return tuple(raw)
    elif isinstance(default, Path) or default is None:
        if isinstance(raw, str):
            return Path(raw) if isinstance(default, Path) else raw
    elif isinstance(default, str):
        if isinstance(raw, str):
            return raw
    raise ConfigurationError(f"setting {name!r}: invalid value {raw!r}")


def load_settings[T](
    cls: type[T], path: Path | None, *, env_prefix: str, base: Mapping[str, Any] | None = None
) -> T:
    """Build ``cls`` from defaults, then ``base``, then the TOML file, then the environment."""
    assert dataclasses.is_dataclass(cls)
    values: dict[str, Any] = dict(base or {})
    if path is not None and path.exists():
        try:
            values.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{path}: not valid TOML ({exc})") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigurationError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    for name in fields:
        env = os.environ.get(f"{env_prefix}{name.upper()}")
        if env is not None:
            values[name] = env
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in values:
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        kwargs[name] = _coerce(name, values[name], default)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from None


def dump_toml(values: Mapping[str, object]) -> str:
    """Write a flat mapping of str, int, bool, Path and tuple-of-str values as TOML."""
    lines = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, tuple | list):
            text = "[" + ", ".join(_quote(str(v)) for v in value) + "]"
        else:
            text = _quote(str(value))
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
