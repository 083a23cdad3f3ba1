"""Tests for convmaps.jobs.train: IDX reading, the trainer, the bundled checkpoint and samples."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from convmaps.core.models import bundled_lenet_path, lenet5, lenet_preset, load_model
from convmaps.errors import ConvmapsError
from convmaps.jobs.train import (
    DEFAULT_DATA_DIR,
    FASHION_MNIST_CLASSES,
    DatasetError,
    evaluate,
    export_samples,
    find_split,
    load_split,
    normalise,
    read_idx,
    sample_name,
    train_lenet,
)

SAMPLES_DIR = bundled_lenet_path().parent / "samples"
_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, _CODES[array.dtype.type], array.ndim])
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path: Path, array: np.ndarray) -> Path:
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def _write_split(folder: Path, prefix: str, n: int, seed: int, sep: str = "-") -> None:
    """A synthetic split whose classes are learnable: each class brightens its own rows."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label : 2 * label + 3] = 250
    _write_idx(folder / f"{prefix}-images{sep}idx3-ubyte.gz", images)
    _write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte.gz", labels)


@pytest.fixture(scope="module")
def fashion_dir() -> Path:
    if not DEFAULT_DATA_DIR.is_dir():
        pytest.skip(f"Debian package dataset-fashion-mnist not installed: no {DEFAULT_DATA_DIR}")
    return DEFAULT_DATA_DIR


@pytest.fixture(scope="module")
def fashion_test(fashion_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_split(fashion_dir, "test")


# --- read_idx -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trip_uint8(tmp_path: Path, name: str) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    out = read_idx(_write_idx(tmp_path / name, array))
    assert out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(array))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32])
def test_read_idx_round_trip_other_types_are_big_endian(tmp_path: Path, dtype: type) -> None:
    array: np.ndarray = np.arange(-6, 6).astype(dtype).reshape(3, 4)
    out = read_idx(_write_idx(tmp_path / "x-idx2.gz", array))
    assert torch.equal(out, torch.from_numpy(array))


def test_read_idx_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    labels = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"  # gzip data without the .gz suffix
    path.write_bytes(gzip.compress(_idx_bytes(labels)))
    assert read_idx(path).tolist() == list(range(10))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x01" + b[1:], "bad magic number"),
        (lambda b: b[:2] + b"\x42" + b[3:], "unknown IDX type code"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "longer than its header says"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b"", "not an IDX file"),
    ],
    ids=["magic", "type-code", "short-data", "trailing", "short-header", "empty"],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, mutate, message: str) -> None:
    good = _idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))
    for path in (tmp_path / "bad-idx3-ubyte", tmp_path / "bad-idx3-ubyte.gz"):
        data = mutate(good)
        path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
        with pytest.raises(ConvmapsError, match=message):
            read_idx(path)


def test_read_idx_damaged_gzip_and_fake_gz(tmp_path: Path) -> None:
    good = gzip.compress(_idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8)))
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="damaged gzip"):
        read_idx(damaged)
    fake = tmp_path / "fake.gz"
    fake.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="not gzip"):
        read_idx(fake)
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "missing-idx1-ubyte")


# --- find_split / load_split ----------------------------------------------------------------


def test_find_split_accepts_mnist_names(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", 20, seed=0, sep=".")  # train-images.idx3-ubyte.gz
    images = np.zeros((10, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images)  # raw, official name
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    assert [p.name for p in find_split(tmp_path, "train")] == [
        "train-images.idx3-ubyte.gz",
        "train-labels.idx1-ubyte.gz",
    ]
    assert [p.name for p in find_split(tmp_path, "test")] == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    x, y = load_split(tmp_path, "test")
    assert (x.dtype, tuple(x.shape), y.dtype, tuple(y.shape)) == (
        torch.uint8,
        (10, 28, 28),
        torch.int64,
        (10,),
    )


def test_find_split_errors_name_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        find_split(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte\.gz.*t10k-images\.idx3-ubyte"):
        find_split(tmp_path, "test")
    with pytest.raises(DatasetError, match="unknown split"):
        find_split(tmp_path, "valid")  # type: ignore[arg-type]


def test_load_split_rejects_disagreeing_files(tmp_path: Path) -> None:
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DatasetError, match="3 images but .* 4 labels"):
        load_split(tmp_path, "test")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 32, 32), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"\(N, 28, 28\)"):
        load_split(tmp_path, "test")


# --- normalise / the bundled checkpoint (real data) -----------------------------------------


