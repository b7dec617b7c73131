"""Connection limits uvicorn lacks: a deadline for each request's headers, and enough file descriptors.

uvicorn closes a connection that idles after a response (keep-alive timeout), but never one that
connects and sends nothing, or drips its headers a byte at a time (slowloris): thousands of those
held open exhaust the process's file descriptors (systemd's default soft limit is 1,024) and every
new connection, /health included, fails. Here a connection must complete a request's headers
within `header_timeout_s` of opening or of its previous response, and the soft descriptor limit is
raised at start-up to fit the connections (as far as the hard limit allows).
"""

from __future__ import annotations

import asyncio
import logging
import resource

log = logging.getLogger("zspa.serve")
# Descriptors the process needs besides connections: graphs, tokenizer, logs, thread pools, Ray.
RESERVED_FILES = 128


def http_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools where installed, as uvicorn's "auto" picks, else h11)
    with a header deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeaderDeadline(base):
        """Both uvicorn protocols replace `self.cycle` when a request's headers are complete: a
        timer that finds the same cycle, finished or never started, closes the connection."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            previous = getattr(self, "_header_deadline", None)
            if previous is not None:
                previous.cancel()
            self._header_deadline = self.loop.call_later(header_timeout_s, self._headers_overdue, self.cycle)

        def _headers_overdue(self, cycle) -> None:
            idle = cycle is None or cycle.response_complete
            if self.cycle is cycle and idle and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def connection_limit(wanted: int) -> int:
    """Raises the soft open-file limit as far as the hard limit allows, and returns how many
    connections fit in it: `wanted`, or fewer (with a warning) when the hard limit is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitting = max(1, soft - RESERVED_FILES)
        log.warning("--max-connections %d does not fit the open-file limit of %d; serving at most %d connections "
                    "(raise LimitNOFILE / ulimit -n)", wanted, soft, fitting)
        return fitting
    return wanted
