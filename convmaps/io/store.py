"""Store: atomic files, a streaming safetensors writer, metadata and the manifest.

safetensors' own `save_file` needs every tensor in memory at once; kernel maps of a VGG layer
do not fit that. `write_safetensors` writes the published format itself (8-byte little-endian
header length, a JSON header padded with spaces to 8 bytes, then the raw little-endian data in
header order) from an iterator of chunks, so peak memory is one chunk.

    >>> import torch, tempfile, os
    >>> from safetensors import safe_open
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> save_tensors(path, {"a": torch.arange(6.).reshape(2, 3)}, {"model": "demo"})
    >>> with safe_open(path, "pt") as f:
    ...     f.get_tensor("a").tolist(), f.metadata()
    ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], {'model': 'demo'})
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from decimal import Decimal, Overflow, localcontext
from io import BufferedReader
from pathlib import Path, PurePosixPath
from typing import IO, Any

import torch

from convmaps.errors import ConvmapsError, WriteError, file_kind
from convmaps.io.layout import temp_name

__all__ = [
    "TensorSpec",
    "atomic_write",
    "check_regular",
    "fsync_dir",
    "link_or_copy",
    "locked",
    "open_regular",
    "parse_bytes",
    "png_complete",
    "read_metadata",
    "save_tensors",
    "symlink_under",
    "write_bytes",
    "write_json",
    "write_safetensors",
]

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object], sync: bool = True
                 ) -> None:
    """Write a file through `write(f)` into a temporary file in the same folder, then rename it
    over `path`: a process that is killed leaves the old file or the whole new one, never a
    partial one. `sync` also fsyncs it before the rename, so that a power cut cannot leave a
    renamed but empty file either. A dump writes its per-image files without it (waiting for
    the disk made it 15-30% slower than a script that writes to the page cache) and instead
    checks every file's completeness when it resumes.

    Raises:
        WriteError: the disk is full or the folder is not writable; no temporary file remains.
    """
    path = Path(path)
    tmp = path.with_name(temp_name(path.name, os.getpid()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with suppress(OSError):
            tmp.unlink()
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise WriteError(f"could not write {path}: {reason}") from e
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def fsync_dir(folder: str | Path) -> None:
    """Make the renames into `folder` durable (a rename is an update of its directory)."""
    with suppress(OSError):  # some filesystems cannot open or sync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def open_regular(path: str | Path) -> BufferedReader:
    """Open a file convmaps reads back, refusing anything but a regular file (a symlink to one
    is fine): opening a FIFO blocks until someone writes to it, and a device never ends.

    Raises:
        OSError: the path is missing or unreadable, or is no regular file (`strerror` says
            what it is instead).
    """
    _refuse(os.stat(path).st_mode, path)  # before the open: a device is never even opened
    # O_NONBLOCK: should a FIFO take the file's place after the stat, the open returns at once
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        _refuse(os.fstat(fd).st_mode, path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | Path) -> None:
    """`open_regular`'s check, for readers that take a path (safetensors, torch)."""
    open_regular(path).close()


def _refuse(mode: int, path: str | Path) -> None:
    if not stat.S_ISREG(mode):
        raise OSError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL,
                      f"not a regular file but {file_kind(mode)}", str(path))


# link() fails so where the file system has no hard links or forbids this one: copy instead
_NO_LINK = frozenset(getattr(errno, n) for n in ("EXDEV", "EPERM", "EACCES", "EMLINK", "ENOTSUP",
                                                  "EOPNOTSUPP", "ENOSYS") if hasattr(errno, n))


def link_or_copy(root: Path, rel: str, dst: Path, link: bool = True) -> bool:
    """Put the regular file `root/rel` at the new name `dst`: a hard link (no bytes copied), or
    a copy where the file system makes none (another device, no hard links: EXDEV, EPERM, …)
    or `link` is False. Nothing is followed: neither the file nor a folder on its way from
    `root` may be a symlink, so nothing outside `root` is ever published. Returns whether it
    linked.

    Raises:
        OSError: the file is missing, outside `root`, a symlink or no regular file
            (`strerror` says which), or changed while it was linked.
        WriteError: the copy could not be written.
    """
    src = root
    for part in PurePosixPath(rel).parts:
        if part in ("/", ".", ".."):
            raise OSError(errno.EINVAL, f"not a path inside {root}", rel)
        src = src / part
        if stat.S_ISLNK(os.lstat(src).st_mode):
            raise OSError(errno.ELOOP, "a symlink (nothing is copied through one)", str(src))
    before = os.lstat(src)
    _refuse(before.st_mode, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
        else:  # the very file checked above, not one put in its place since
            after = os.lstat(dst)
            if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
                return True
            dst.unlink()
            raise OSError(errno.EAGAIN, "replaced while it was linked", str(src))
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(fd)
        _refuse(now.st_mode, src)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise OSError(errno.EAGAIN, "replaced while it was copied", str(src))
        os.set_blocking(fd, True)
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out), sync=False)
    return False


