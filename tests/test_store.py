from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convmaps.errors import ConvmapsError, WriteError
from convmaps.io.store import (
    TensorSpec,
    parse_bytes,
    png_complete,
    read_metadata,
    save_tensors,
    write_bytes,
    write_safetensors,
)

from .conftest import no_hang


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "features.0": torch.randn(4, 3, 5),
        "half": torch.randn(3, 7).half(),
        "brain": torch.randn(5).bfloat16(),
        "idx": torch.arange(12).reshape(3, 4),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
        "mask": torch.tensor([True, False, True]),
        "odd": torch.arange(3, dtype=torch.uint8),
    }


def test_save_tensors_reads_back_with_safetensors(tmp_path):
    path = tmp_path / "a.safetensors"
    tensors = _tensors()
    save_tensors(path, tensors, {"model": "alexnet", "sha256": "ab" * 32})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"model": "alexnet", "sha256": "ab" * 32}
    assert read_metadata(path) == {"model": "alexnet", "sha256": "ab" * 32}


def test_same_tensors_same_bytes_as_safetensors_reads_them(tmp_path):
    t = _tensors()
    save_tensors(tmp_path / "a.safetensors", t, {"k": "v"})
    save_tensors(tmp_path / "b.safetensors", t, {"k": "v"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    # and the reference writer's file holds the same tensors
    save_file({k: v for k, v in t.items()}, tmp_path / "ref.safetensors", {"k": "v"})
    ref, ours = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(ref[k], ours[k]) for k in t)


def test_streamed_chunks_equal_whole(tmp_path):
    big = torch.randn(10, 4, 3, 3).half()
    bias = torch.randn(10).half()
    specs = [TensorSpec("conv", big.dtype, tuple(big.shape)),
             TensorSpec("conv.bias", bias.dtype, (10,))]
    chunks = [("conv", big[0:3]), ("conv", big[3:4]), ("conv", big[4:10]), ("conv.bias", bias)]
    write_safetensors(tmp_path / "k.safetensors", specs, iter(chunks), {"a": "b"})
    got = load_file(tmp_path / "k.safetensors")
    assert torch.equal(got["conv"], big) and torch.equal(got["conv.bias"], bias)


@pytest.mark.parametrize(
    "chunks,match",
    [
        ([("conv", torch.zeros(2, 3))], "missing data"),
        ([("conv", torch.zeros(5, 3))], "exceed"),
        ([("other", torch.zeros(4, 3))], "does not match"),
        ([("conv", torch.zeros(4, 3, dtype=torch.float64))], "does not match"),
        ([("conv", torch.zeros(4, 3)), ("extra", torch.zeros(1))], "after the last"),
    ],
)
def test_bad_streams_leave_no_file(tmp_path, chunks, match):
    path = tmp_path / "k.safetensors"
    with pytest.raises(ValueError, match=match):
        write_safetensors(path, [TensorSpec("conv", torch.float32, (4, 3))], iter(chunks))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.ones(3)})
    before = path.read_bytes()

    def chunks():
        yield "x", torch.zeros(1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_safetensors(path, [TensorSpec("x", torch.float32, (3,))], chunks())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_disk_full_is_one_clear_error(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="disk full"):
        write_bytes(tmp_path / "x.png", b"data")
    assert list(tmp_path.iterdir()) == []


def test_read_metadata_of_truncated_file_is_none(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors(path, {"x": torch.ones(100)}, {"run": "1"})
    path.write_bytes(path.read_bytes()[:-10])
    assert read_metadata(path) is None
    assert read_metadata(tmp_path / "missing.safetensors") is None


def test_sizes():
    assert parse_bytes("8GB") == 8 * 10**9
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1e6") == 10**6
    assert parse_bytes("500 mb") == 500 * 10**6
    with pytest.raises(ConvmapsError, match="not understood"):
        parse_bytes("lots")
    assert parse_bytes("1.5kib") == 1536 and parse_bytes(" 7 ") == 7
    assert parse_bytes(2**63 - 1) == parse_bytes(str(2**63 - 1)) == 2**63 - 1  # exact, no float
    assert parse_bytes("9223372036854775807B") == 2**63 - 1


@pytest.mark.parametrize("text,words", [
    ("1e999", "too large"), ("1e19", "too large"), ("9223372036854775808", "too large"),
    ("1e999999999", "too large"), ("1e999999999kib", "too large"),  # past Decimal's exponents
    ("0.001EB", "not understood"), ("inf", "not understood"), ("nan", "not understood"),
    ("-5GB", "not understood"), ("0", "less than one byte"), ("0.5", "less than one byte"),
    (0, "out of range"), (-1, "out of range"), (2**63, "out of range"), (True, "not understood"),
])
def test_bad_sizes_are_one_line_errors(text, words):
    with pytest.raises(ConvmapsError) as e:
        parse_bytes(text)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("header", [b"\xff" * 8, (2**40).to_bytes(8, "little") + b"{}",
                                    (2).to_bytes(8, "little") + b"[]", b"abc"])
def test_read_metadata_of_foreign_files_is_none(tmp_path, header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(header)
    assert read_metadata(path) is None


def test_png_complete_needs_the_end_chunk(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (5, 5)).save(buf, "PNG")
    path = tmp_path / "a.png"
    write_bytes(path, buf.getvalue(), sync=False)
    assert png_complete(path)
    path.write_bytes(buf.getvalue()[:-1])
    assert not png_complete(path)
    path.write_bytes(b"")
    assert not png_complete(path)
    assert not png_complete(tmp_path / "missing.png")


def test_sync_is_one_fsync_per_file_only_when_asked(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(2)}, sync=False)
    assert calls == []
    save_tensors(tmp_path / "b.safetensors", {"x": torch.ones(2)})
    assert len(calls) == 1


def test_readers_never_open_a_fifo(tmp_path, fifo):
    """A named pipe under an output's name would block an open (or a read) forever: files
    convmaps reads back must be regular files, which a symlink to one is."""
    from convmaps.io.store import open_regular

    for name in ("activations.safetensors", "a.png"):
        fifo(tmp_path / name)
    assert no_hang(read_metadata, tmp_path / "activations.safetensors") is None
    assert no_hang(png_complete, tmp_path / "a.png") is False
    with pytest.raises(OSError, match="not a regular file but a named pipe"):
        no_hang(open_regular, tmp_path / "a.png")
    with pytest.raises(OSError, match="but a directory"):
        open_regular(tmp_path)
    with pytest.raises(OSError, match="but a character device"):
        open_regular("/dev/null")
    save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(2)}, {"model": "m"})
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "t.safetensors")
    assert read_metadata(tmp_path / "link.safetensors") == {"model": "m"}
