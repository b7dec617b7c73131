"""Hugging Face VLM → zspa bundle: graph export, manifest, parity checks (torch, transformers, onnx)."""