def test_normalise_equals_lenet_preset_on_real_images(fashion_test) -> None:
    x, _ = fashion_test
    preset = lenet_preset()
    ours = normalise(x[:16])
    assert ours.shape == (16, 1, 28, 28) and ours.dtype == torch.float32
    for i in range(16):
        assert torch.equal(ours[i], preset(Image.fromarray(x[i].numpy())))


def test_bundled_checkpoint_accuracy(fashion_test) -> None:
    x, y = fashion_test
    loaded = load_model("lenet")
    assert loaded.meta["arch"] == "lenet"
    accuracy = evaluate(loaded.model, x[:2000], y[:2000])
    assert accuracy >= 0.88, f"bundled LeNet-5: {accuracy:.4f} on the first 2000 test images"


def test_bundled_checkpoint_metadata() -> None:
    with safe_open(str(bundled_lenet_path()), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert keys == set(lenet5().state_dict())
    assert meta["arch"] == "lenet"
    assert float(meta["test_accuracy"]) >= 0.89
    assert meta["command"].startswith("convmaps train-lenet --data ")
    assert (meta["mean"], meta["std"]) == ("0.2860", "0.3530")


# --- train_lenet on synthetic data ----------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    _write_split(folder, "train", 256, seed=1)
    _write_split(folder, "t10k", 64, seed=2)
    return folder


def test_train_lenet_writes_a_checkpoint_with_metadata(synthetic_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "tiny.safetensors"
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    lines: list[str] = []
    metrics = train_lenet(synthetic_dir, out, epochs=1, batch_size=32, log=lines.append)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert torch.get_num_threads() == threads_before
    assert [p.name for p in out.parent.iterdir()] == ["tiny.safetensors"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert any(line.startswith("epoch 1/1") for line in lines)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(lenet5().state_dict())
    assert meta["arch"] == "lenet"
    assert (meta["epochs"], meta["seed"], meta["batch_size"]) == ("1", "0", "32")
    assert meta["test_accuracy"] == f"{metrics['test_accuracy']:.4f}"
    assert meta["dataset"] == str(synthetic_dir)
    assert meta["dataset_files"].split(",")[0] == "train-images-idx3-ubyte.gz"
    assert len(meta["dataset_sha256"].split(",")) == 4
    assert meta["command"] == (
        f"convmaps train-lenet --data {synthetic_dir} --out {out} --epochs 1 --batch-size 32"
    )
    loaded = load_model(str(out))  # the arch comes from the metadata
    assert loaded.arch == "lenet"


def test_train_lenet_is_deterministic(synthetic_dir: Path, tmp_path: Path) -> None:
    a = train_lenet(synthetic_dir, tmp_path / "a.safetensors", epochs=1, batch_size=64)
    b = train_lenet(synthetic_dir, tmp_path / "b.safetensors", epochs=1, batch_size=64)
    assert a["epoch_losses"] == b["epoch_losses"]
    state_a = load_model(str(tmp_path / "a.safetensors")).model.state_dict()
    state_b = load_model(str(tmp_path / "b.safetensors")).model.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_train_lenet_validates_before_training(synthetic_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    with pytest.raises(ConvmapsError, match="--epochs"):
        train_lenet(synthetic_dir, out, epochs=0)
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        train_lenet(tmp_path / "nowhere", out, epochs=1)
    assert not out.exists()


@pytest.mark.parametrize("empty", ["train", "test"])
def test_train_lenet_refuses_empty_idx_files(tmp_path: Path, empty: str) -> None:
    """Valid headers with zero items: one line, not a ZeroDivisionError."""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _write_split(tmp_path, prefix, 0 if split == empty else 20, seed=1)
    out = tmp_path / "x.safetensors"
    with pytest.raises(DatasetError, match=f"the {empty} split .* holds no images"):
        train_lenet(tmp_path, out, epochs=1)
    assert not out.exists()


def test_export_samples_on_synthetic_data(synthetic_dir: Path, tmp_path: Path) -> None:
    written = export_samples(synthetic_dir, tmp_path, n=3)
    assert [p.name for p in written] == ["0_t-shirt-top.png", "1_trouser.png", "2_pullover.png"]
    x, _ = load_split(synthetic_dir, "test")
    for label, path in enumerate(written):
        assert np.array_equal(np.asarray(Image.open(path)), x[label].numpy())
    assert "2_pullover.png\t2\t2\tPullover" in (tmp_path / "SOURCES.txt").read_text()


# --- the bundled sample images --------------------------------------------------------------


def _sources() -> list[tuple[str, int, int]]:
    rows = []
    for line in (SAMPLES_DIR / "SOURCES.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, index, label, _class = line.split("\t")
            rows.append((name, int(index), int(label)))
    return rows


def test_bundled_samples_are_listed_and_named() -> None:
    rows = _sources()
    assert [name for name, _, _ in rows] == [sample_name(label) for label in range(8)]
    assert sorted(p.name for p in SAMPLES_DIR.glob("*.png")) == sorted(n for n, _, _ in rows)
    assert sample_name(9) == "9_ankle-boot.png" and len(FASHION_MNIST_CLASSES) == 10
    for name, _, _ in rows:
        with Image.open(SAMPLES_DIR / name) as im:
            assert (im.mode, im.size, im.format) == ("L", (28, 28), "PNG")


def test_bundled_samples_are_the_test_images_sources_names(fashion_test) -> None:
    x, y = fashion_test
    for name, index, label in _sources():
        assert int(y[index]) == label
        assert int((y == label).nonzero()[0]) == index  # the first image of its class
        with Image.open(SAMPLES_DIR / name) as im:
            assert np.array_equal(np.asarray(im), x[index].numpy()), name


def test_train_lenet_command(synthetic_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from convmaps.cli import app

    out, samples = tmp_path / "l.safetensors", tmp_path / "samples"
    result = CliRunner().invoke(app, ["train-lenet", "--data", str(synthetic_dir), "--out",
                                      str(out), "--epochs", "1", "--samples", str(samples)])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    assert load_model(str(out)).arch == "lenet"
    assert len(list(samples.glob("*.png"))) == 8
    result = CliRunner().invoke(app, ["train-lenet", "--data", str(tmp_path / "none")])
    assert result.exit_code == 1 and result.output.startswith("error: data folder")


def test_recorded_command_reruns_to_the_same_checkpoint(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    """The command in the metadata is one the CLI accepts, and rerunning it verbatim writes a
    byte-identical checkpoint (the learning rate is recorded exactly, not to 6 digits)."""
    import shlex

    from typer.testing import CliRunner

    from convmaps.cli import app

    out = tmp_path / "my model.safetensors"
    lr = 1 / 300
    train_lenet(synthetic_dir, out, epochs=1, seed=3, batch_size=48, lr=lr)
    first = out.read_bytes()
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    argv = shlex.split(meta["command"])
    assert argv[:2] == ["convmaps", "train-lenet"]
    assert argv[argv.index("--lr") + 1] == repr(lr) and float(meta["lr"]) == lr
    assert argv[argv.index("--batch-size") + 1] == "48" and "--seed" in argv
    out.unlink()
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == first


def test_train_lenet_cli_defaults_are_the_trainers() -> None:
    import typer

    from convmaps.cli import app
    from convmaps.jobs import train

    command = typer.main.get_command(app).commands["train-lenet"]  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in command.params}
    assert defaults["batch_size"] == train.DEFAULT_BATCH_SIZE
    assert defaults["lr"] == train.DEFAULT_LR
    assert defaults["epochs"] == train.DEFAULT_EPOCHS and defaults["seed"] == train.DEFAULT_SEED
    assert Path(defaults["data"]) == train.DEFAULT_DATA_DIR


@pytest.mark.parametrize(("option", "value"), [("--lr", "0"), ("--lr", "-0.1"), ("--lr", "inf"),
                                               ("--lr", "nan"), ("--batch-size", "0")])
def test_train_lenet_cli_refuses_bad_options(synthetic_dir: Path, tmp_path: Path, option: str,
                                              value: str) -> None:
    from typer.testing import CliRunner

    from convmaps.cli import app

    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(app, ["train-lenet", "--data", str(synthetic_dir), "--out",
                                      str(out), "--epochs", "1", option, value])
    assert "Traceback" not in result.output and not out.exists()
    if option == "--lr":  # ours: one line through the CLI's error path
        assert result.exit_code == 1
        expected = f"error: --lr must be a positive finite number, got {float(value)}\n"
        assert result.output == expected
    else:  # click's own range check
        assert result.exit_code == 2 and "Invalid value for '--batch-size'" in result.output


def test_train_lenet_never_unpickles_its_data(tmp_path: Path) -> None:
    """train-lenet reads IDX bytes with numpy; a pickle payload in their place is bad data."""
    import shlex

    from typer.testing import CliRunner

    from convmaps.cli import app

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "t10k"):
        for kind, rank in (("images", 3), ("labels", 1)):
            torch.save({"x": Evil()}, data / f"{split}-{kind}-idx{rank}-ubyte")
    result = CliRunner().invoke(app, ["train-lenet", "--data", str(data), "--out",
                                      str(tmp_path / "x.safetensors"), "--epochs", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and "is not an IDX file" in result.output
    assert not marker.exists()
