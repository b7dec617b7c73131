"""Opening a bundle: manifest schema, file presence and sha256 of every graph and asset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from zspa.errors import BundleError, InvalidInputError
from zspa.integrity import sha256_file
from zspa.manifest import MANIFEST_NAME, Manifest, PrunerSpec
from zspa.pruning.budget import validate_keep
from zspa.runtime.vision_kinds import check_kind
from zspa.signing import TrustPolicy, verify_bundle


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, trust: TrustPolicy | None = None) -> Bundle:
        """Reads the manifest and, unless `verify` is False, refuses any missing or altered file;
        with `trust`, also any bundle a signer it names did not sign as it is."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise BundleError(f"{root}: not a directory (expected a zspa bundle)")
        if trust is not None:
            verify_bundle(root, trust)  # before the manifest is read: it is one of the signed files
        manifest = Manifest.read(root / MANIFEST_NAME)
        check_kind(manifest.vision, manifest.decoder)
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def listed_files(self) -> dict[str, str]:
        """Every file the manifest lists (graphs, their weights, assets) → its sha256."""
        expected = dict(self.manifest.files)
        for graph in self.manifest.graphs.values():
            expected[graph.file] = graph.sha256
            expected.update(graph.data_files)
        return expected

    def verify(self) -> None:
        for name, digest in self.listed_files().items():
            file = self.member(name)
            if not file.is_file():
                raise BundleError(f"{file}: missing from the bundle (listed in manifest.json)")
            if sha256_file(file) != digest:
                raise BundleError(f"{file}: sha256 does not match manifest.json; the file was modified or corrupted")

    def member(self, name: str) -> Path:
        """`name` inside the bundle, refused when a (tampered) manifest points elsewhere: an absolute
        path, `..`, or a symlink whose target lies outside the bundle."""
        relative = PurePosixPath(name)
        if (not name or relative.is_absolute() or PureWindowsPath(name).drive or "\\" in name
                or ".." in relative.parts or "\x00" in name):
            raise BundleError(f"manifest.json names {name!r}, which is not a path inside the bundle")
        path = self.path / relative
        if not path.resolve().is_relative_to(self.path.resolve()):
            raise BundleError(f"manifest.json names {name!r}, which leads outside the bundle (a symlink)")
        return path

    def graph_file(self, graph: str) -> Path:
        try:
            return self.member(self.manifest.graphs[graph].file)
        except KeyError:
            raise BundleError(f"{self.path}: manifest.json lists no {graph!r} graph") from None

    @property
    def methods(self) -> list[str]:
        """Pruning methods in the bundle, the default (the first exported) first."""
        return list(dict.fromkeys(p.method for p in self.manifest.pruners))

    def require_method(self, method: str) -> None:
        if method not in self.methods:
            raise InvalidInputError(
                f"pruning method {method!r} is not in this bundle; available: {', '.join(self.methods) or 'none'}"
            )

    def keeps(self, method: str | None = None) -> list[float]:
        """The keep ratios exported for a method, and 1.0 (no pruning): the defaults of run, serve,
        profile and eval. Per-request pruners run any other keep too."""
        method = method or self.default_method
        return sorted({p.keep for p in self.manifest.pruners if p.method == method}) + [1.0]

    @property
    def default_method(self) -> str | None:
        return self.manifest.pruners[0].method if self.manifest.pruners else None

    def pruner_for(self, keep: float, method: str | None = None) -> PrunerSpec | None:
        """The pruner that runs `keep` for `method` (None for keep 1.0): the method's per-request
        graph, its spec carrying this keep; an error naming the bundle's methods otherwise."""
        method = method or self.default_method
        if method is not None:
            self.require_method(method)
        if validate_keep(keep) == 1.0:
            return None
        if method is None:
            raise InvalidInputError(f"keep {keep:g} needs a pruner, and this bundle has none: use keep 1.0, or "
                                    "re-export it with --keep below 1")
        pruner = next(p for p in self.manifest.pruners if p.method == method)
        return dataclasses.replace(pruner, keep=keep)
