"""Bundle integrity (DESIGN §3): schema, hashes, missing files, atomic and guarded writes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from zspa.errors import BundleError, InvalidInputError
from zspa.runtime.bundle import Bundle


def _edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_valid_bundle_opens(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    assert sorted(bundle.manifest.graphs) == ["decoder", "embed", "pruner-zspa", "vision"]
    assert bundle.keeps() == [0.1, 0.25, 1.0] and bundle.methods == ["zspa"]


def test_tampered_graph_is_named(bundle_copy):
    with open(bundle_copy / "decoder.onnx", "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"decoder\.onnx: sha256 does not match"):
        Bundle.open(bundle_copy)


def test_missing_graph_is_named(bundle_copy):
    (bundle_copy / "pruner-zspa.onnx").unlink()
    with pytest.raises(BundleError, match=r"pruner-zspa\.onnx: missing"):
        Bundle.open(bundle_copy)


def test_tampered_tokenizer_is_named(bundle_copy):
    with open(bundle_copy / "tokenizer.json", "a") as fh:
        fh.write(" ")
    with pytest.raises(BundleError, match=r"tokenizer\.json: sha256"):
        Bundle.open(bundle_copy)


def test_newer_schema_is_refused(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99 is newer"):
        Bundle.open(bundle_copy)


def test_missing_manifest_field_is_named(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d["decoder"].pop("head_dim"))
    with pytest.raises(BundleError, match=r"missing field manifest\.decoder\.head_dim"):
        Bundle.open(bundle_copy)


def test_mistyped_manifest_field_is_named(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d["vision"].update(num_tokens="many"))
    with pytest.raises(BundleError, match=r"manifest\.vision\.num_tokens should be int"):
        Bundle.open(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path)
    with pytest.raises(BundleError, match="not a directory"):
        Bundle.open(tmp_path / "absent")


def test_staging_keeps_target_intact_on_failure(bundle_copy):
    from zspa.runtime.staging import staged_directory

    before = sorted(p.name for p in bundle_copy.iterdir())
    with pytest.raises(RuntimeError):
        with staged_directory(bundle_copy, force=True) as staging:
            (staging / "half-written.onnx").write_text("x")
            raise RuntimeError("export failed midway")
    assert sorted(p.name for p in bundle_copy.iterdir()) == before
    assert sorted(p.name for p in bundle_copy.parent.iterdir()) == ["bundle"]  # no leftovers


def test_staging_replaces_only_bundles_with_force(bundle_copy, tmp_path):
    from zspa.runtime.staging import staged_directory

    with pytest.raises(InvalidInputError, match="--force"):
        with staged_directory(bundle_copy, force=False):
            pass
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_text("x")
    (other / "manifest.json").write_text("{}")  # some other tool's manifest
    with pytest.raises(InvalidInputError, match="not a zspa bundle"):
        with staged_directory(other, force=True):
            pass
    assert (other / "holiday.jpg").exists()
    (bundle_copy / "notes.txt").write_text("mine")  # a bundle someone keeps their own files in
    with pytest.raises(InvalidInputError, match="holds notes.txt, which its manifest does not list"):
        with staged_directory(bundle_copy, force=True):
            pass
    (bundle_copy / "notes.txt").unlink()
    (bundle_copy / "engines").mkdir()  # zspa-build's output belongs to the bundle
    with staged_directory(bundle_copy, force=True) as staging:
        (staging / "manifest.json").write_text("new")
    assert sorted(p.name for p in bundle_copy.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/passwd", "sub/../../outside.onnx", "C:\\x.onnx",
                                  "..\\outside.onnx", ""])
def test_manifest_names_outside_the_bundle_are_refused(bundle_copy, name):
    _edit_manifest(bundle_copy, lambda d: d["graphs"]["decoder"].update(file=name))
    with pytest.raises(BundleError, match="not a path inside the bundle"):
        Bundle.open(bundle_copy)


def test_symlinks_out_of_the_bundle_are_refused(bundle_copy, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not the bundle's")
    (bundle_copy / "tokenizer.json").unlink()
    (bundle_copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleError, match="'tokenizer.json', which leads outside the bundle"):
        Bundle.open(bundle_copy)


def test_per_request_pruners_run_any_keep(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    assert bundle.pruner_for(0.3).keep == 0.3 and bundle.pruner_for(0.3).graph == "pruner-zspa"
    assert bundle.pruner_for(1.0) is None
    unpruned = Bundle(bundle.path, dataclasses.replace(bundle.manifest, pruners=[]))
    with pytest.raises(InvalidInputError, match="keep 0.1 needs a pruner, and this bundle has none"):
        unpruned.pruner_for(0.1)


def test_a_zspa_0_1_bundle_is_refused_with_the_way_out(bundle_copy):
    """zspa 0.1 wrote one fixed-K graph per keep and no vision kind; today's runtime feeds K per
    request, so such a bundle is refused as a whole, before anything loads."""
    def to_version_0_1(data):
        del data["vision"]["kind"]
        data["pruners"] = [{"method": "zspa", "keep": 0.1, "k": 58, "params": {}, "graph": "pruner-zspa"}]

    _edit_manifest(bundle_copy, to_version_0_1)
    with pytest.raises(BundleError, match=r"pruners\[0\] has a fixed K \(58\), the format of zspa 0.1; "
                                          "re-export it with this version"):
        Bundle.open(bundle_copy)


def _set(section: str, **values):
    return lambda d: d[section].update(values)


MALFORMED = {  # each ended as "unexpected error", exit 1, or was accepted and failed later
    "empty eos_token_ids": (_set("text", eos_token_ids=[]), "text.eos_token_ids is empty"),
    "eos outside the vocabulary": (_set("text", eos_token_ids=[10**9]), r"text.eos_token_ids\[0\] is 1000000000"),
    "max_context 10^30": (_set("text", max_context=10**30), "text.max_context is 10000000000000"),
    "zero std": (_set("vision", std=[0.2, 0.0, 0.2]), r"vision.std\[1\] is 0.0"),
    "resample 99": (_set("vision", resample=99), "vision.resample is 99"),
    "unknown kv_cache": (_set("decoder", kv_cache="paged"), "decoder.kv_cache is 'paged'"),
    "unknown kind": (_set("vision", kind="siglip"), "vision.kind is 'siglip'"),
    "a list for a kind": (_set("vision", kind=[]), r"vision.kind is \[\]"),  # was a TypeError (hypothesis)
    "another kind's spec": (_set("vision", kind="qwen2_vl"), "missing field manifest.vision.patch_size"),
    "M-RoPE for a 1-D kind": (_set("decoder", mrope=True), "vision.kind 'clip' takes 1-D positions, but decoder.mrope"),
    "no layers": (_set("decoder", num_layers=0), "decoder.num_layers is 0"),
    "true for a count": (_set("decoder", num_layers=True), r"manifest\.decoder\.num_layers should be int, got bool"),
    "a number in a string": (_set("vision", rescale_factor="0.5"), "vision.rescale_factor should be float, got str"),
    "a fractional dimension": (lambda d: d["graphs"]["embed"]["inputs"][0].update(shape=[1.5]),
                               r"manifest\.graphs\.embed\.inputs\[0\]\.shape\[0\] should be int or str, got float"),
    "tiles without bounds": (_set("vision", kind="internvl", tile_size=[448, 448], min_tiles=3, max_tiles=2,
                                  use_thumbnail=True, tokens_per_tile=256), "min_tiles and max_tiles"),
    "image text without the image": (_set("text", image_text="<img></img>"), "must hold the image token"),
    "two-channel mean": (_set("vision", mean=[0.5, 0.5]), "one value per RGB channel"),
    "keep 3": (lambda d: d["pruners"][0].update(keep=3.0), r"pruners\[0\] \(keep 3.0"),
    "NUL in a file name": (lambda d: d["files"].update({"tok\u0000en.json": d["files"].pop("tokenizer.json")}),
                           "control character"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_manifest_values_are_refused_naming_the_field(bundle_copy, case, capsys):
    from zspa.cli.run import main

    change, message = MALFORMED[case]
    _edit_manifest(bundle_copy, change)
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_copy)
    assert main([str(bundle_copy), "--image", "unused.png", "--prompt", "hi"]) == 3
    assert "unexpected" not in capsys.readouterr().err


def test_a_5000_digit_integer_in_the_manifest_is_a_bundle_error(bundle_copy):
    path = bundle_copy / "manifest.json"
    path.write_text(path.read_text().replace('"num_layers": ', '"num_layers": ' + "9" * 5000 + ", \"x\": ", 1))
    with pytest.raises(BundleError, match="a value cannot be read"):
        Bundle.open(bundle_copy)


def test_graph_inputs_that_differ_from_the_manifest_are_refused_on_load(bundle_copy):
    from zspa.runtime.pipeline import Pipeline

    _edit_manifest(bundle_copy, lambda d: d["graphs"]["embed"]["inputs"][0].update(name="token_ids"))
    with pytest.raises(BundleError, match=r"embed.onnx: the graph's inputs \['input_ids'\] are not manifest.json's"):
        Pipeline.load(bundle_copy)
