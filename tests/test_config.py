from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convmaps.cli import app
from convmaps.config import load_config, steps_from
from convmaps.errors import ConvmapsError
from convmaps.options import DType, PngScale

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    for options in steps_from(path, {}):
        assert getattr(options, "model", "report") and getattr(options, "config", str(path)) \
            == str(path)


def test_the_zeiler_fergus_config_runs_the_papers_commands_in_order():
    path = Path(__file__).parents[1] / "configs" / "zeiler-fergus.toml"
    steps = steps_from(path, {"inputs": ["photos"], "weights": "none"})
    assert [type(o).__name__ for o in steps] == ["FilterOptions", "TopkOptions",
                                                 "InvarianceOptions", "OccludeOptions",
                                                 "ReportOptions"]
    assert all(o.out == "zeiler_fergus" for o in steps)
    assert steps[1].k == 9 and steps[3].stride == 8 and steps[3].inputs == ["photos"]
    assert all(o.weights == "none" for o in steps[:4])  # the report has no weights


@pytest.mark.parametrize("text,words", [
    ('model = "lenet"\n[[job]]\ncommand = "topk"\nstride = 3\n', "unknown key 'stride'"),
    ('model = "lenet"\nstride = 3\n[[job]]\ncommand = "topk"\n', "'stride' is an option of none"),
    ('command = "dump"\n[[job]]\ncommand = "topk"\n', "not at the top"),
    ('job = 3\n', "list of [[job]] tables"),
    ('[[job]]\nk = 3\n', "command must be one of"),
    ('[[job]]\ncommand = "explode"\n', "command must be one of"),
])
def test_a_bad_multi_step_config_is_one_line(tmp_path, text, words):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConvmapsError, match=re.escape(words)):
        steps_from(path, {})


def test_an_override_no_step_takes_is_refused_and_others_go_where_they_fit(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "lenet"\n[[job]]\ncommand = "filters"\n[[job]]\n'
                    'command = "occlude"\npatch = 8\n[[job]]\ncommand = "report"\n')
    with pytest.raises(ConvmapsError, match="--kernels: not an option of `convmaps filters`"):
        steps_from(path, {"kernels": "C1"})
    filters, occlude, report = steps_from(path, {"out": "o", "inputs": ["x"]})
    assert filters.out == occlude.out == report.out == "o" and occlude.inputs == ["x"]


def test_run_runs_every_step_of_a_config(tmp_path):
    path = tmp_path / "c.toml"
    out = tmp_path / "o"
    path.write_text(f'model = "lenet"\nout = "{out}"\n[[job]]\ncommand = "topk"\nk = 2\n'
                    'project = "none"\n[[job]]\ncommand = "occlude"\npatch = 10\nstride = 9\n'
                    '[[job]]\ncommand = "report"\n')
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "step 3/3: convmaps report" in result.output
    assert (out / "topk" / "manifest.json").is_file() and (out / "occlusion.json").is_file()
    assert (out / "report" / "index.html").is_file()


def test_types_are_converted_and_dashes_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "lenet"\nbatch-size = 3\ndtype = "float16"\npng = false\n'
                    'inputs = ["a", "b"]\npng-scale = "channel"\n')
    values = load_config(path)
    assert values == {"model": "lenet", "batch_size": 3, "dtype": DType.float16, "png": False,
                      "inputs": ["a", "b"], "png_scale": PngScale.channel}


@pytest.mark.parametrize(
    "text,words",
    [
        ('modle = "lenet"', "unknown key 'modle'"),
        ("batch_size = \"8\"", "batch_size must be an integer"),
        ("batch_size = true", "batch_size must be an integer"),
        ("png = 1", "png must be true or false"),
        ('dtype = "int8"', "dtype must be one of float32, float16, bfloat16"),
        ('png-scale = "tile"', "png-scale must be one of layer, channel"),
        ('inputs = "photos"', "inputs must be a list of strings"),
        ("inputs = [1, 2]", "inputs must be a list of strings"),
        ("model = ", "is not valid TOML"),
        ('command = "filters"\nkernels = "0"', "unknown key 'kernels'"),
        ('command = "train"', "command must be one of dump, filters"),
        ("command = [1]", "command must be one of dump, filters"),
        ('config = "x.toml"', "unknown key 'config'"),
        ("batch-size = 2\nbatch_size = 3", "'batch-size' and 'batch_size' name one option"),
    ],
)
def test_bad_configs_name_key_and_file(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConvmapsError) as e:
        load_config(path)
    assert words in str(e.value) and str(path) in str(e.value)


