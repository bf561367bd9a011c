"""The client request a thread is working for: its id and the volumes it touched.

The service's WSGI front (mkv.service.requestlog) sets it when a request comes in and
clears it when the answer is sent. Whatever runs for the request reads it: the volume
client sends the id to nginx as X-Request-Id and notes every volume it sends to
(mkv.volumes.wire), and every log line carries the id (mkv.logs). Other processes
(health, writer, tools) never set it, so their volume requests carry no id.

It is a context variable, so every thread of a gthread worker has its own. Work handed
to an executor does not take it along by itself: the submitter runs the work in a copy
of its context (`contextvars.copy_context().run`, as mkv.volumes.pool.FanOut does). The
copy holds the same RequestContext object, so the volumes noted there are the request's.
"""

from __future__ import annotations

from contextvars import ContextVar

#: The header that carries the id, from the client, to the client and to the volumes.
HEADER = "X-Request-Id"


class RequestContext:
    """One client request: its id and the volumes sent to for it, in first-use order."""

    __slots__ = ("id", "volumes", "_header")

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        self.volumes: dict[str, None] = {}  # an ordered set
        self._header = ""

    def header_line(self) -> str:
        """`X-Request-Id: <id>` with its CRLF, made once: a PUT sends it several times."""
        if not self._header:
            self._header = f"{HEADER}: {self.id}\r\n"
        return self._header


_CURRENT: ContextVar[RequestContext | None] = ContextVar("mkv_request", default=None)


def enter(ctx: RequestContext | None) -> None:
    """Make `ctx` the current thread's request (None: no request)."""
    _CURRENT.set(ctx)


def current() -> RequestContext | None:
    return _CURRENT.get()


def current_id() -> str | None:
    ctx = _CURRENT.get()
    return ctx.id if ctx is not None else None


def touch(volume: str) -> None:
    """Note that the current request involves `volume` (e.g. a GET's redirect target)."""
    ctx = _CURRENT.get()
    if ctx is not None:
        ctx.volumes[volume] = None


def sending_to(volume: str) -> str:
    """A request to `volume` is being encoded: note the volume, and return the header
    lines the request carries for it (the id, or nothing outside a client request)."""
    ctx = _CURRENT.get()
    if ctx is None:
        return ""
    ctx.volumes[volume] = None
    return ctx.header_line()
