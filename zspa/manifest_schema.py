"""The bundle manifest's JSON Schema, generated from the manifest's own dataclasses (pydantic reads
them; the runtime does not need it), so the published schema cannot drift from what is read:

    python -m zspa.manifest_schema > docs/bundle-schema.json

`vision` is one of the preprocessing kinds' specs, told apart by `kind`. Ranges and cross-field
rules (`check_values`) are the reader's; the schema gives the shape."""

from __future__ import annotations

import json
from typing import Any

from zspa.manifest import SCHEMA_VERSION, VISION_SPECS, Manifest


def manifest_schema() -> dict[str, Any]:
    from pydantic import TypeAdapter

    schema = TypeAdapter(Manifest).json_schema()
    definitions = schema.setdefault("$defs", {})
    variants = []
    for kind, spec in VISION_SPECS.items():
        variant = TypeAdapter(spec).json_schema()
        definitions.update(variant.pop("$defs", {}))
        variant["properties"]["kind"] = {"const": kind}
        variant["title"] = f"{spec.__name__} ({kind})"
        definitions[f"vision_{kind}"] = variant
        variants.append({"$ref": f"#/$defs/vision_{kind}"})
    definitions.pop("VisionSpec", None)  # the base: every manifest carries one of its kinds
    schema["properties"]["vision"] = {"oneOf": variants}
    schema["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


if __name__ == "__main__":
    print(json.dumps(manifest_schema(), indent=2))
