"""Signed bundles with OpenSSF model-signing: a bundle's sha256 values catch corruption, a
signature catches an edit (whoever changes a graph can change its hash, not the signature).

The signature (`model.sig`, a Sigstore bundle) covers every file in the bundle, manifest
included, except itself and `engines/` (TensorRT engines are built on the device, after signing).
Offline keys (elliptic curve, PEM) are what a device fleet uses; model-signing's sigstore and
certificate modes work on the same file with its own CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

from zspa.errors import BundleError, ZspaError

SIGNATURE_NAME = "model.sig"
UNSIGNED = (SIGNATURE_NAME, "engines")
PASSWORD_ENV = "ZSPA_SIGN_KEY_PASSWORD"


def _model_signing():
    try:
        import model_signing
    except ImportError as exc:
        raise ZspaError(f"signing needs the sign extra ({exc.name} is missing): pip install 'zspa[sign]'") from None
    return model_signing


def _hashing(root: Path):
    return _model_signing().hashing.Config().set_ignored_paths(paths=[root / name for name in UNSIGNED])


def sign_bundle(path: str | Path, private_key: str | Path) -> Path:
    """Writes PATH/model.sig; the key's password, if any, comes from $ZSPA_SIGN_KEY_PASSWORD."""
    root = Path(path).resolve()
    key = Path(private_key).expanduser()
    if not key.is_file():
        raise ZspaError(f"{key}: no such private key file")
    signing = _model_signing().signing
    try:
        signing.Config().use_elliptic_key_signer(private_key=key, password=os.environ.get(PASSWORD_ENV)) \
            .set_hashing_config(_hashing(root)).sign(root, root / SIGNATURE_NAME)
    except (ValueError, TypeError) as exc:
        raise ZspaError(f"{key}: cannot sign with this key ({exc})") from None
    return root / SIGNATURE_NAME


def verify_bundle(path: str | Path, public_key: str | Path) -> None:
    """Refuses an unsigned bundle, another key's signature, and any added, removed or changed file."""
    root = Path(path).resolve()
    key = Path(public_key).expanduser()
    if not key.is_file():
        raise ZspaError(f"{key}: no such public key file")
    if not (root / SIGNATURE_NAME).is_file():
        raise BundleError(f"{root}: not signed (no {SIGNATURE_NAME}); sign it with zspa-sign, or run without "
                          "--verify-key")
    verifying = _model_signing().verifying
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=key).set_hashing_config(_hashing(root)) \
            .verify(root, root / SIGNATURE_NAME)
    except ValueError as exc:
        raise BundleError(f"{root}: signature check failed: {str(exc)[:500]}") from None
