"""Resolving `--model` (built-in name, alias, local directory or hub id) to a loaded model.

Hub ids go through transformers' `from_pretrained`, cache first. When the model is not cached
and the hub cannot be reached, we fail within seconds with the way out (a local directory),
instead of letting a download retry for minutes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from zspa.errors import ModelLoadError
from zspa.families import MODEL_ALIASES, TINY_MODELS, build_tiny_model, family_for_model_type
from zspa.manifest import SourceSpec

HUB_PROBE_TIMEOUT_S = 5.0
# org/name as the hub spells it ("Qwen/Qwen2.5-VL-7B-Instruct"); anything else with a slash is a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    family: ModuleType
    source: SourceSpec


def load_model(name: str, revision: str | None = None) -> LoadedModel:
    trained = _trained_builtins()
    if name in trained:
        directory, script = trained[name]
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"{name} is not trained yet: run `python benchmarks/{script}`")
        family = family_for_model_type(_local_model_type(directory))
        model, processor = _load(family, str(directory), revision=None, local_files_only=True)
        return LoadedModel(model, processor, family, SourceSpec(name, None, random_weights=False))
    if name in TINY_MODELS:
        model, processor = build_tiny_model(name)
        family = family_for_model_type(model.config.model_type)
        return LoadedModel(model, processor, family, SourceSpec(name, None, random_weights=True))

    local = Path(name).expanduser()
    if local.is_dir():
        family = family_for_model_type(_local_model_type(local))
        model, processor = _load(family, str(local), revision=None, local_files_only=True)
        return LoadedModel(model, processor, family, SourceSpec(str(local.resolve()), None, random_weights=False))
    if name in MODEL_ALIASES:  # before the path check: "qwen2.5-vl-3b" looks like a file name
        return _load_from_hub(MODEL_ALIASES[name], revision)
    if not _HUB_ID.fullmatch(name) and ("/" in name or local.suffix or name.startswith((".", "~"))):
        raise ModelLoadError(f"{name}: no such directory")

    model_id = name
    if "/" not in model_id:
        aliases = ", ".join(sorted(MODEL_ALIASES))
        raise ModelLoadError(
            f"unknown model {name!r}: give a Hugging Face id (org/name), a local directory, "
            f"an alias ({aliases}), or a built-in model ({', '.join([*trained, *TINY_MODELS])})"
        )
    return _load_from_hub(model_id, revision)


def _trained_builtins() -> dict[str, tuple[Path, str]]:
    """Built-in models whose weights ship in the package: name → (directory, training script)."""
    from zspa.export.needles import NEEDLES_MODEL_DIR, NEEDLES_MODEL_NAME
    from zspa.export.shapes import SHAPES_MODEL_DIR, SHAPES_MODEL_NAME

    return {SHAPES_MODEL_NAME: (SHAPES_MODEL_DIR, "train_shapes.py"),
            NEEDLES_MODEL_NAME: (NEEDLES_MODEL_DIR, "train_needles.py")}


def _load_from_hub(model_id: str, revision: str | None) -> LoadedModel:
    from transformers import AutoConfig

    try:  # cached already: no network needed
        config = AutoConfig.from_pretrained(model_id, revision=revision, local_files_only=True)
        family = family_for_model_type(config.model_type)
        model, processor = _load(family, model_id, revision, local_files_only=True)
    except (OSError, ValueError):
        _require_hub(model_id)
        config = AutoConfig.from_pretrained(model_id, revision=revision)
        family = family_for_model_type(config.model_type)
        model, processor = _load(family, model_id, revision, local_files_only=False)
    resolved = getattr(model.config, "_commit_hash", None) or revision
    return LoadedModel(model, processor, family, SourceSpec(model_id, resolved, random_weights=False))


def _load(family: ModuleType, source: str, revision: str | None, local_files_only: bool):
    try:
        return family.load(source, revision=revision, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        if local_files_only and not Path(source).is_dir():
            raise
        raise ModelLoadError(f"{source}: could not load model and processor ({exc})") from exc


def _local_model_type(directory: Path) -> str:
    config = directory / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{directory}: no config.json; save the model with save_pretrained() first")
    try:
        return json.loads(config.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ModelLoadError(f"{config}: unreadable or missing model_type ({exc})") from None


def _require_hub(model_id: str) -> None:
    """Fails fast, with a way out, when the hub is unreachable and the model is not cached."""
    hint = (
        f"{model_id} is not in the Hugging Face cache and the hub cannot be reached. On a machine with "
        f"network access run `hf download {model_id} --local-dir DIR` (or save_pretrained the model and "
        f"its processor into DIR), copy DIR here and pass `--model DIR`"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelLoadError(f"HF_HUB_OFFLINE is set: {hint}")
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        model_info(model_id, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{model_id}: no such model on the Hugging Face hub (or it is private)") from None
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise ModelLoadError(f"{hint} ({type(exc).__name__})") from None
