from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from convmaps.cli import app, main

from .conftest import write_image

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_import_does_not_import_torch():
    code = "import sys, convmaps.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "convmaps", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("convmaps ")


@pytest.mark.parametrize("cmd", ["layers", "filters", "dump", "project", "topk", "occlude",
                                 "invariance", "explain", "report", "run", "show", "train-lenet"])
def test_help(cmd):
    result = run(cmd, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_layers_table():
    result = run("layers", "alexnet")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "features.3 " in x)
    assert "Conv2d" in line and "64×27×27" in line and "192×27×27" in line and "35.8 MB" in line
    assert "61,100,840 parameters" in result.output
    result = run("layers", "lenet", "--input-size", "32,32")
    assert result.exit_code == 1 and "forward pass failed in F6" in result.output


def test_layers_table_shows_receptive_fields():
    result = run("layers", "alexnet")
    assert result.exit_code == 0, result.output
    assert "field" in result.output and "jump" in result.output

    header = next(x for x in result.output.splitlines() if "┃ name" in x)
    at = [c.strip() for c in header.split("┃")].index("field")
    # known AlexNet values at 224x224; 1-D outputs see the whole input
    for name, field, jump in (("features.0", "11", "4"), ("features.10", "163", "16"),
                              ("features.12", "195", "32"), ("classifier.6", "224", "—")):
        line = next(x for x in result.output.splitlines() if f" {name} " in x)
        assert [c.strip() for c in line.split("│")][at:at + 2] == [field, jump], line
    result = run("layers", "resnet18", "--input-size", "200,160")
    line = next(x for x in result.output.splitlines() if " avgpool " in x)
    assert "627×563" in line and "224×160" in line  # the global pool over a 7×5 map


