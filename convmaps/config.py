"""Config files for `convmaps run`: a command's options from TOML, checked.

    model = "alexnet"
    inputs = ["photos/"]
    layers = "0,3"
    kernels = "3"
    dtype = "float16"

Keys are the options' field names (`batch_size` or `batch-size`) of the file's `command`
(default `dump`; also `filters`, `project`, `topk`, `occlude`, `invariance`, `explain`,
`report`). A file
of several commands lists them as `[[job]]` tables, in order; its top-level keys are shared by
every step whose command has that option (each must fit one at least):

    model = "alexnet"
    out = "zf"
    [[job]]
    command = "topk"
    k = 9
    [[job]]
    command = "report"

Relative paths are taken from the current folder, as on the command line.
"""

from __future__ import annotations

import tomllib
import types
import typing
from enum import StrEnum
from pathlib import Path
from typing import Any

from convmaps.errors import ConvmapsError
from convmaps.options import (
    DumpOptions,
    ExplainOptions,
    FilterOptions,
    InvarianceOptions,
    OccludeOptions,
    ProjectOptions,
    ReportOptions,
    TopkOptions,
)

__all__ = ["COMMANDS", "load_config", "options_from", "steps_from"]

Options = DumpOptions | FilterOptions | ProjectOptions | TopkOptions | OccludeOptions \
    | InvarianceOptions | ExplainOptions | ReportOptions

# The commands a config can run, by its `command` key (default: dump).
COMMANDS: dict[str, type[Options]] = {
    "dump": DumpOptions, "filters": FilterOptions, "project": ProjectOptions,
    "topk": TopkOptions, "occlude": OccludeOptions, "invariance": InvarianceOptions,
    "explain": ExplainOptions, "report": ReportOptions,
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


def _command(path: Path, data: dict[str, Any], default: str | None) -> str:
    command = data.pop("command", default)
    if not isinstance(command, str) or command not in COMMANDS:
        raise ConvmapsError(f"{path}: command must be one of {', '.join(COMMANDS)}, "
                            f"not {command!r}")
    return command


def _parse(path: Path) -> tuple[str, dict[str, Any]]:
    """(command, validated options) of a one-command config file."""
    data = _read(path)
    if "job" in data:
        raise ConvmapsError(f"{path} runs several commands ([[job]] tables): use "
                            "`convmaps run`, which runs each")
    command = _command(path, data, "dump")
    return command, _validated(path, command, data)


def _validated(path: Path, command: str, data: dict[str, Any]) -> dict[str, Any]:
    """`data` checked as `command`'s options: known keys, right types, each option once."""
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
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """The options a TOML file sets, validated against its command's fields (without the
    `command` key itself); unknown keys and wrong types are errors naming the key and file."""
    return _parse(Path(path))[1]


def options_from(path: str | Path, overrides: dict[str, Any]) -> Options:
    """The options of a one-command config file, with command-line `overrides` on top."""
    path = Path(path)
    command, values = _parse(path)
    return _options(path, [(command, values)], overrides)[0]


def steps_from(path: str | Path, overrides: dict[str, Any]) -> list[Options]:
    """The options of every command a config file runs, in order (one, or its `[[job]]`
    tables with the top-level keys they share), with command-line `overrides` on top of each
    step that has the option."""
    path = Path(path)
    data = _read(path)
    if "job" not in data:
        return [options_from(path, overrides)]
    steps = data.pop("job")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) for s in steps):
        raise ConvmapsError(f"{path}: job must be a list of [[job]] tables, one per command")
    if "command" in data:
        raise ConvmapsError(f"{path}: a file of [[job]] tables names each step's command in "
                            "its table, not at the top")
    commands = [_command(path, step, None) for step in steps]
    for key in data:  # shared keys: each must be an option of some step
        if not any(key.replace("-", "_") in typing.get_type_hints(COMMANDS[c]) for c in commands):
            raise ConvmapsError(f"{path}: {key!r} is an option of none of its commands "
                                f"({', '.join(commands)})")
    parsed = []
    for command, step in zip(commands, steps, strict=True):
        hints = typing.get_type_hints(COMMANDS[command])
        shared = {k: v for k, v in data.items() if k.replace("-", "_") in hints}
        clash = [k for k in step if k in shared or k.replace("-", "_") in shared]
        values = _validated(path, command, {**{k: v for k, v in shared.items()
                                              if k not in clash}, **step})
        parsed.append((command, values))
    return _options(path, parsed, overrides)


def _options(path: Path, parsed: list[tuple[str, dict[str, Any]]], overrides: dict[str, Any]
             ) -> list[Options]:
    """Each step's options object, command-line `overrides` applied where the step has them;
    an override no step takes is an error."""
    hints = [typing.get_type_hints(COMMANDS[c]) for c, _ in parsed]
    extra = [k for k in overrides if not any(k in h for h in hints)]
    if extra:
        flags = ", ".join("INPUT" if k == "inputs" else f"--{k.replace('_', '-')}" for k in extra)
        names = " or ".join(f"`convmaps {c}`" for c, _ in parsed)
        raise ConvmapsError(f"{flags}: not an option of {names}, which {path} runs")
    out = []
    for (command, values), h in zip(parsed, hints, strict=True):
        options = COMMANDS[command](**{**values, **{k: v for k, v in overrides.items() if k in h}})
        if "config" in h:
            options.config = str(path)  # type: ignore[union-attr]
        out.append(options)
    return out
