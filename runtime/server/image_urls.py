"""`image_url` → image bytes: `data:` URLs always, `http(s)` URLs only when the operator allows them.

A device service must not become a proxy that fetches whatever a client names, so remote images
are off by default; when on, `remote_images` fetches public hosts only, bounded in bytes and time.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re

from zspa.runtime.images import IMAGE_FORMATS
from zspa.runtime.server.errors import invalid
from zspa.runtime.server.remote_images import FetchPolicy, FetchRefused, ImageTooLarge, fetch

log = logging.getLogger("zspa.serve")

# A data URL's declared type → the one format its bytes may decode as.
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
_WRAPPING = re.compile(r"[\r\n\t ]")
_NO_WHITESPACE = str.maketrans("", "", "\r\n\t ")
_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


def image_bytes(url: str, param: str, *, max_bytes: int, remote: FetchPolicy | None,
                deadline: float | None = None) -> tuple[bytes, tuple[str, ...]]:
    """The image's bytes and the formats they may decode as: a data URL's declared one, or any
    allowed one for a download (servers often mislabel). `remote` None: downloads disabled; a
    download ends by `deadline` (time.monotonic()) at the latest."""
    if url.startswith("data:"):
        return _from_data_url(url, param, max_bytes)
    if url.startswith(("http://", "https://")):
        if remote is None:
            raise invalid("remote image URLs are disabled on this server; send the image as a data: URL "
                          "(or start zspa-serve with --allow-remote-images)", param, "remote_images_disabled")
        return _download(url, param, remote, deadline), IMAGE_FORMATS
    raise invalid("image_url must be a data: URL (data:image/png;base64,...) or an http(s) URL", param)


def _from_data_url(url: str, param: str, max_bytes: int) -> tuple[bytes, tuple[str, ...]]:
    match = _DATA_URL.fullmatch(url)
    if not match or ";base64" not in match["params"]:
        raise invalid("malformed data URL: expected data:image/<type>;base64,<data>", param)
    mime = match["mime"].lower()
    if mime not in IMAGE_TYPES:
        raise invalid(f"unsupported image type {mime or 'none'!r}; send PNG, JPEG, WebP or GIF", param)
    data = match["data"]
    if _WRAPPING.search(data):  # MIME-style base64 wrapped at 76 columns: the line breaks are not data
        data = data.translate(_NO_WHITESPACE)
    if len(data) * 3 // 4 > max_bytes:
        raise _too_large(param, max_bytes)
    try:
        return base64.b64decode(data, validate=True), (IMAGE_TYPES[mime],)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"image data is not valid base64 ({exc})", param) from None


def _download(url: str, param: str, policy: FetchPolicy, deadline: float | None) -> bytes:
    try:
        return fetch(url, policy, deadline=deadline)
    except ImageTooLarge:
        raise _too_large(param, policy.max_bytes) from None
    except FetchRefused as exc:
        log.warning("image fetch refused or failed: %s", exc)
        raise invalid("cannot fetch the image from that URL (the server log says why)", param,
                      "image_fetch_failed") from None


def _too_large(param: str, max_bytes: int):
    return invalid(f"image is over the {max_bytes:,}-byte limit (server --max-image-bytes)", param, "image_too_large")