def test_filters_writes_weights_and_pngs(tmp_path):
    result = run("filters", "lenet", "--weights", "none", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    path = tmp_path / "filters" / "filters.safetensors"
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["C1", "C3", "C5"]
        assert tuple(f.get_tensor("C3").shape) == (16, 6, 5, 5)
        meta = f.metadata()
    assert meta["model"] == "lenet" and meta["weights"] == "none"
    assert meta["module.C3"].startswith("Conv2d(6, 16")
    for name in ("C1", "C3", "C5"):
        png = Image.open(tmp_path / "filters" / "png" / f"{name}.png")
        assert png.mode in ("RGB", "P") and png.info["convmaps-range"]


def test_filters_rgb_first_layer_and_cap(tmp_path):
    result = run("filters", "alexnet", "-w", "none", "--layers", "0,3", "--png-cap", "8",
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "features.3: drew 8 of 192 filters" in result.output
    with safe_open(str(tmp_path / "filters" / "filters.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["features.0", "features.3"]


def test_dump_and_show(tmp_path):
    img = write_image(tmp_path / "in" / "x.png")
    out = tmp_path / "out"
    result = run("dump", "lenet", img, "--weights", "none", "--out", out, "--layers", "C1,S2")
    assert result.exit_code == 0, result.output
    assert "1 image(s) written" in result.output
    assert (out / "x.png" / "png" / "C1.png").exists()
    result = run("show", out)
    assert result.exit_code == 0, result.output
    assert "activations.safetensors" in result.output and "6×28×28" in result.output
    result = run("show", out / "x.png" / "switches.safetensors")
    assert result.exit_code == 0 and "int64" in result.output


def test_png_scale_channel_from_the_command_line(tmp_path):
    img = write_image(tmp_path / "in" / "x.png")
    result = run("dump", "lenet", img, "-w", "none", "--out", tmp_path / "o", "--layers", "C1",
                 "--png-scale", "channel")
    assert result.exit_code == 0, result.output
    png = Image.open(tmp_path / "o" / "x.png" / "png" / "C1.png")
    assert png.info["convmaps-png-scale"] == "channel"
    assert len(png.info["convmaps-range"].split(";")) == 6
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["options"]["png_scale"] == "channel"


def test_strict_exits_one_when_an_input_is_skipped(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    write_image(tmp_path / "good.png")
    args = ["dump", "lenet", tmp_path / "bad.png", tmp_path / "good.png", "-w", "none",
            "--out", tmp_path / "o"]
    result = run(*args)
    assert result.exit_code == 0 and "skipped" in result.output
    assert run(*args, "--strict").exit_code == 1


@pytest.mark.parametrize("command", ["dump", "project"])
def test_a_run_that_skips_every_input_fails_in_one_line(tmp_path, command):
    """A file named by hand that is no image (notes.txt) is counted as an input, not an image,
    and a run that wrote nothing exits 1, saying so."""
    (tmp_path / "notes.txt").write_text("hello")
    extra = ["--unit", "C5:0"] if command == "project" else []
    result = run(command, "lenet", tmp_path / "notes.txt", *extra, "--out", tmp_path / "o")
    assert result.exit_code == 1, result.output
    assert "1 input(s)" in result.output and "1 image(s)" not in result.output
    assert "not an image" in " ".join(result.output.split())
    assert result.output.strip().splitlines()[-1] == (
        "error: nothing written: every input was skipped (the lines above say why)")


@pytest.mark.parametrize(
    "args,words",
    [
        (["layers", "alexnt"], "Did you mean: alexnet"),
        (["dump", "lenet", "-w", "none", "--layers", "C9"], "no layer 'C9'"),
        (["dump", "lenet", "-w", "none", "--kernels", "relu1"], "conv layers only"),
        (["dump", "lenet", "-w", "none", "--dtype", "int8"], "--dtype"),
        (["dump", "lenet", "-w", "none", "--png-scale", "tile"], "--png-scale"),
        (["dump", "lenet", "-w", "none", "/no/such/file.png"], "/no/such/file.png"),
        (["dump", "alexnet", "-w", "none"], "give INPUT"),
        (["dump", "lenet", "-w", "none", "--max-bytes", "10B"], "--max-bytes"),
        (["show", "/no/such/dump"], "does not exist"),
        (["layers", "lenet", "--input-size", "abc"], "--input-size"),
        (["filters", "missing.pt", "--arch", "lenet"], "does not exist"),
        (["dump", "lenet", "-w", "none", "--kernels", "OUTPUT"], "conv layers only"),
        (["dump", "lenet", "-w", "none", "--taps", "flatten"], "conv layers only"),
        (["dump", "lenet", "-w", "none", "--device", "foo"], "--device"),
        (["dump", "lenet", "-w", "none", "--max-bytes", "1.2.3"], "not understood"),
        (["dump", "lenet", "-w", "none", "--layers", "0-99999999999"], "no layer"),
        (["dump", "lenet", "-w", "none", "--layers", ","], "--layers: empty SPEC ','"),
        (["dump", "lenet", "-w", "none", "--kernels", "relu"], "'relu' selects no conv layer"),
        (["dump", "lenet", "-w", "none", "--kernels", "pool"], "'pool' selects no conv layer"),
        (["dump", "lenet", "-w", "none", "--taps", "linear"], "'linear' selects no conv layer"),
        (["dump", "lenet", "-w", "none", "--kernels", ""], "--kernels: empty SPEC ''"),
        (["filters", "lenet", "-w", "none", "--layers", "pool"], "'pool' selects no conv layer"),
        (["layers", "vit_b_16", "--input-size", "100,100"],
         "forward pass failed in VisionTransformer's own forward code for input (1, 3, 100, 100)"
         ": Wrong image height!"),
        (["dump", "googlenet", "-w", "none", "x.png", "--kernels", "aux1.conv.conv"],
         "never run"),
    ],
)
def test_errors_are_one_line(args, words, tmp_path):
    result = run(*args, *(["--out", tmp_path] if args[0] in ("dump", "filters") else []))
    assert result.exit_code == 1, result.output
    assert words in result.output.replace("\n", " ")
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")


@pytest.mark.parametrize("text", ["[1, 2]", '{"inputs": {"a": 1}}', '{"inputs": [{"key": 3}]}'])
def test_show_refuses_a_foreign_manifest_in_one_line(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    result = run("show", tmp_path)
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert "is not a convmaps manifest" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("env,words", [({"WORLD_SIZE": "x"}, "WORLD_SIZE='x'"),
                                      ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5")])
def test_broken_torchrun_environment_is_one_line(tmp_path, monkeypatch, env, words):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = run("dump", "lenet", "-w", "none", "--out", tmp_path)
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert words in result.output


@pytest.mark.parametrize("args,words", [
    (["dump", "lenet", "--batch-size", "0"],
     "Invalid value for '--batch-size' / '-b': Input should be greater than or equal to 1 "
     "(see `convmaps dump --help`)"),
    (["dump", "lenet", "--no-such-option"], "No such option: --no-such-option"),
    (["layers"], "Missing argument"),
    (["nosuch"], "No such command 'nosuch'"),
    (["dump", "lenet", "--workers", "x"], "Invalid value for '--workers'"),
])
def test_usage_errors_are_one_line_exit_2(args, words, capsys):
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err


def test_main_keeps_help_version_and_command_exit_codes(capsys, tmp_path):
    assert main(["dump", "--help"]) == 0
    assert "Usage: convmaps dump" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("convmaps ")
    assert main(["show", str(tmp_path / "missing")]) == 1  # a ConvmapsError: exit code 1
    assert capsys.readouterr().err.startswith("error: ")
    assert main([]) == 2  # no arguments: the help, as click does
    assert "Usage: convmaps" in capsys.readouterr().out


def test_python_dash_m_usage_error_is_one_line():
    out = subprocess.run([sys.executable, "-m", "convmaps", "dump", "lenet", "--batch-size", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: Invalid value for '--batch-size'")
    assert out.stderr.count("\n") == 1, out.stderr


def test_dump_records_a_file_symlink_loop_as_a_skip(tmp_path):
    folder = tmp_path / "in"
    write_image(folder / "c.png")
    (folder / "b.png").symlink_to("a.png")
    (folder / "a.png").symlink_to("b.png")
    for inputs in ([folder], [folder / "a.png", folder / "c.png"]):
        result = run("dump", "lenet", *inputs, "-w", "none", "--out", tmp_path / "o",
                     "--no-png", "--overwrite")
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        assert "unreadable: symlink loop" in result.output


def test_counts_are_truthful_and_show_prints_predictions(tmp_path):
    out = tmp_path / "out"
    result = run("dump", "lenet", "--out", out, "--no-png")
    assert result.exit_code == 0, result.output
    assert "8 image(s) written, 0 already done, 0 skipped" in result.output
    result = run("dump", "lenet", "--out", out, "--no-png")
    assert "0 image(s) written, 8 already done, 0 skipped" in result.output
    result = run("show", out)
    assert result.exit_code == 0 and "0_t-shirt-top.png: " in result.output
    assert "%" in result.output.split("0_t-shirt-top.png: ")[1].splitlines()[0]


def test_a_shard_reports_its_own_images(tmp_path):
    out = tmp_path / "out"
    result = run("dump", "lenet", "--out", out, "--no-png", "--shard", "1/2", "-b", "2")
    assert result.exit_code == 0, result.output
    assert "shard 1/2: 4 image(s) written, 0 already done" in result.output
    assert "manifest.shard-1-of-2.json" in result.output


def test_torchrun_environment_without_peers_never_waits(tmp_path, monkeypatch):
    """WORLD_SIZE without a reachable peer: this rank does its shard and returns; the last
    shard to finish merges (no process group to hang on)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    result = run("dump", "lenet", "--out", tmp_path / "o", "--no-png", "-b", "2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "manifest.shard-0-of-2.json").is_file()


def test_progress_in_a_log_is_plain_lines(tmp_path):
    env = {"COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "convmaps", "dump", "lenet", "--out",
                           str(tmp_path / "o"), "--no-png"], capture_output=True, text=True,
                          env={**__import__("os").environ, **env})
    assert proc.returncode == 0, proc.stderr
    assert "dump: 8/8 images" in proc.stderr and "images/s" in proc.stderr
    assert "\x1b[" not in proc.stderr and "━" not in proc.stderr


def test_progress_rate_after_a_resume_counts_only_this_runs_images(monkeypatch):
    from convmaps import cli

    now = [100.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    progress = cli._PlainProgress("", total=10, what="dump", already=8)
    now[0] = 102.0
    progress(2)  # two new images in two seconds, after eight done by an earlier run
    assert progress.line(now[0]) == "dump: 10/10 images, 1.0 images/s"


def test_an_error_naming_a_path_with_a_newline_stays_one_line(tmp_path):
    result = runner.invoke(app, ["dump", "lenet", str(tmp_path / "no\nsuch.png"),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no\\nsuch.png" in lines[0]


def test_show_reads_every_part_of_out_not_only_a_dump(tmp_path):
    out = tmp_path / "o"
    assert runner.invoke(app, ["topk", "lenet", "--out", str(out), "-k", "2", "--layers", "C1",
                               "--no-png", "--project", "none", "--workers", "0"]).exit_code == 0
    result = runner.invoke(app, ["show", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", "")  # long titles wrap
    assert "top-k of lenet" in text and "C1.safetensors" in text
    assert runner.invoke(app, ["project", "lenet", "--unit", "C1:0", "--out", str(out),
                               "--no-png", "--workers", "0"]).exit_code == 0
    result = runner.invoke(app, ["show", str(out)])
    text = result.output.replace("\n", "")
    assert "projections of lenet" in text and "projections.safetensors" in text
    result = runner.invoke(app, ["show", str(out / "topk")])  # one part's own folder
    text = result.output.replace("\n", "")
    assert result.exit_code == 0 and "top-k of lenet" in text and "dump of" not in text
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["show", str(empty)])
    assert result.exit_code == 1 and "not a convmaps output folder" in result.output


@pytest.mark.parametrize("args,words", [
    (["dump", "lenet", "--layers", ""], "empty SPEC '' selects nothing"),
    (["topk", "lenet", "--layers", ""], "empty SPEC '' selects nothing"),
    (["dump", "lenet", "--layers", "5-2"], "the range '5-2' runs backwards; write 2-5"),
    (["layers", "VGG16"], "Did you mean: vgg16,"),
    (["project", "lenet"], "--unit C5:0"),
])
def test_cli_polish_says_what_to_do(tmp_path, args, words):
    result = runner.invoke(app, [*args, *(["--out", str(tmp_path / "o")]
                                          if args[0] != "layers" else [])])
    assert result.exit_code == 1 and words in result.output, result.output


def test_help_names_its_arguments_as_the_contract_does():
    for command in ("dump", "topk", "project", "occlude", "invariance", "explain"):
        usage = runner.invoke(app, [command, "--help"]).output
        assert "MODEL" in usage and "[INPUT]..." in usage and "{model}" not in usage


def test_topk_shows_progress_of_its_projection_phase_too(tmp_path):
    result = runner.invoke(app, ["topk", "lenet", "--out", str(tmp_path / "o"), "-k", "2",
                                 "--layers", "C1,C3", "--png-cap", "1", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "topk: 8/8 images" in result.output
    assert "topk projections: 22/22 units" in result.output and "units/s" in result.output


def test_filters_shows_progress_of_its_grids(tmp_path):
    result = run("filters", "vgg11", "-w", "none", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "filters grids: 8/8 layers" in result.output and "layers/s" in result.output
    result = run("filters", "vgg11", "-w", "none", "--out", tmp_path / "o2", "--no-png")
    assert result.exit_code == 0 and "grids" not in result.output  # nothing drawn, no count
