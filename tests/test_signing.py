"""Signed bundles: zspa-sign / zspa-export --sign-key, and --verify-key refusing every kind of edit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("model_signing", reason="the sign extra is not installed (pip install 'zspa[sign]')")

import datetime as dt  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from zspa.errors import BundleError, ZspaError  # noqa: E402
from zspa.integrity import sha256_file  # noqa: E402
from zspa.runtime.bundle import Bundle  # noqa: E402
from zspa.signing import SigningKey, TrustPolicy  # noqa: E402


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
    Bundle.open(signed, trust=TrustPolicy(public_key=keys[1]))
    (signed / "engines" / "rtx-sm89-trt10").mkdir(parents=True)  # built on the device after signing
    (signed / "engines" / "rtx-sm89-trt10" / "decoder.plan").write_bytes(b"engine")
    Bundle.open(signed, trust=TrustPolicy(public_key=keys[1]))
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
        Bundle.open(signed, trust=TrustPolicy(public_key=keys[1]))


def test_added_files_other_keys_and_unsigned_bundles_are_refused(signed, keys, tmp_path, bundle_copy):
    _, stranger = _key_pair(tmp_path, "stranger")
    with pytest.raises(BundleError, match="signature check failed"):
        Bundle.open(signed, trust=TrustPolicy(public_key=stranger))
    (signed / "extra.onnx").write_bytes(b"smuggled")
    with pytest.raises(BundleError, match="signature check failed.*extra.onnx"):
        Bundle.open(signed, trust=TrustPolicy(public_key=keys[1]))
    (signed / "extra.onnx").unlink()
    (signed / "model.sig").unlink()
    with pytest.raises(BundleError, match="not signed"):
        Bundle.open(signed, trust=TrustPolicy(public_key=keys[1]))


@pytest.mark.slow
def test_export_can_sign_and_refuses_a_missing_key_before_exporting(keys, tmp_path):
    from zspa.errors import InvalidInputError
    from zspa.export.exporter import ExportOptions, export_bundle

    with pytest.raises(InvalidInputError, match="no such file"):
        export_bundle(ExportOptions("tiny-random-llava", tmp_path / "x", signing=SigningKey(tmp_path / "nope.pem"),
                                    progress=False))
    assert not (tmp_path / "x").exists()
    export_bundle(ExportOptions("tiny-random-llava", tmp_path / "b", signing=SigningKey(keys[0]), progress=False))
    Bundle.open(tmp_path / "b", trust=TrustPolicy(public_key=keys[1]))


def _certificate(folder: Path, name: str, key, subject_key, issuer: x509.Name | None, *, code_signing: bool = True,
                 ca: bool = False) -> tuple[Path, x509.Name]:
    """A PEM certificate for `subject_key`, signed by `key` (self-signed when `issuer` is None)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
               .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    elif code_signing:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    else:  # a TLS server certificate: no digital signature usage, no code signing
        builder = builder.add_extension(x509.KeyUsage(False, False, True, False, False, False, False, False, False),
                                        critical=True)
    certificate = builder.sign(key, hashes.SHA256())
    path = folder / f"{name}.crt"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path, subject