def write_bytes(path: str | Path, data: bytes, sync: bool = True) -> None:
    atomic_write(path, lambda f: f.write(data), sync)


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Deterministic JSON (no timestamps; key order as given), streamed: a top-level list of
    records (a manifest's inputs, its layer table) is written one record a line, compactly,
    so that a manifest of a million images is neither a billion bytes of indentation nor
    a second copy of itself in memory."""

    def chunks() -> Iterator[str]:
        yield "{"
        for n, (key, value) in enumerate(obj.items()):
            yield ("," if n else "") + "\n " + json.dumps(key, ensure_ascii=False) + ": "
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                for i, record in enumerate(value):
                    yield ("[" if i == 0 else ",") + "\n  " + _dumps(record)
                yield "\n ]"
            else:  # JSON strings hold no raw newline: re-indenting is safe
                yield json.dumps(value, indent=1, ensure_ascii=False).replace("\n", "\n ")
        yield "\n}\n"

    def write(f: IO[bytes]) -> None:
        buffer: list[str] = []
        size = 0
        for chunk in chunks():
            buffer.append(chunk)
            size += len(chunk)
            if size > 1 << 20:
                f.write("".join(buffer).encode())
                buffer, size = [], 0
        f.write("".join(buffer).encode())

    atomic_write(path, write)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, known before its data is computed."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def _header(specs: Iterable[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.name in entries or spec.name == "__metadata__":
            raise ValueError(f"duplicate tensor name {spec.name!r}")
        if spec.dtype not in _DTYPES:
            raise ValueError(f"safetensors cannot store {spec.dtype}")
        entries[spec.name] = {
            "dtype": _DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def _raw(t: torch.Tensor) -> memoryview:
    # Reinterpreting as bytes works for every dtype, bfloat16 included (numpy has none).
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def write_safetensors(path: str | Path, specs: list[TensorSpec],
                      chunks: Iterable[tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str] | None = None, sync: bool = True) -> None:
    """Stream a safetensors file: header from `specs`, then data from `chunks`.

    `chunks` yields `(name, tensor)` in spec order; a tensor may arrive in several consecutive
    chunks split along its first dimension. Each chunk's dtype must match its spec, and the
    bytes written must add up exactly, or nothing is written.
    """
    if sys.byteorder != "little":  # the format is little-endian; so are all torch platforms
        raise WriteError("safetensors writing needs a little-endian machine")

    def write(f: IO[bytes]) -> None:
        f.write(_header(specs, metadata or {}))
        pending = iter(specs)
        spec: TensorSpec | None = None
        left = 0
        for name, t in chunks:
            if left == 0:
                spec = next(pending, None)
                if spec is None:
                    raise ValueError(f"unexpected chunk for {name!r} after the last tensor")
                left = spec.nbytes
            assert spec is not None
            if name != spec.name or t.dtype != spec.dtype:
                raise ValueError(f"chunk {name!r} {t.dtype} does not match {spec}")
            data = _raw(t)
            if data.nbytes > left:
                raise ValueError(f"chunks for {name!r} exceed its shape {spec.shape}")
            f.write(data)
            left -= data.nbytes
            if left == 0:
                spec = None
        rest = [s.name for s in pending if s.nbytes]
        if left or rest:
            raise ValueError(f"missing data for {(spec.name if spec else '')} {rest}")

    atomic_write(path, write, sync)


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None, sync: bool = True) -> None:
    """Write a whole dict of tensors (key order kept) atomically as safetensors."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    write_safetensors(path, specs, tensors.items(), metadata, sync)


def read_metadata(path: str | Path) -> dict[str, str] | None:
    """The `__metadata__` of a safetensors file from its header alone; None if the file is
    missing, no regular file, or not a complete safetensors file."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:  # a foreign file under our name: never read a bogus length
                return None
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, struct.error, ValueError, AttributeError, KeyError, TypeError, IndexError):
        return None
    if size != 8 + n + max(ends, default=0):
        return None
    meta = header.get("__metadata__", {})
    return meta if isinstance(meta, dict) else None


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with


def png_complete(path: str | Path) -> bool:
    """Whether a PNG file is there (a regular file) and ends with its IEND chunk (a file cut
    short does not)."""
    try:
        with open_regular(path) as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < len(_PNG_END):
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
    except OSError:
        return False


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


_MAX_BYTES = 2**63 - 1  # what an int64 byte count holds; anything larger is a typo


def parse_bytes(text: str | int) -> int:
    """`"500MB"`, `"2GiB"`, `"1e9"` or an int -> bytes, at least 1 and at most 2**63 - 1.

    Raises:
        ConvmapsError: text that is no size, or a size below 1 byte, infinite or too large.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if 1 <= text <= _MAX_BYTES:
            return text
        raise ConvmapsError(f"size {text!r} is out of range; give 1 to {_MAX_BYTES} bytes")
    hint = "write e.g. 500MB, 8GB or 2GiB"
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in _UNITS:
        raise ConvmapsError(f"size {text!r} not understood; {hint}")
    # Decimal, not float: exact for any digits, and "1e999" is a number, not inf.
    with localcontext() as ctx:
        ctx.traps[Overflow] = False  # "1e999999999" is past Decimal's exponents: Infinity
        value = Decimal(m[1]) * _UNITS[m[2].lower()]
    if value >= _MAX_BYTES + 1:
        raise ConvmapsError(f"size {text!r} is too large (at most {_MAX_BYTES} bytes); {hint}")
    if value < 1:
        raise ConvmapsError(f"size {text!r} is less than one byte; {hint}")
    return int(value)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on `folder` itself while the block runs (flock on the
    directory: no lock file is left behind to be mistaken for an output or an input)."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def symlink_under(root: Path) -> Path | None:
    """The first symlink inside `root` (which convmaps writes into), or None; `root` itself
    counts too. Never follows one."""
    if root.is_symlink():
        return root
    if not root.is_dir():
        return None
    for here, dirs, names in os.walk(root):  # does not follow symlinked folders
        for name in [*dirs, *names]:
            if (Path(here) / name).is_symlink():
                return Path(here) / name
    return None
