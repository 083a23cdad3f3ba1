"""The exception hierarchy: the CLI turns any ConvmapsError into one red line and exit 1
(and `file_kind`, which the messages of io/ and core/ share)."""

from __future__ import annotations

import stat

__all__ = [
    "BadImageError",
    "CheckpointError",
    "ConvmapsError",
    "DatasetError",
    "TooLargeError",
    "UnknownLayerError",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "WeightsUnavailableError",
    "WriteError",
    "file_kind",
]


class ConvmapsError(Exception):
    """Base of every error convmaps reports to a user as one line."""


class UnknownModelError(ConvmapsError):
    """A model name that is neither a torchvision classifier, `lenet`, nor a checkpoint."""


class WeightsUnavailableError(ConvmapsError):
    """Pretrained weights that are neither cached nor downloadable."""


class CheckpointError(ConvmapsError):
    """A checkpoint that cannot be read or does not fit the architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that wants to run code; refused, never loaded unsafely."""


class UnknownLayerError(ConvmapsError):
    """A layer SPEC item that matches no module."""


class DatasetError(ConvmapsError):
    """Training data (IDX files) that are missing or malformed."""


class BadImageError(ConvmapsError):
    """An input that is not a usable image (recorded in the manifest and skipped)."""


class TooLargeError(ConvmapsError):
    """A run whose estimated output exceeds --max-bytes or the free disk space."""


class WriteError(ConvmapsError):
    """An output that could not be written (disk full, permissions)."""


def file_kind(mode: int) -> str:
    """What a `st_mode` is, for a message that says why a path is not a readable file."""
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"
