"""Signed bundles with OpenSSF model-signing: a bundle's sha256 values catch corruption, a
signature catches an edit (whoever changes a graph can change its hash, not the signature).

The signature (`model.sig`, a Sigstore bundle) covers every file in the bundle, manifest
included, except itself and `engines/` (TensorRT engines are built on the device, after signing).
Two offline modes, both what a device fleet uses: a bare elliptic-curve key (devices hold its
public key), or a key with an X.509 code-signing certificate (devices hold only the root: keys
can be rotated and revoked without touching them). Sigstore's keyless mode needs the network at
signing and verification time; model-signing's own CLI writes the same file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from zspa.errors import BundleError, InvalidInputError, ZspaError

SIGNATURE_NAME = "model.sig"
UNSIGNED = (SIGNATURE_NAME, "engines")
PASSWORD_ENV = "ZSPA_SIGN_KEY_PASSWORD"


@dataclass(frozen=True)
class SigningKey:
    """Who signs: a private key (PEM, password in $ZSPA_SIGN_KEY_PASSWORD) and, in certificate
    mode, its certificate and the chain up to (and including) the root devices trust."""

    private_key: Path
    certificate: Path | None = None
    certificate_chain: tuple[Path, ...] = ()

    def check(self) -> None:
        """Refuses missing files before any work is done (an export takes minutes)."""
        if self.certificate_chain and self.certificate is None:
            raise InvalidInputError("a certificate chain needs the signing certificate too")
        for file in (self.private_key, self.certificate, *self.certificate_chain):
            if file is not None and not Path(file).expanduser().is_file():
                raise InvalidInputError(f"{file}: no such file")


@dataclass(frozen=True)
class TrustPolicy:
    """What a device accepts: bundles one public key signed, or bundles signed with a
    code-signing certificate that chains to one of `certificate_roots` (never the system's
    public CAs: any of their customers could sign)."""

    public_key: Path | None = None
    certificate_roots: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if (self.public_key is None) == (not self.certificate_roots):
            raise InvalidInputError("trust either one public key or a set of root certificates")

    def check(self) -> None:
        for file in (self.public_key, *self.certificate_roots):
            if file is not None and not Path(file).expanduser().is_file():
                raise InvalidInputError(f"{file}: no such file")


def _model_signing():
    try:
        import model_signing
    except ImportError as exc:
        raise ZspaError(f"signing needs the sign extra ({exc.name} is missing): pip install 'zspa[sign]'") from None
    return model_signing


def _hashing(root: Path):
    return _model_signing().hashing.Config().set_ignored_paths(paths=[root / name for name in UNSIGNED])


def sign_bundle(path: str | Path, key: SigningKey) -> Path:
    """Writes PATH/model.sig over every file but itself and engines/."""
    root = Path(path).resolve()
    key.check()
    _refuse_links(root)
    config = _model_signing().signing.Config()
    private = Path(key.private_key).expanduser()
    try:
        if key.certificate is None:
            config.use_elliptic_key_signer(private_key=private, password=os.environ.get(PASSWORD_ENV))
        else:
            config.use_certificate_signer(private_key=private, signing_certificate=Path(key.certificate).expanduser(),
                                          certificate_chain=[Path(c).expanduser() for c in key.certificate_chain])
        config.set_hashing_config(_hashing(root)).sign(root, root / SIGNATURE_NAME)
    except (ValueError, TypeError) as exc:
        raise ZspaError(f"{private}: cannot sign with this key ({exc})") from None
    return root / SIGNATURE_NAME


def verify_bundle(path: str | Path, trust: TrustPolicy) -> None:
    """Refuses an unsigned bundle, a signer `trust` does not name, and any added, removed or changed file."""
    config = _model_signing().verifying.Config()  # first: its message names the extra to install
    from cryptography.exceptions import InvalidSignature
    from OpenSSL.crypto import X509StoreContextError

    root = Path(path).resolve()
    trust.check()
    if not (root / SIGNATURE_NAME).is_file():
        raise BundleError(f"{root}: not signed (no {SIGNATURE_NAME}); sign it with zspa-sign, or run without "
                          "--verify-key / --verify-certificate-chain")
    _require_mode(root / SIGNATURE_NAME, "publicKey" if trust.public_key is not None else "x509CertificateChain")
    try:
        if trust.public_key is not None:
            config.use_elliptic_key_verifier(public_key=Path(trust.public_key).expanduser())
        else:
            config.use_certificate_verifier(certificate_chain=[Path(c).expanduser() for c in trust.certificate_roots])
    except (ValueError, TypeError, OSError) as exc:  # not PEM, not an EC key, not a certificate
        files = ", ".join(map(str, (trust.public_key,) if trust.public_key else trust.certificate_roots))
        raise InvalidInputError(f"{files}: not a usable {'public key' if trust.public_key else 'root certificate'} "
                                f"({str(exc) or type(exc).__name__})") from None
    try:
        config.set_hashing_config(_hashing(root)).verify(root, root / SIGNATURE_NAME)
    except (ValueError, InvalidSignature, X509StoreContextError) as exc:
        reason = str(exc) or type(exc).__name__
        raise BundleError(f"{root}: signature check failed: {reason[:500]}") from None


def _refuse_links(root: Path) -> None:
    """A signature covers regular files; a symlink would be signed as whatever it points at today."""
    for current, folders, files in os.walk(root):
        folders[:] = [f for f in folders if not (Path(current) == root and f in UNSIGNED)]
        for name in (*folders, *files):
            path = Path(current) / name
            if path.is_symlink():
                raise InvalidInputError(f"{path}: a symlink; a signed bundle holds regular files only (copy the "
                                        "file in its place)")


_MODES = {"publicKey": "a bare key", "x509CertificateChain": "a certificate", "certificate": "Sigstore"}


def _require_mode(signature: Path, expected: str) -> None:
    """A signature made in another mode than the policy trusts is refused by name (model-signing
    itself fails on it with an AttributeError)."""
    try:
        material = json.loads(signature.read_text(encoding="utf-8"))["verificationMaterial"]
        found = next(mode for mode in _MODES if material.get(mode))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise BundleError(f"{signature}: signature check failed: not a model-signing signature") from None
    if found != expected:
        raise BundleError(f"{signature}: signature check failed: signed with {_MODES[found]}, but this device "
                          f"trusts {_MODES[expected]} (--verify-key or --verify-certificate-chain)")