def test_run_command_line_overrides_file(tmp_path):
    from .conftest import write_image

    img = write_image(tmp_path / "x.png")
    path = tmp_path / "c.toml"
    path.write_text(f'model = "lenet"\nweights = "none"\nlayers = "C1"\npng = true\n'
                    f'out = "{tmp_path / "out"}"\ninputs = ["{img}"]\n')
    result = CliRunner().invoke(app, ["run", str(path), "--no-png", "--layers", "C3"])
    assert result.exit_code == 0, result.output
    import json

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"]["png"] is False  # from the command line
    assert manifest["options"]["layers"] == "C3"
    assert manifest["options"]["weights"] == "none"  # from the file
    assert manifest["selected"]["activations"] == ["C3"]
    assert not (tmp_path / "out" / "x.png" / "png").exists()


def test_run_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.toml")])
    assert result.exit_code == 1 and result.output.startswith("error: config")


def test_filters_config_runs_filters_with_overrides(tmp_path):
    """The shipped VGG19 config, end to end: `command = "filters"` runs `convmaps filters`."""
    import json

    from safetensors import safe_open

    config = next(p for p in CONFIGS if p.name == "vgg19-filters.toml")
    result = CliRunner().invoke(app, ["run", str(config), "--weights", "none", "--out",
                                      str(tmp_path), "--png-cap", "4"])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "filters" / "filters.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 16  # VGG19's sixteen convs
        options = json.loads(f.metadata()["options"])
    assert options["model"] == "vgg19" and options["png_cap"] == 4  # file, then command line
    assert options["weights"] == "none"
    assert len(list((tmp_path / "filters" / "png").glob("*.png"))) == 16


def test_dump_only_options_on_a_filters_config_are_refused(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('command = "filters"\nmodel = "lenet"\n')
    result = CliRunner().invoke(app, ["run", str(path), "--kernels", "C1", "--batch-size", "2"])
    assert result.exit_code == 1
    assert result.output.startswith("error: --kernels, --batch-size: not an option of "
                                    "`convmaps filters`")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text,words",
    [
        ('max_bytes = "1e999"', "max_bytes: size '1e999' is too large"),
        ('max_bytes = "1e30"', "max_bytes: size '1e30' is too large"),
        ('chunk_bytes = "inf"', "chunk_bytes: size 'inf' not understood"),
        ('max_bytes = "nan"', "max_bytes: size 'nan' not understood"),
        ("max_bytes = 1.5e9", "max_bytes must be a size such as \"8GB\" or a whole number"),
        ("max_bytes = inf", "max_bytes must be a size such as"),
        ("max_bytes = nan", "max_bytes must be a size such as"),
        ("max-bytes = true", "max-bytes must be a size such as"),
        ("max_bytes = 0", "max_bytes: size 0 is out of range"),
        ("max_bytes = 9223372036854775807", None),
        ("batch_size = 1e999", "batch_size must be an integer, not inf"),
        ("png_cap = 2.0", "png_cap must be an integer, not 2.0"),
    ],
)
def test_sizes_and_numbers_in_configs_are_one_line_errors(tmp_path, text, words):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    if words is None:
        assert load_config(path)["max_bytes"] == "9223372036854775807"
        return
    with pytest.raises(ConvmapsError) as e:
        load_config(path)
    assert words in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_an_integer_size_is_taken_as_bytes(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("max_bytes = 20000000000\n")
    assert load_config(path) == {"max_bytes": "20000000000"}


@pytest.mark.parametrize("data", [b"\xff\xfe", b'model = "lenet"\n# caf\xe9\n'])
def test_a_config_that_is_not_utf8_is_one_line_naming_it(tmp_path, data):
    path = tmp_path / "latin1.toml"
    path.write_bytes(data)
    with pytest.raises(ConvmapsError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path} is not UTF-8 text") and "\n" not in str(e.value)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 1 and result.output.startswith("error: ")
    assert "Traceback" not in result.output
