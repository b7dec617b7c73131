"""The published manifest schema (docs/bundle-schema.json): generated from the manifest's own
dataclasses, in step with them, and every built-in family's bundle validates against it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from zspa.manifest_schema import manifest_schema

PUBLISHED = Path(__file__).resolve().parent.parent / "docs" / "bundle-schema.json"


def test_the_published_schema_is_the_generated_one():
    assert json.loads(PUBLISHED.read_text()) == manifest_schema(), (
        "the manifest changed: python -m zspa.manifest_schema > docs/bundle-schema.json")


@pytest.mark.parametrize("bundle_fixture", ["tiny_bundle", "static_bundle", "qwen_bundle", "qwen3_bundle",
                                            "internvl_bundle", "gemma3_bundle"])
def test_every_familys_manifest_validates(bundle_fixture, request):
    manifest = json.loads((request.getfixturevalue(bundle_fixture) / "manifest.json").read_text())
    jsonschema.Draft202012Validator(manifest_schema()).validate(manifest)


@pytest.mark.parametrize("damage, where", [
    (lambda m: m["vision"].update(kind="video"), "vision"),
    (lambda m: m["vision"].pop("num_tokens"), "vision"),
    (lambda m: m["decoder"].update(num_layers="8"), "num_layers"),
    (lambda m: m.update(schema_version=99), "schema_version"),
    (lambda m: m["pruners"][0].pop("graph"), "graph"),
])
def test_the_schema_refuses_what_the_reader_refuses(tiny_bundle, damage, where):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    broken = copy.deepcopy(manifest)
    damage(broken)
    with pytest.raises(jsonschema.ValidationError) as error:
        jsonschema.Draft202012Validator(manifest_schema()).validate(broken)
    assert where in error.value.json_path or where in error.value.message
