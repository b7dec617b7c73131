"""Adapters that let other tools drive a zspa bundle (each imports its tool only when used)."""

from __future__ import annotations


def lmms_eval_models():
    """Entry point of group `lmms_eval.models` (lmms-eval ≥ 0.7 loads it before its CLI runs):
    registers `--model zspa`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="zspa", simple_class_path="zspa.integrations.lmms_eval.ZspaLMM")
