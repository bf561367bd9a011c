"""Every request's id and its line in the access log, for the service's WSGI front
(mkv.service.app.FastReads).

A request keeps the client's X-Request-Id when it is sane (`request_id`), else gets a
new one; the id goes back on every answer, to the volumes with every request made for
it (mkv.context, mkv.volumes.wire), and into every log line about it (mkv.logs). When
the answer is done, one access line: remote address, method, path, status, bytes in
and out, duration, the volumes touched, the id.

The fast read path pays for little here: a header lookup and one precompiled match, or
8 random bytes; a context variable set and cleared; and the access line when it is on.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mkv import context, logs
from mkv.config import Config
from mkv.context import RequestContext

ENV_HEADER = "HTTP_X_REQUEST_ID"
MAX_ID_CHARS = 128
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % MAX_ID_CHARS)

#: The access log's logger; it does not propagate, its handler is its own (`access_logger`).
ACCESS_LOGGER = "mkv.access"


def new_id() -> str:
    """16 random hex digits: unique enough to find one request among a day's."""
    return os.urandom(8).hex()


def request_id(given: str | None) -> str:
    """The client's id when it is at most 128 of `A-Za-z0-9._:-`, else a new one: a
    value that could break a header or a log line (CR, LF, spaces, 4 KiB) is never
    echoed or logged."""
    if given and _SANE_ID.fullmatch(given):
        return given
    return new_id()


def raw_target(env: dict) -> str:
    """The path (and query) as the client sent it, still percent-encoded: it has no
    spaces or line breaks to forge log fields with (HTTP allows none in a target)."""
    raw = env.get("RAW_URI") or env.get("REQUEST_URI")
    if raw is None:
        query = env.get("QUERY_STRING")
        raw = env.get("PATH_INFO", "") + ("?" + query if query else "")
    return raw if raw.isprintable() else raw.encode("unicode_escape").decode("ascii")


class Served(RequestContext):
    """A request being answered: the context its work sees, plus what the access line
    says about it."""

    __slots__ = ("env", "started", "status", "bytes_out", "body_in")

    def __init__(self, request_id: str, env: dict) -> None:
        super().__init__(request_id)
        self.env = env
        self.started = time.perf_counter()
        self.status = ""
        self.bytes_out = 0
        self.body_in: CountedInput | None = None

    def bytes_in(self) -> int:
        return self.body_in.count if self.body_in is not None else 0


def access_fields(served: Served, now: float) -> dict[str, Any]:
    """What the access line holds (the id is added by the log format, as on every line)."""
    env = served.env
    return {
        "remote": env.get("REMOTE_ADDR") or "-",
        "method": env.get("REQUEST_METHOD", "-"),
        "path": raw_target(env),
        "status": int(served.status[:3]) if served.status[:3].isdigit() else 0,
        "bytes_in": served.bytes_in(),
        "bytes_out": served.bytes_out,
        "duration_ms": round((now - served.started) * 1000, 3),
        "volumes": list(served.volumes),
    }


def access_message(f: dict[str, Any]) -> str:
    """The access line's text: `remote method path status in=N out=N 1.234ms volumes=a,b`."""
    return (f"{f['remote']} {f['method']} {f['path']} {f['status']} in={f['bytes_in']} "
            f"out={f['bytes_out']} {f['duration_ms']:.3f}ms "
            f"volumes={','.join(f['volumes']) or '-'}")


def access_logger(cfg: Config) -> logging.Logger | None:
    """The access log the configuration asks for (`access_log`: -, a file, or off), in
    `log_format`; None when it is off. gunicorn's own access log stays off."""
    log = logging.getLogger(ACCESS_LOGGER)
    log.propagate = False
    if cfg.access_log == "off":
        logs.replace_handlers(log, None)
        return None
    logs.replace_handlers(log, logs.handler(cfg.access_log, cfg.log_format))
    log.setLevel(logging.INFO)
    return log


class CountedInput:
    """The request body stream, counting the bytes the app reads from it."""

    __slots__ = ("raw", "count")

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self.raw.readline(size)
        self.count += len(data)
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines = self.raw.readlines(hint)
        self.count += sum(len(line) for line in lines)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class RequestLog:
    """Begins and finishes every request the service answers."""

    def __init__(self, access: logging.Logger | None) -> None:
        self.access = access

    def begin(self, env: dict) -> Served:
        served = Served(request_id(env.get(ENV_HEADER)), env)
        context.enter(served)
        return served

    def finish(self, served: Served, status: str, bytes_out: int = 0) -> None:
        """The answer is done: its access line, then the thread leaves the request."""
        served.status = status or served.status
        served.bytes_out += bytes_out
        try:
            if self.access is not None:
                fields = access_fields(served, time.perf_counter())
                # the record straight to the logger's handlers: Logger.info would also look
                # up the caller's frame and sort through `extra`, a quarter of the line's cost
                self.access.handle(logging.makeLogRecord(
                    {"name": ACCESS_LOGGER, "levelno": logging.INFO, "levelname": "INFO",
                     "msg": access_message(fields), "fields": fields}))
        finally:
            context.enter(None)

    def pass_on(self, app: Callable[..., Iterable[bytes]], env: dict,
                start_response: Callable[..., object], served: Served) -> Iterable[bytes]:
        """Hand the request to a WSGI app: its answer gets the id, its body bytes are
        counted both ways, and the access line is written when the server closes it."""
        if (env.get("CONTENT_LENGTH") or env.get("HTTP_TRANSFER_ENCODING")) and "wsgi.input" in env:
            served.body_in = env["wsgi.input"] = CountedInput(env["wsgi.input"])

        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> object:
            served.status = status
            headers.append((context.HEADER, served.id))
            return start_response(status, headers, exc_info)

        try:
            body = app(env, respond)
        except BaseException:
            self.finish(served, served.status or "500 Internal Server Error")
            raise
        return Answer(body, served, self)


class Answer:
    """A passed-on app's body, as the server sends it: bytes counted, and closed with
    the request's access line (PEP 3333: the server calls close() when done, sent or not)."""

    __slots__ = ("body", "served", "log")

    def __init__(self, body: Iterable[bytes], served: Served, log: RequestLog) -> None:
        self.body = body
        self.served = served
        self.log = log

    def __iter__(self) -> Iterator[bytes]:
        served = self.served
        for chunk in self.body:
            served.bytes_out += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.log.finish(self.served, "")
