"""zspa: export vision-language models to pruned, compiled graph bundles and run them on the edge.

`import zspa` stays light (no torch, no onnxruntime). The repository keeps the card's folders
(`export/`, `runtime/`, `calibration/`) beside `zspa/`; an installed wheel maps them into the
`zspa.*` namespace, and a source checkout gets the same mapping from the finder below, so that
`pip install .`, `pip install -e .` and `pytest` from the repository root all import the same code.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.2.0"

_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent
_CHECKOUT_PACKAGES = {
    f"{__name__}.{folder}": _CHECKOUT_ROOT / folder
    for folder in ("export", "runtime", "calibration")
    if (_CHECKOUT_ROOT / folder / "__init__.py").is_file() and not (Path(__file__).parent / folder).exists()
}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Resolves `zspa.<folder>` to the top-level folder of a source checkout."""

    def find_spec(self, fullname, path, target=None):  # noqa: D102 - importlib protocol
        folder = _CHECKOUT_PACKAGES.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if _CHECKOUT_PACKAGES and not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFinder())
