"""Error types shared by the exporter, the runtime and the CLIs.

Each error carries the one-line message a user sees; the CLIs (and later the service) map the
type to an exit code or HTTP status in one place, and show a traceback only with `--debug`.
"""

from __future__ import annotations


class ZspaError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code = 1


class InvalidInputError(ZspaError, ValueError):
    """A request the pipeline refuses: bad image, keep ratio, prompt length, sampling parameter."""

    exit_code = 2


class BundleError(ZspaError):
    """A bundle that cannot be trusted: missing or tampered file, unknown schema, bad manifest."""

    exit_code = 3


class ModelLoadError(ZspaError):
    """A source model that cannot be found, downloaded or understood."""

    exit_code = 4
