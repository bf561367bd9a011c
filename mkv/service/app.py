"""The HTTP API (minikeyvalue's contract) as a Falcon app, with key GET/HEAD
answered in plain WSGI in front of it (FastReads: the bulk of the traffic).

Handlers parse the request, call the Store (which calls the pure core), and
map its typed errors to statuses in one table. Every error answer has a JSON
body {"error": ..., "detail": ...}.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import apsw
import falcon
from gunicorn.http.errors import ParseException

from mkv import auth, context, core
from mkv.config import Config
from mkv.core import Health
from mkv.keys import BadKey, check_key, check_new_key
from mkv.service import metrics, requestlog
from mkv.service.query import BadQuery, ListQuery, parse_query, request_target
from mkv.service.ratelimit import ListLimiter
from mkv.service.store import (
    BadDigest,
    ClientGone,
    EmptyValue,
    InFlight,
    KeyExists,
    KeyMissing,
    Protected,
    Store,
    TooLarge,
    Unavailable,
    VolumeFailed,
)
from mkv.writer.protocol import WriterError, WriterUnavailable

log = logging.getLogger("mkv.service.app")

KEY_METHODS = ("GET", "HEAD", "PUT", "DELETE", "UNLINK")

class NeedsToken(Exception):
    """A request that needs a token came without one (401)."""


class WrongToken(Exception):
    """A request's token is none of the configured ones (403)."""


class Tokens:
    """Who may write (and, with `auth-reads`, read): the tokens of `api-tokens-file`, read
    once per worker, so the workers a SIGHUP starts read the file again (docs/design.md,
    "Tokens"). None configured: everything is open. A file that cannot be read any more
    when a worker starts closes the doors (every token is wrong) rather than opening them."""

    def __init__(self, cfg: Config) -> None:
        self.tokens: tuple[bytes, ...] | None = None
        if cfg.api_tokens_file:
            try:
                self.tokens = auth.read_tokens(cfg.api_tokens_file)
            except auth.TokenFileError as exc:
                log.error("no write is allowed until the tokens file can be read: %s", exc)
                self.tokens = ()
        self.reads = cfg.auth_reads and self.tokens is not None

    def check(self, header: str | None, write: bool) -> None:
        """Raise NeedsToken or WrongToken unless the request may go on."""
        if self.tokens is None or not (write or self.reads):
            return
        verdict = auth.check(header, self.tokens)
        if verdict is auth.Auth.MISSING:
            raise NeedsToken("send Authorization: Bearer <token>")
        if verdict is auth.Auth.WRONG:
            raise WrongToken("the token is not valid")


#: Typed error -> (status, error name). The only place statuses are chosen for failures.
ERRORS: list[tuple[type[Exception], str, str]] = [
    (NeedsToken, falcon.HTTP_401, "unauthorized"),
    (WrongToken, falcon.HTTP_403, "forbidden"),
    (BadKey, falcon.HTTP_400, "bad_key"),
    (BadQuery, falcon.HTTP_400, "bad_query"),
    (BadDigest, falcon.HTTP_400, "bad_digest"),
    (ClientGone, falcon.HTTP_400, "incomplete_body"),
    (EmptyValue, falcon.HTTP_411, "length_required"),
    (TooLarge, falcon.HTTP_413, "too_large"),
    (KeyExists, falcon.HTTP_403, "key_exists"),
    (Protected, falcon.HTTP_403, "protected"),
    (KeyMissing, falcon.HTTP_404, "not_found"),
    (InFlight, falcon.HTTP_409, "write_in_flight"),
    (VolumeFailed, falcon.HTTP_502, "volume_failed"),
    (Unavailable, falcon.HTTP_503, "unavailable"),
    (WriterUnavailable, falcon.HTTP_503, "writer_unavailable"),
    (WriterError, falcon.HTTP_500, "writer_error"),
]


_HANDLED = tuple(cls for cls, _, _ in ERRORS)


def error_answer(exc: Exception) -> tuple[str, list[tuple[str, str]], bytes]:
    """The answer to one of the ERRORS: (status, headers, JSON body), for the framework's
    handlers and the fast read path alike."""
    for cls, status, name in ERRORS:
        if isinstance(exc, cls):
            headers = [*JSON_TYPE]
            if isinstance(exc, NeedsToken):
                headers.append(("WWW-Authenticate", "Bearer"))
            return status, headers, error_json(name, str(exc))
    raise TypeError(f"{type(exc).__name__} is not in ERRORS")


