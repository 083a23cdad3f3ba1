from __future__ import annotations

import pytest

from convmaps.io.layout import (
    OCCLUSION,
    OCCLUSION_PNG,
    ImageLayout,
    collision,
    explain_json,
    explain_png,
    is_dump_output,
    is_explain_output,
    is_image_output,
    is_occlusion_output,
    is_projection_output,
    is_shard_manifest,
    is_temp,
    projection_key,
    projection_png,
    temp_name,
)


def test_files_follow_the_options():
    lay = ImageLayout(activations=("C1", "relu@1"), switches=("S2",), kernels=(("C3", 2),),
                      taps=(("C3", 1),), png=True)
    assert lay.files() == sorted([
        "activations.safetensors", "switches.safetensors", "kernels.safetensors",
        "taps.safetensors", "png/C1.png", "png/relu@1.png", "png/C3.kernels/0.png",
        "png/C3.kernels/1.png", "png/C3.taps/0.png"])
    assert lay.tensor_files()[-1] == "activations.safetensors"  # the one that marks done
    assert ImageLayout(activations=("C1",)).files() == ["activations.safetensors"]


@pytest.mark.parametrize("rel,own", [("activations.safetensors", True), ("png/C1.png", True),
                                     ("png/C1.kernels/3.png", True), ("notes.txt", False),
                                     ("png/notes.txt", False), ("cat.png", False),
                                     (".activations.safetensors.99.tmp", True),
                                     ("png/.C1.png.5.tmp", True)])
def test_only_convmaps_names_are_its_own(rel, own):
    assert is_image_output(rel) is own
    assert is_dump_output(rel) is own


def test_projection_files_are_not_a_dumps():
    key = projection_key("deconvnet", "features.10", 5)
    assert key == "deconvnet/features.10/5"
    assert projection_key("guided", "C3", 2, (1, 4)) == "guided/C3/2@1,4"
    for rel in ("projections.safetensors", projection_png(key),
                "png/projections/guided/C3/.2.png.7.tmp"):
        assert is_projection_output(rel) and is_image_output(rel) and not is_dump_output(rel)
    assert not is_projection_output("png/C1.png")


def test_occlusion_files_are_neither_a_dumps_nor_projections():
    for rel in (OCCLUSION, OCCLUSION_PNG, temp_name(OCCLUSION, 3), "png/.occlusion.png.5.tmp"):
        assert is_occlusion_output(rel) and is_image_output(rel)
        assert not is_dump_output(rel) and not is_projection_output(rel)
    for rel in ("png/C1.png", "occlusion.png", "png/x/occlusion.png",
                ".activations.safetensors.1.tmp"):
        assert not is_occlusion_output(rel)
    assert is_shard_manifest("occlusion.shard-0-of-2.json", of="occlusion.json")


def test_explain_files_belong_to_explain_alone():
    unit = "features.10:5@3,4"
    for rel in (explain_json(unit), explain_png(unit), f"explain/{temp_name('C1:0.json', 3)}",
                f"png/explain/{temp_name('C1:0.png', 4)}"):
        assert is_explain_output(rel) and is_image_output(rel)
        assert not is_dump_output(rel) and not is_projection_output(rel)
        assert not is_occlusion_output(rel)
    for rel in ("png/C1.png", "explain.json", "explain/x/C1:0.json", "png/explain/C1:0.json",
                "explain/.json", OCCLUSION_PNG):
        assert not is_explain_output(rel)
    assert is_shard_manifest("explain.shard-1-of-2.json", of="explain.json")


def test_temp_names_round_trip():
    assert is_temp(temp_name("manifest.json", 1234)) and not is_temp("manifest.json")


@pytest.mark.parametrize("key,keys,clash", [
    ("cat.jpg", {"cat.jpg"}, None),
    ("manifest.json", set(), "manifest.json"),
    ("filters/a.png", set(), "filters"),
    ("manifest.shard-0-of-2.json", set(), "manifest.shard"),
    ("cat.jpg/png/C1.png", {"cat.jpg", "cat.jpg/png/C1.png"}, "inside the output folder of"),
])
def test_collisions(key, keys, clash):
    reason = collision(key, keys)
    assert (reason is None) if clash is None else (clash in reason)


def test_filter_pngs_are_zero_padded_so_they_sort_in_filter_order():
    lay = ImageLayout(kernels=(("C3", 12),), taps=(("C1", 6),), png=True)
    names = [p for p in lay.png_files() if ".kernels/" in p]
    assert names[:3] == ["png/C3.kernels/00.png", "png/C3.kernels/01.png", "png/C3.kernels/02.png"]
    assert sorted(names) == names  # 00 … 11: file order is filter order
    assert lay.filter_png("kernels", "C3", 11) == "png/C3.kernels/11.png"
    assert lay.filter_png("taps", "C1", 5) == "png/C1.taps/5.png"  # 6 filters: one digit
    wide = ImageLayout(kernels=(("features.3", 192),), png=True)
    assert wide.filter_png("kernels", "features.3", 7) == "png/features.3.kernels/007.png"


def test_topk_layout_names_and_ownership():
    from convmaps.io.layout import TopkLayout, is_topk_output

    lay = TopkLayout(modules=("features.0", "classifier.1"), png_caps=(1, 0), png=True)
    assert lay.files() == ["classifier.1.safetensors", "features.0.safetensors",
                           "manifest.json", "png/classifier.1.png", "png/features.0.png",
                           "png/features.0/0.png"]
    assert TopkLayout(modules=("C1",), png_caps=(3,)).files() == ["C1.safetensors",
                                                                   "manifest.json"]
    for rel in [*lay.files(), lay.state_file(1, 2), "manifest.shard-0-of-2.json",
                "png/C1/.3.png.99.tmp"]:
        assert is_topk_output(rel), rel
    for rel in ("notes.txt", "partial/notes.txt", "png/readme.md", "sub/C1.safetensors",
                "explain/C1/notes.txt", "explain/x.json"):
        assert not is_topk_output(rel), rel
    explained = TopkLayout(modules=("C1",), png_caps=(0,), explain=(12,))
    assert explained.files()[:2] == ["C1.safetensors", "explain/C1/00.json"]
    assert len(explained.files()) == 14 and all(is_topk_output(f) for f in explained.files())
