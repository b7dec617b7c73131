"""Signed bundles: zspa-sign / zspa-export --sign-key, and --verify-key refusing every kind of edit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("model_signing", reason="the sign extra is not installed (pip install 'zspa[sign]')")

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from zspa.errors import BundleError  # noqa: E402
from zspa.integrity import sha256_file  # noqa: E402
from zspa.runtime.bundle import Bundle  # noqa: E402


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    return _key_pair(tmp_path, "release")


@pytest.fixture
def signed(bundle_copy, keys) -> Path:
    done = subprocess.run([sys.executable, "-m", "zspa.cli.sign", str(bundle_copy), "--key", str(keys[0])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (bundle_copy / "model.sig").is_file()
    return bundle_copy


def test_a_signed_bundle_runs_with_its_key_and_engines_may_be_added(signed, keys):
    Bundle.open(signed, verify_key=keys[1])
    (signed / "engines" / "rtx-sm89-trt10").mkdir(parents=True)  # built on the device after signing
    (signed / "engines" / "rtx-sm89-trt10" / "decoder.plan").write_bytes(b"engine")
    Bundle.open(signed, verify_key=keys[1])
    run = subprocess.run([sys.executable, "-m", "zspa.cli.run", str(signed), "--image", "zspa/assets/example.png",
                          "--prompt", "What is it?", "--max-new-tokens", "2", "--verify-key", str(keys[1])],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr


def test_an_edited_graph_with_a_fresh_manifest_hash_is_refused(signed, keys):
    """What sha256 alone cannot catch: whoever edits a graph can rewrite its hash too."""
    with open(signed / "decoder.onnx", "ab") as graph:
        graph.write(b"\x00")
    manifest = json.loads((signed / "manifest.json").read_text())
    manifest["graphs"]["decoder"]["sha256"] = sha256_file(signed / "decoder.onnx")
    (signed / "manifest.json").write_text(json.dumps(manifest))
    Bundle.open(signed)  # the hashes agree: without a key nothing changes
    with pytest.raises(BundleError, match="signature check failed"):
        Bundle.open(signed, verify_key=keys[1])


def test_added_files_other_keys_and_unsigned_bundles_are_refused(signed, keys, tmp_path, bundle_copy):
    _, stranger = _key_pair(tmp_path, "stranger")
    with pytest.raises(BundleError, match="signature check failed"):
        Bundle.open(signed, verify_key=stranger)
    (signed / "extra.onnx").write_bytes(b"smuggled")
    with pytest.raises(BundleError, match="signature check failed.*extra.onnx"):
        Bundle.open(signed, verify_key=keys[1])
    (signed / "extra.onnx").unlink()
    (signed / "model.sig").unlink()
    with pytest.raises(BundleError, match="not signed"):
        Bundle.open(signed, verify_key=keys[1])


@pytest.mark.slow
def test_export_can_sign_and_refuses_a_missing_key_before_exporting(keys, tmp_path):
    from zspa.errors import InvalidInputError
    from zspa.export.exporter import ExportOptions, export_bundle

    with pytest.raises(InvalidInputError, match="no such file"):
        export_bundle(ExportOptions("tiny-random-llava", tmp_path / "x", sign_key=tmp_path / "nope.pem",
                                    progress=False))
    assert not (tmp_path / "x").exists()
    export_bundle(ExportOptions("tiny-random-llava", tmp_path / "b", sign_key=keys[0], progress=False))
    Bundle.open(tmp_path / "b", verify_key=keys[1])