@pytest.fixture
def pki(tmp_path) -> dict[str, Path]:
    """A release root CA, the signing key it certified for code signing, and a stranger's root."""
    root_key, signer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root, root_name = _certificate(tmp_path, "release-root", root_key, root_key, None, ca=True)
    signer = _certificate(tmp_path, "release-signer", root_key, signer_key, root_name)[0]
    tls_only = _certificate(tmp_path, "tls-server", root_key, signer_key, root_name, code_signing=False)[0]
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _certificate(tmp_path, "stranger-root", stranger_key, stranger_key, None, ca=True)[0]
    key = tmp_path / "release-signer.pem"
    key.write_bytes(signer_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return {"root": root, "signer": signer, "key": key, "tls_only": tls_only, "stranger": stranger}


def test_certificate_mode_trusts_the_root_not_a_key(bundle_copy, pki, keys):
    done = subprocess.run([sys.executable, "-m", "zspa.cli.sign", str(bundle_copy), "--key", str(pki["key"]),
                           "--certificate", str(pki["signer"]), "--certificate-chain", str(pki["root"])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    Bundle.open(bundle_copy, trust=TrustPolicy(certificate_roots=(pki["root"],)))
    with pytest.raises(BundleError, match="signature check failed"):
        Bundle.open(bundle_copy, trust=TrustPolicy(certificate_roots=(pki["stranger"],)))
    with pytest.raises(BundleError, match="signature check failed"):  # a key policy does not accept a certificate
        Bundle.open(bundle_copy, trust=TrustPolicy(public_key=keys[1]))
    with open(bundle_copy / "decoder.onnx", "ab") as graph:
        graph.write(b"\x00")
    with pytest.raises(BundleError, match="signature check failed.*decoder.onnx"):
        Bundle.open(bundle_copy, trust=TrustPolicy(certificate_roots=(pki["root"],)))


def test_certificate_mode_refuses_a_bare_key_signature_and_a_non_signing_certificate(bundle_copy, pki, keys):
    from zspa.signing import sign_bundle

    roots = TrustPolicy(certificate_roots=(pki["root"],))
    sign_bundle(bundle_copy, SigningKey(keys[0]))
    with pytest.raises(BundleError, match="signature check failed"):
        Bundle.open(bundle_copy, trust=roots)
    sign_bundle(bundle_copy, SigningKey(pki["key"], pki["tls_only"], (pki["root"],)))
    with pytest.raises(BundleError, match="cannot be used for signing"):
        Bundle.open(bundle_copy, trust=roots)
    with pytest.raises(ZspaError, match="cannot sign with this key"):  # the certificate is someone else's
        sign_bundle(bundle_copy, SigningKey(keys[0], pki["signer"], (pki["root"],)))


def test_trust_and_signing_flags(bundle_copy, pki, keys):
    """The device side through zspa-run, and the flag combinations that cannot mean anything."""
    sign = [sys.executable, "-m", "zspa.cli.sign", str(bundle_copy), "--key", str(pki["key"]), "--certificate",
            str(pki["signer"]), "--certificate-chain", str(pki["root"])]
    assert subprocess.run(sign, capture_output=True, text=True, timeout=120).returncode == 0
    run = [sys.executable, "-m", "zspa.cli.run", str(bundle_copy), "--image", "zspa/assets/example.png", "--prompt",
           "What is it?", "--max-new-tokens", "2"]
    cwd = Path(__file__).resolve().parents[1]
    trusted = subprocess.run([*run, "--verify-certificate-chain", str(pki["root"])], capture_output=True, text=True,
                             timeout=300, cwd=cwd)
    assert trusted.returncode == 0, trusted.stderr
    stranger = subprocess.run([*run, "--verify-certificate-chain", str(pki["stranger"])], capture_output=True,
                              text=True, timeout=300, cwd=cwd)
    assert stranger.returncode == 3 and "signature check failed" in stranger.stderr
    both = subprocess.run([*run, "--verify-key", str(keys[1]), "--verify-certificate-chain", str(pki["root"])],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    target = bundle_copy.parent / "x"
    export = [sys.executable, "-m", "zspa.cli.export", "--model", "tiny-random-llava", "--output", str(target)]
    no_key = subprocess.run([*export, "--sign-certificate", str(pki["signer"])], capture_output=True, text=True,
                            timeout=120)
    assert no_key.returncode != 0 and "--sign-certificate needs --sign-key" in no_key.stderr
    assert not target.exists()


def test_a_symlink_and_a_malformed_verify_key_are_named(bundle_copy, keys, tmp_path):
    """model-signing's own errors blamed the signing key for a symlink in the bundle, and gave an
    'unexpected ValueError' for a --verify-key that is not a PEM public key."""
    from zspa.errors import InvalidInputError
    from zspa.signing import SigningKey, sign_bundle

    (bundle_copy / "extra.txt").symlink_to(bundle_copy / "tokenizer.json")
    with pytest.raises(InvalidInputError, match="extra.txt: a symlink"):
        sign_bundle(bundle_copy, SigningKey(keys[0]))
    assert not (bundle_copy / "model.sig").exists()
    (bundle_copy / "extra.txt").unlink()
    sign_bundle(bundle_copy, SigningKey(keys[0]))
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    with pytest.raises(InvalidInputError, match="garbage.pub: not a usable public key"):
        Bundle.open(bundle_copy, trust=TrustPolicy(public_key=garbage))
    run = subprocess.run([sys.executable, "-m", "zspa.cli.run", str(bundle_copy), "--image", "x.png", "--prompt", "hi",
                          "--verify-key", str(garbage)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not a usable public key" in run.stderr and "unexpected" not in run.stderr
