"""TOML in and out: reading with the standard library (tomli on Python 3.10), writing the
resolved study.toml with a small writer of vitexp's own (the standard library reads
TOML, it does not write it). Strings are escaped so that any text, control characters
included, reads back as it was written."""

from __future__ import annotations

import math
from pathlib import Path

from vitexp.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError


def loads(text: str) -> dict:
    return tomllib.loads(text)


def read_toml(path: Path, what: str) -> dict:
    """A TOML file as a dict, or one line saying why it cannot be read."""
    try:
        return loads(path.read_text(encoding="utf-8"))
    except TOMLDecodeError as e:
        raise UserError(f"{what} {path} is not valid TOML ({' '.join(str(e).split())}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({e.strerror}); check the path") from None


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return {math.inf: "inf", -math.inf: "-inf"}.get(v, "nan")
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_ESCAPES.get(c, c if c.isprintable() or c == " " else f"\\u{ord(c):04x}")
                             for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def _key(k: str) -> str:
    return k if k and k.replace("_", "").replace("-", "").isalnum() and k.isascii() else _value(k)


def dumps(d: dict) -> str:
    """Tables of scalars, lists and inline tables, nested tables one level deep."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    for name, table in d.items():
        if not isinstance(table, dict):
            continue
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if scalars or not subs:
            lines += ["", f"[{_key(name)}]"] + [f"{_key(k)} = {_value(v)}" for k, v in scalars.items()]
        for sub, inner in subs.items():
            lines += ["", f"[{_key(name)}.{_key(sub)}]"] + [f"{_key(k)} = {_value(v)}" for k, v in inner.items()]
    return "\n".join(lines).lstrip() + "\n"