def error_json(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()


def no_content(resp: falcon.Response, status: str) -> None:
    """An answer with no body (the app has no default media type, so no Content-Type)."""
    resp.status = status


def error_body(resp: falcon.Response, status: str, error: str, detail: str) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = error_json(error, detail)


Headers = list[tuple[str, str]]
JSON_TYPE: Headers = [("Content-Type", falcon.MEDIA_JSON)]


def lookup(store: Store, key: str) -> tuple[str, Headers, bytes]:
    """The answer to GET or HEAD of a key: (status, headers, body)."""
    target, record = store.locate(key)
    if isinstance(target, core.Redirect):
        headers = [("Location", target.location)]
        if record is not None:
            headers += [("Content-Md5", record.md5), ("Key-Volumes", ",".join(record.volumes)),
                        ("Key-Balance", "balanced" if store.balanced(record) else "unbalanced")]
        return falcon.HTTP_302, headers, b""
    if isinstance(target, core.Unavailable):
        return falcon.HTTP_503, JSON_TYPE, error_json("unavailable", target.reason)
    return falcon.HTTP_404, JSON_TYPE, error_json("not_found", key)


class KeyResource:
    """Every path that is not /-/...: key writes and prefix listings. A GET or HEAD of
    a key never gets here: FastReads answers it before the framework is called."""

    def __init__(self, cfg: Config, store: Callable[[], Store], limiter: ListLimiter,
                 tokens: Tokens) -> None:
        self.cfg = cfg
        self.store = store
        self.limiter = limiter
        self.tokens = tokens

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: str) -> None:
        started = time.perf_counter()
        method = req.method
        try:
            self._dispatch(req, resp)
        except _HANDLED as exc:
            resp.status, headers, resp.data = error_answer(exc)
            for name, value in headers:
                resp.set_header(name, value)
        except falcon.HTTPError as exc:  # the framework's own, e.g. a body it cannot read
            http_error_body(resp, exc)
        except Exception as exc:  # noqa: BLE001 - answered here so the metric sees the 500
            log.exception("unhandled error on %s %s", req.method, req.path)
            error_body(resp, falcon.HTTP_500, "internal", type(exc).__name__)
        finally:
            metrics.observe(method if method in KEY_METHODS else "OTHER",
                            resp.status_code if resp.status else 200, started)

    def _dispatch(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.method not in KEY_METHODS:
            resp.set_header("Allow", ", ".join(KEY_METHODS))
            error_body(resp, falcon.HTTP_405, "method_not_allowed", f"{req.method} is not supported")
            return
        self.tokens.check(req.get_header("Authorization"), write=req.method not in ("GET", "HEAD"))
        key, query = request_target(req.env)
        listing = parse_query(query)
        if listing is not None:
            if req.method not in ("GET", "HEAD"):
                raise BadQuery(f"?list and ?unlinked are for GET, not {req.method}")
            self._list(req, resp, check_key(key, self.cfg.max_key_bytes, prefix=True), listing)
            return
        if req.method == "PUT":
            key = check_new_key(key, self.cfg.max_key_bytes)
        else:
            key = check_key(key, self.cfg.max_key_bytes)
        getattr(self, "_" + req.method.lower())(req, resp, key)

    def _put(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        """A body with a Content-Length, or chunked (its size counted by the Store and
        held to `max-value-bytes` as it arrives). gunicorn refuses a request with both
        headers before it gets here: they could frame the body two ways."""
        encoding = req.get_header("Transfer-Encoding")
        length: int | None
        if encoding is not None:
            if encoding.strip().lower() != "chunked":  # gzip, deflate: not the value's bytes
                error_body(resp, falcon.HTTP_411, "length_required",
                           f"Transfer-Encoding {encoding!r}: send a Content-Length or chunked")
                return
            length, read = None, chunked_reader(req.stream)
        else:
            length = req.content_length
            if length is None:
                error_body(resp, falcon.HTTP_411, "length_required",
                           "send a Content-Length or a chunked body")
                return
            if length == 0:
                error_body(resp, falcon.HTTP_411, "length_required", "empty value")
                return
            if length > self.cfg.max_value_bytes:
                error_body(resp, falcon.HTTP_413, "too_large",
                           f"{length} bytes is over the limit of {self.cfg.max_value_bytes}")
                return
            read = req.bounded_stream.read
        sock = req.env.get("gunicorn.socket")
        if sock is not None:  # a stalled client must not hold the key's lock forever
            sock.settimeout(self.cfg.client_timeout)
        record = self.store().put(key, length, read, req.get_header("Content-MD5"))
        metrics.PUT_BYTES.inc(record.size)
        no_content(resp, falcon.HTTP_201)

    def _delete(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        self.store().delete(key)
        no_content(resp, falcon.HTTP_204)

    def _unlink(self, req: falcon.Request, resp: falcon.Response, key: str) -> None:
        self.store().unlink(key)
        no_content(resp, falcon.HTTP_204)

    def _list(self, req: falcon.Request, resp: falcon.Response, prefix: str,
              q: ListQuery) -> None:
        """One page of at most `max-list-limit` keys, also when no limit is asked for:
        a client pages on through `next` (minikeyvalue's clients do already)."""
        wait = self.limiter.wait()
        if wait > 0:
            resp.set_header("Retry-After", str(max(1, math.ceil(wait))))
            error_body(resp, falcon.HTTP_429, "rate_limited",
                       f"more than {self.cfg.list_rate:g} listings per second; "
                       f"retry in {wait:.2f} s")
            return
        limit = min(q.limit or self.cfg.max_list_limit, self.cfg.max_list_limit)
        keys, nxt = self.store().reader.list_keys(prefix, q.start, limit, q.state)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = json.dumps({"next": nxt, "keys": keys}, ensure_ascii=False)


def chunked_reader(stream: Any) -> Callable[[int], bytes]:
    """`read` of a chunked request body, its end (b"") only at the body's last chunk: a
    client gone mid-body is an OSError (gunicorn's NoMoreData), and a malformed chunk,
    which gunicorn reports with an error class of its own, is ClientGone (400)."""
    def read(n: int) -> bytes:
        try:
            return stream.read(n)
        except ParseException as exc:
            raise ClientGone(f"bad chunked body: {type(exc).__name__}") from exc
    return read


class HealthResource:
    """/-/health, for a load balancer: 200 while this instance can serve reads, 503 when
    it cannot; with `?writable`, 200 only while it can take writes as well. The JSON body
    says both ("readable", "writable"), with the index, the writer and every volume.

    Reads need the index to answer and a volume that is not down (core.can_read); writes
    need the writer and R usable failure domains too (core.can_write). A load balancer
    checking plain /-/health keeps sending reads to an instance whose writes fail.
    Each volume also shows how placement sees it: weight, zone, host, and the share of
    all copies the placement rule gives it (Ring.copy_shares)."""

    def __init__(self, cfg: Config, store: Callable[[], Store]) -> None:
        self.cfg = cfg
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            want_writable = health_query(req.query_string)
        except BadQuery as exc:
            error_body(resp, falcon.HTTP_400, "bad_query", str(exc))
            return
        store = self.store()
        try:
            rows = store.reader.health()
            health = store.health()
            index_info: dict = {"readable": True}
        except apsw.Error as exc:  # the file is gone, unreadable, or not an index
            rows, health = {}, {}
            index_info = {"readable": False, "error": str(exc)}
        volumes = []
        ring = store.ring  # placement: docs/design.md, "Placement"
        shares = ring.copy_shares(self.cfg.replicas)
        for vol in self.cfg.volumes:
            row = rows.get(vol)
            zone, host = ring.site(vol)
            volumes.append({
                "volume": vol,
                "weight": ring.weights[vol],
                "zone": zone or None,
                "host": host,
                "share": round(shares[vol], 4),
                "up": health.get(vol, Health.UNKNOWN) is not Health.DOWN,
                "status": health.get(vol, Health.UNKNOWN).value,
                "since": row.since if row else None,
                "checked": row.checked if row else None,
                "latency_ms": row.latency_ms if row else None,
                "error": row.error if row else None,
            })
        try:
            writer = store.writer.ping()
            writer_info = {"up": True, "pid": writer["pid"], "commits": writer["commits"],
                           "committed_ops": writer["committed_ops"], "locks": writer["locks"]}
        except WriterError as exc:
            writer_info = {"up": False, "error": str(exc)}
        usable = [v["volume"] for v in volumes if v["up"]]
        readable = core.can_read(index_info["readable"], usable)
        writable = readable and core.can_write(usable, writer_info["up"], self.cfg.replicas)
        ok = writable if want_writable else readable
        resp.status = falcon.HTTP_200 if ok else falcon.HTTP_503
        resp.content_type = falcon.MEDIA_JSON
        resp.media = {"status": "ok" if writable else "degraded" if readable else "unavailable",
                      "readable": readable, "writable": writable, "pid": os.getpid(),
                      "replicas": self.cfg.replicas, "index": index_info, "writer": writer_info,
                      "volumes": volumes}

    on_head = on_get


def health_query(query: str) -> bool:
    """/-/health's query string: empty, or `writable` (answer 503 when writes cannot be
    taken). Anything else is refused, so a misspelt check never passes for another."""
    if query in ("", "writable"):
        return query == "writable"
    raise BadQuery(f"/-/health takes no query but ?writable, not ?{query}")


class MetricsResource:
    """/-/metrics: every process's counters and histograms, and what the index says
    (mkv.service.metrics)."""

    def __init__(self, cfg: Config, store: Callable[[], Store]) -> None:
        self.cfg = cfg
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        body, ctype = metrics.render(metrics.IndexCollector(self.cfg, self.store().reader))
        resp.content_type = ctype
        resp.data = body


class FastReads:
    """GET and HEAD of a key, most of the traffic, answered in plain WSGI; everything
    else goes to the Falcon app. The framework's request and response objects cost
    more than the whole lookup (an index read, a health-cache check), so the read
    path skips them.

    Every request, either way, gets its id and its access line here
    (mkv.service.requestlog)."""

    def __init__(self, cfg: Config, store: Callable[[], Store], app: falcon.App,
                 tokens: Tokens) -> None:
        self.cfg = cfg
        self.store = store
        self.app = app
        self.tokens = tokens
        self.requests = requestlog.RequestLog(requestlog.access_logger(cfg))

    def __call__(self, env: dict, start_response: Callable[..., object]) -> Iterable[bytes]:
        served = self.requests.begin(env)
        method = env["REQUEST_METHOD"]
        if (method != "GET" and method != "HEAD") or env.get("QUERY_STRING") \
                or env.get("PATH_INFO", "").startswith("/-/"):
            return self.requests.pass_on(self.app, env, start_response, served)
        try:
            key, query = request_target(env)
            if query:  # the raw target disagrees with QUERY_STRING: the framework decides
                return self.requests.pass_on(self.app, env, start_response, served)
            self.tokens.check(env.get("HTTP_AUTHORIZATION"), write=False)
            status, headers, body = lookup(self.store(), check_key(key, self.cfg.max_key_bytes))
        except (NeedsToken, WrongToken, BadKey) as exc:
            status, headers, body = error_answer(exc)
        except Exception as exc:  # noqa: BLE001 - answered like the framework's handler
            log.exception("unhandled error on %s %s", method, env.get("PATH_INFO"))
            status, headers, body = falcon.HTTP_500, JSON_TYPE, error_json("internal",
                                                                           type(exc).__name__)
        sent = body
        if method == "HEAD":
            # no body, and no length of one: a HEAD-based existence check must not read
            # a 404's Content-Length as the size of a value (HeadErrors, for the rest)
            sent, headers = b"", [h for h in headers if h[0] != "Content-Type"]
        try:
            start_response(status, [*headers, ("Content-Length", str(len(sent))),
                                    (context.HEADER, served.id)])
            metrics.observe(method, int(status[:3]), served.started)
        finally:
            self.requests.finish(served, status, len(sent))
        return [sent]


class HeadErrors:
    """Falcon middleware: an error answer to HEAD (a bad query, a /-/ path, a 503 from
    /-/health) has no body, `Content-Length: 0` and no Content-Type, as from FastReads.
    Falcon would otherwise announce the length of the JSON error it does not send."""

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, req_succeeded: bool) -> None:
        if req.method == "HEAD" and resp.status_code >= 400:
            resp.data = resp.text = resp.media = resp.stream = None
            resp.content_type = None
            resp.set_header("Content-Length", "0")


def http_error_body(resp: falcon.Response, ex: falcon.HTTPError) -> None:
    """The framework's errors (405 on /-/health, a bad request line) in mkv's error shape."""
    title = ex.title or "error"
    code, _, words = title.partition(" ")
    name = words if code.isdigit() and words else title  # "404 Not Found" -> not_found
    error_body(resp, ex.status, name.lower().replace(" ", "_"), ex.description or title)
    for name, value in (ex.headers or {}).items():
        resp.set_header(name, value)


def unknown_service_path(req: falcon.Request, resp: falcon.Response, **_: str) -> None:
    """/-/ paths other than /-/health and /-/metrics: nothing is there (and never a key)."""
    error_body(resp, falcon.HTTP_404, "not_found", f"no such service path {req.path}")


def create_app(cfg: Config, store: Callable[[], Store], limiter: ListLimiter | None = None
               ) -> FastReads:
    """The WSGI app. `store` is called per request and builds the worker's Store lazily;
    `limiter` is the service's shared list bucket (a bucket of the app's own if None)."""
    # no default media type: every answer with a body names its own, one without has none
    app = falcon.App(media_type=None, middleware=[HeadErrors()])
    app.add_route("/-/health", HealthResource(cfg, store))
    app.add_route("/-/metrics", MetricsResource(cfg, store))
    if limiter is None:
        limiter = ListLimiter(cfg.list_rate, cfg.list_burst)
    tokens = Tokens(cfg)
    app.add_sink(KeyResource(cfg, store, limiter, tokens), prefix="/")
    app.add_sink(unknown_service_path, prefix="/-/")  # added later: checked first

    def on_error(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
        log.exception("unhandled error on %s %s", req.method, req.path)
        error_body(resp, falcon.HTTP_500, "internal", type(ex).__name__)

    def serialize(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError) -> None:
        http_error_body(resp, ex)

    app.add_error_handler(Exception, on_error)
    app.set_error_serializer(serialize)
    return FastReads(cfg, store, app, tokens)
