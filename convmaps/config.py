"""Config files for `convmaps run`: every `dump` (or `filters`) option from TOML, checked.

    model = "alexnet"
    inputs = ["photos/"]
    layers = "0,3"
    kernels = "3"
    dtype = "float16"

Keys are DumpOptions' field names (`batch_size` or `batch-size`). A file that says
`command = "filters"` runs `convmaps filters` instead, with FilterOptions' fields. Relative
paths are taken from the current folder, as on the command line.
"""

from __future__ import annotations

import tomllib
import types
import typing
from enum import StrEnum
from pathlib import Path
from typing import Any

from convmaps.errors import ConvmapsError
from convmaps.options import DumpOptions, FilterOptions

__all__ = ["COMMANDS", "load_config", "options_from"]

# The commands a config can run, by its `command` key (default: dump).
COMMANDS: dict[str, type[DumpOptions] | type[FilterOptions]] = {
    "dump": DumpOptions, "filters": FilterOptions,
}

# Size options: a string such as "8GB" or an integer number of bytes.
_SIZES = frozenset({"max_bytes", "chunk_bytes"})


def _allowed(hint: Any) -> tuple[tuple[type, ...], type | None, str]:
    """(accepted TOML value types, list item type or None, words for an error)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    args = tuple(a for a in args if a is not type(None))
    if typing.get_origin(args[0]) is list:
        return (list,), typing.get_args(args[0])[0], "a list of strings"
    if isinstance(args[0], type) and issubclass(args[0], StrEnum):
        return (str,), None, "one of " + ", ".join(m.value for m in args[0])
    words = {str: "a string", int: "an integer", bool: "true or false"}
    return tuple(args), None, " or ".join(words.get(a, a.__name__) for a in args)


def _check_size(path: Path, key: str, value: Any) -> str:
    """A size option (`max_bytes = "8GB"` or a whole number of bytes), checked now so that the
    error names the file; kept as the string the option's field holds."""
    from convmaps.io.store import parse_bytes  # here: store imports torch, this module does not

    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConvmapsError(f"{path}: {key} must be a size such as \"8GB\" or a whole number "
                            f"of bytes, not {value!r}")
    try:
        parse_bytes(value)
    except ConvmapsError as e:
        raise ConvmapsError(f"{path}: {key}: {e}") from None
    return str(value)


def _check(path: Path, key: str, value: Any, hint: Any) -> Any:
    if key.replace("-", "_") in _SIZES:
        return _check_size(path, key, value)
    accepted, item, words = _allowed(hint)
    # TOML's true is not an integer here, whatever Python's bool subclassing says.
    ok = isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
    if ok and item is not None:
        ok = all(isinstance(v, item) for v in value)
    base = typing.get_args(hint)[0] if isinstance(hint, types.UnionType) else hint
    if ok and isinstance(base, type) and issubclass(base, StrEnum):
        ok = value in base.__members__
        value = base(value) if ok else value
    if not ok:
        raise ConvmapsError(f"{path}: {key} must be {words}, not {value!r}")
    return value


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8, whatever the locale
    except UnicodeDecodeError as e:
        raise ConvmapsError(f"{path} is not UTF-8 text, as TOML must be: byte "
                            f"0x{e.object[e.start]:02x} at offset {e.start}") from e
    except OSError as e:
        raise ConvmapsError(f"cannot read config {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConvmapsError(f"{path} is not valid TOML: {e}") from e


def _parse(path: Path) -> tuple[str, dict[str, Any]]:
    """(command, validated options) of a config file."""
    data = _read(path)
    command = data.pop("command", "dump")
    if not isinstance(command, str) or command not in COMMANDS:
        raise ConvmapsError(f"{path}: command must be one of {', '.join(COMMANDS)}, "
                            f"not {command!r}")
    hints = typing.get_type_hints(COMMANDS[command])
    out: dict[str, Any] = {}
    raws: dict[str, str] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in hints or key == "config":
            known = ", ".join(sorted(["command", *hints.keys() - {"config"}]))
            raise ConvmapsError(f"{path}: unknown key {raw_key!r}; known keys: {known}")
        if key in out:
            raise ConvmapsError(f"{path}: {raws[key]!r} and {raw_key!r} name one option; "
                                "keep one")
        raws[key] = raw_key
        out[key] = _check(path, raw_key, value, hints[key])
    return command, out


def load_config(path: str | Path) -> dict[str, Any]:
    """The options a TOML file sets, validated against its command's fields (without the
    `command` key itself); unknown keys and wrong types are errors naming the key and file."""
    return _parse(Path(path))[1]


def options_from(path: str | Path, overrides: dict[str, Any]) -> DumpOptions | FilterOptions:
    """The options of a config file's command, with command-line `overrides` on top."""
    path = Path(path)
    command, values = _parse(path)
    kind = COMMANDS[command]
    extra = [k for k in overrides if k not in typing.get_type_hints(kind)]
    if extra:
        flags = ", ".join("INPUT" if k == "inputs" else f"--{k.replace('_', '-')}" for k in extra)
        raise ConvmapsError(f"{flags}: not an option of `convmaps {command}`, which {path} runs")
    values.update(overrides)
    options = kind(**values)
    options.config = str(path)
    return options
