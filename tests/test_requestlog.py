"""Request ids, the service's access log and the one log format of every mkv process.

The pure parts first (ids, access lines, formatters, the context the volume client
reads), then a real `mkv serve` over real nginx volumes: ids on every answer, in the
service's access log and in the volumes' access logs, hostile ids replaced, and the
--log-format / --access-log options.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
import requests

from mkv import context, logs
from mkv.config import Config
from mkv.service import requestlog
from mkv.service.app import create_app
from mkv.volumes.pool import FanOut
from mkv.volumes.wire import Connection, Request
from tests.cluster import NginxVolume
from tests.helpers import TIMEOUT, get, kurl, put, wait_until
from tests.service import MkvService

NEW_ID = re.compile(r"[0-9a-f]{16}")

#: An access line of the text format: `... [worker/mkv.access] INFO <fields> rid=<id>`.
ACCESS_LINE = re.compile(
    r"^\S+ \[(?P<pid>\d+)\] \[worker/mkv\.access\] INFO (?P<remote>\S+) (?P<method>\S+) "
    r"(?P<path>\S+) (?P<status>\d+) in=(?P<bytes_in>\d+) out=(?P<bytes_out>\d+) "
    r"(?P<ms>[\d.]+)ms volumes=(?P<volumes>\S+) rid=(?P<rid>\S+)$")


# --- request ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["a", "client-1", "A.b_c:d-9", "x" * 128])
def test_a_sane_client_id_is_kept(given: str) -> None:
    assert requestlog.request_id(given) == given


@pytest.mark.parametrize("given", [
    None, "", "x" * 129, "x" * 4096, "abc\r\nInjected: yes", "abc\n", "a b", 'a"b', "a,b",
    "a\tb", "caf\xe9", "a/b", "a=b",
])
def test_anything_else_gets_a_new_id(given: str | None) -> None:
    made = requestlog.request_id(given)
    assert NEW_ID.fullmatch(made), made
    assert made != given


def test_new_ids_differ() -> None:
    assert len({requestlog.new_id() for _ in range(1000)}) == 1000


# --- the access line --------------------------------------------------------------------------------


def served(env: dict, status: str = "201 Created", volumes: tuple[str, ...] = ()) -> requestlog.Served:
    out = requestlog.Served("rid-1", {"REMOTE_ADDR": "10.0.0.9", "REQUEST_METHOD": "PUT", **env})
    out.status = status
    for vol in volumes:
        out.volumes[vol] = None
    return out


def test_access_fields_and_their_text() -> None:
    s = served({"RAW_URI": "/a%20b?x=1"}, volumes=("h:1", "h:2"))
    s.bytes_out = 7
    fields = requestlog.access_fields(s, s.started + 0.0123456)
    assert fields == {"remote": "10.0.0.9", "method": "PUT", "path": "/a%20b?x=1", "status": 201,
                      "bytes_in": 0, "bytes_out": 7, "duration_ms": 12.346,
                      "volumes": ["h:1", "h:2"]}
    assert requestlog.access_message(fields) == \
        "10.0.0.9 PUT /a%20b?x=1 201 in=0 out=7 12.346ms volumes=h:1,h:2"
    fields["volumes"] = []
    assert requestlog.access_message(fields).endswith(" volumes=-")


def test_the_path_is_the_raw_target_and_never_breaks_a_line() -> None:
    assert requestlog.raw_target({"RAW_URI": "/k?list", "PATH_INFO": "/other"}) == "/k?list"
    assert requestlog.raw_target({"PATH_INFO": "/k", "QUERY_STRING": "list"}) == "/k?list"
    assert requestlog.raw_target({"PATH_INFO": "/a\nb c"}) == "/a\\nb c"


def test_an_answer_that_never_started_is_status_0() -> None:
    assert requestlog.access_fields(served({}, status=""), 0.0)["status"] == 0


# --- the log formats ------------------------------------------------------------------------------


def record(msg: str = "hello %s", args: tuple = ("world",), **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("mkv.test", logging.WARNING, __file__, 1, msg, args, None)
    rec.created = 1767312245.678  # 2026-01-02T00:04:05.678Z
    rec.__dict__.update(extra)
    return rec


def formatted(fmt: str, rec: logging.LogRecord) -> str:
    """As a handler of mkv's formats writes it (the filter adds the request id)."""
    handler = logs.handler("-", fmt, io.StringIO())
    assert handler.filter(rec)
    return handler.format(rec)


@pytest.fixture
def named() -> Iterator[Callable[[str], None]]:
    """Name this process in log lines for a test, then as it was."""
    yield logs.set_process_name
    logs.set_process_name("mkv")


def test_text_lines(named: Callable[[str], None]) -> None:
    named("writer")
    assert formatted("text", record()) == \
        f"2026-01-02T00:04:05.678Z [{record().process}] [writer/mkv.test] WARNING hello world"
    context.enter(context.RequestContext("abc"))
    try:
        assert formatted("text", record()).endswith("WARNING hello world rid=abc")
    finally:
        context.enter(None)


def test_json_lines(named: Callable[[str], None]) -> None:
    named("health")
    doc = json.loads(formatted("json", record()))
    assert doc == {"time": "2026-01-02T00:04:05.678Z", "level": "WARNING", "pid": record().process,
                   "process": "health", "logger": "mkv.test", "message": "hello world"}
    context.enter(context.RequestContext("abc"))
    try:
        doc = json.loads(formatted("json", record(fields={"status": 302, "level": "no"})))
    finally:
        context.enter(None)
    assert doc["request_id"] == "abc" and doc["status"] == 302
    assert doc["level"] == "WARNING"  # a field never hides the line's own


def test_a_traceback_stays_in_its_json_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = record(exc_info=sys.exc_info())
    line = formatted("json", rec)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]
    assert "Traceback" in formatted("text", record(exc_info=rec.exc_info)).splitlines()[1]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text or json"):
        logs.formatter("xml")


@pytest.fixture
def clean_root() -> Iterator[logging.Logger]:
    """The root logger's handlers and level as they were, whatever setup does meanwhile."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    yield root
    logs.replace_handlers(root, None)
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    logs.set_process_name("mkv")
    logging.captureWarnings(False)


def test_setup_again_replaces_its_own_handler(clean_root: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.setup("info", "text", "serve", first)
    logs.setup("warning", "json", "serve", second)
    ours = [h for h in clean_root.handlers if getattr(h, "_mkv", False)]
    assert len(ours) == 1
    logging.getLogger("mkv.x").warning("once")
    logging.getLogger("mkv.x").info("not at warning")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["once"]


# --- the context the volume client reads ------------------------------------------------------------


def test_volume_requests_carry_the_id_only_within_a_request() -> None:
    conn = Connection("127.0.0.1:9/pre", timeout=1)
    assert b"X-Request-Id" not in conn.encode(Request("GET", "/x"))
    ctx = context.RequestContext("rid-7")
    context.enter(ctx)
    try:
        get_req = conn.encode(Request("GET", "/x"))
        put_req = conn.encode(Request("PUT", "/y", b"body"))
    finally:
        context.enter(None)
    assert get_req == (b"GET /pre/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\nUser-Agent: mkv\r\n"
                       b"X-Request-Id: rid-7\r\n\r\n")
    assert put_req.startswith(b"PUT /pre/y HTTP/1.1\r\n")
    assert b"\r\nX-Request-Id: rid-7\r\nContent-Length: 4\r\n\r\nbody" in put_req
    assert list(ctx.volumes) == ["127.0.0.1:9/pre"]


def test_a_fan_out_carries_the_request_into_the_executor_threads() -> None:
    """Executor threads have contexts of their own: FanOut runs each upload in a copy of
    the caller's, so the volume requests there carry the id too."""
    seen: list[tuple[str, str | None]] = []

    class RecordingPool:
        def put_stream(self, volume: str, path: str, chunks: Iterator[bytes], length: int,
                       give_up: Callable[[], bool] | None = None) -> None:
            seen.append((volume, context.current_id()))
            context.touch(volume)
            assert sum(len(c) for c in chunks) == length

    ctx = context.RequestContext("fan-1")
    with ThreadPoolExecutor(max_workers=2) as executor:
        context.enter(ctx)
        try:
            fan = FanOut(RecordingPool(), executor, ["v:1", "v:2"], "/p", 3)  # type: ignore[arg-type]
            fan.send(b"abc")
            assert fan.finish() == [None, None]
        finally:
            context.enter(None)
    assert sorted(seen) == [("v:1", "fan-1"), ("v:2", "fan-1")]
    assert sorted(ctx.volumes) == ["v:1", "v:2"]


# --- the app in-process: every answer has the id, and so does a line logged for it ------------------


class BrokenStore:
    """A Store whose every use fails: the app's 500 path."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("index is gone")


def call(app: Callable, method: str, path: str, headers: dict | None = None) -> tuple[str, dict]:
    env = falcon.testing.create_environ(path.split("?")[0], method=method, headers=headers,
                                        query_string=path.partition("?")[2])
    got: dict[str, Any] = {}

    def start_response(status: str, hdrs: list[tuple[str, str]], exc_info: Any = None) -> None:
        got["status"], got["headers"] = status, dict(hdrs)

    body = app(env, start_response)
    b"".join(body)
    getattr(body, "close", lambda: None)()
    return got["status"], got["headers"]


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/k", "500"), ("HEAD", "/k", "500"), ("GET", "/", "400"), ("PUT", "/k", "411"),
    ("PATCH", "/k", "405"), ("GET", "/-/nothing", "404"), ("DELETE", "/-/health", "405"),
    ("GET", "/k?bogus", "400"),
])
def test_every_answer_of_the_app_has_the_id(tmp_path: Path, method: str, path: str,
                                            status: str) -> None:
    app = create_app(Config(volumes=("a:1",), db=str(tmp_path / "i.db"), access_log="off"),
                     BrokenStore)
    got, headers = call(app, method, path, {"X-Request-Id": "mine"})
    assert got.startswith(status)
    assert headers["X-Request-Id"] == "mine"
    got, headers = call(app, method, path)
    assert NEW_ID.fullmatch(headers["X-Request-Id"])


def test_a_line_logged_for_a_request_has_its_id(tmp_path: Path) -> None:
    app = create_app(Config(volumes=("a:1",), db=str(tmp_path / "i.db"), access_log="off"),
                     BrokenStore)
    out = io.StringIO()
    log = logging.getLogger("mkv.service.app")
    handler = logs.handler("-", "json", out)
    log.addHandler(handler)
    try:
        call(app, "GET", "/k", {"X-Request-Id": "fast-path"})
        call(app, "DELETE", "/k", {"X-Request-Id": "framework"})
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["message"].split(" on ")[0], d["request_id"]) for d in lines] == [
        ("unhandled error", "fast-path"), ("unhandled error", "framework")]
    assert context.current() is None  # the thread left the request with its answer


# --- a real service: ids on the wire and in the logs -----------------------------------------------


def access_lines(svc: MkvService) -> list[dict[str, str]]:
    return [m.groupdict() for line in svc.output().splitlines() if (m := ACCESS_LINE.match(line))]


def access_line(svc: MkvService, rid: str) -> dict[str, str]:
    """The one access line of request `rid` (written once its answer is done: waited for)."""
    found: list[dict[str, str]] = []

    def logged() -> bool:
        found[:] = [line for line in access_lines(svc) if line["rid"] == rid]
        return bool(found)

    wait_until(logged, TIMEOUT, f"the access line of {rid}")
    assert len(found) == 1, found
    return found[0]


def volume_lines(volume: NginxVolume, needle: str, n: int) -> list[str]:
    """nginx's access lines holding `needle`, at least n (its log is flushed each second)."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = [line for line in volume.access_lines() if needle in line]
        return len(found) >= n

    wait_until(logged, TIMEOUT, f"{n} lines with {needle} in {volume.access_log}")
    return found


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_a_client_id_comes_back_and_is_in_the_access_log(shared_service: MkvService,
                                                         shared_volumes: list[NginxVolume]) -> None:
    key = "/rid/round-trip"
    body = b"v" * 1000
    r = put(shared_service, key, body, headers={"X-Request-Id": "put-1"})
    assert (r.status_code, r.headers["X-Request-Id"]) == (201, "put-1")
    r = requests.get(kurl(shared_service, key), headers={"X-Request-Id": "get-1"},
                     allow_redirects=False, timeout=TIMEOUT)
    assert (r.status_code, r.headers["X-Request-Id"]) == (302, "get-1")
    location = r.headers["Location"]
    r = requests.get(kurl(shared_service, "/rid/missing"), headers={"X-Request-Id": "miss-1"},
                     timeout=TIMEOUT)
    assert (r.status_code, r.headers["X-Request-Id"]) == (404, "miss-1")

    line = access_line(shared_service, "put-1")
    assert (line["method"], line["path"], line["status"]) == ("PUT", key, "201")
    assert (line["remote"], line["bytes_in"], line["bytes_out"]) == ("127.0.0.1", "1000", "0")
    assert sorted(line["volumes"].split(",")) == sorted(v.address for v in shared_volumes)
    line = access_line(shared_service, "get-1")
    assert (line["method"], line["status"]) == ("GET", "302")
    assert location.startswith(f"http://{line['volumes']}/")  # the volume the client is sent to
    line = access_line(shared_service, "miss-1")
    assert (line["status"], line["volumes"], int(line["bytes_out"]) > 0) == ("404", "-", True)


@pytest.mark.parametrize("size", [1000, 3 << 20], ids=["small", "streamed"])
def test_the_volumes_log_the_id_of_the_put(shared_service: MkvService,
                                           shared_volumes: list[NginxVolume], size: int) -> None:
    """A small PUT's blob and sidecar are pipelined from the request's thread; a large
    one streams from executor threads (FanOut), its sidecar after: both carry the id."""
    key, rid = f"/rid/volumes/{size}", f"vol-put-{size}"
    assert put(shared_service, key, b"s" * size, headers={"X-Request-Id": rid}).status_code == 201
    h = key_hash(key)
    for vol in shared_volumes:
        lines = volume_lines(vol, f'"PUT /{h[:2]}/{h[2:4]}/{h}', 2)
        assert len(lines) == 2, lines
        blob, sidecar = sorted(lines, key=lambda line: ".key " in line)
        assert ".key " in sidecar and ".key " not in blob
        for line in (blob, sidecar):
            assert '" 201 ' in line and line.endswith(f" rid={rid}"), line


def test_other_answers_have_an_id_too(shared_service: MkvService) -> None:
    key = "/rid/others"
    assert put(shared_service, key, b"x").status_code == 201
    for i, (method, path, status) in enumerate([
            ("DELETE", key, 204), ("GET", "/rid/?list", 200), ("GET", "/-/health", 200),
            ("GET", "/-/metrics", 200), ("PATCH", key, 405), ("GET", "/-/nothing", 404)]):
        rid = f"other-{i}"
        r = requests.request(method, shared_service.url + path, headers={"X-Request-Id": rid},
                             timeout=TIMEOUT)
        assert (r.status_code, r.headers["X-Request-Id"]) == (status, rid)
        line = access_line(shared_service, rid)
        assert (line["method"], line["path"], line["status"]) == (method, path, str(status))


def test_an_id_is_made_when_none_is_sent(shared_service: MkvService) -> None:
    ids = [get(shared_service, "/rid/none").headers["X-Request-Id"] for _ in range(3)]
    assert all(NEW_ID.fullmatch(i) for i in ids) and len(set(ids)) == 3, ids
    for made in ids:
        assert access_line(shared_service, made)["path"] == "/rid/none"


@pytest.mark.parametrize("hostile", ["h" * 4096, "hostile 1 rid=forged", 'hostile"2', "hostile\t3",
                                     "hostile\xe94", "h" * 129])
def test_a_hostile_id_is_replaced_and_never_echoed(shared_service: MkvService,
                                                   hostile: str) -> None:
    r = requests.get(kurl(shared_service, "/rid/hostile"), headers={"X-Request-Id": hostile},
                     timeout=TIMEOUT)
    assert r.status_code == 404
    made = r.headers["X-Request-Id"]
    assert NEW_ID.fullmatch(made)
    access_line(shared_service, made)
    assert hostile not in shared_service.output()


@pytest.mark.parametrize("breaker", [b"\r", b"\n", b"\r\n "])
def test_an_id_with_a_line_break_never_reaches_an_answer_or_a_log(shared_service: MkvService,
                                                                  breaker: bytes) -> None:
    """requests refuses to send CR or LF in a header, so the request is written by hand.
    gunicorn refuses it (400) before mkv sees it; nothing of it comes back."""
    marker = b"Injected-" + str(len(breaker)).encode()
    request = (b"GET /rid/crlf HTTP/1.1\r\nHost: x\r\nX-Request-Id: evil" + breaker +
               marker + b": yes\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", shared_service.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while more := sock.recv(65536):
            answer += more
    head = answer.split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert marker.lower() not in head.lower() and b"evil" not in answer
    assert marker.decode() not in shared_service.output()
    # the same request without the break is answered, with an id of the client's
    ok = requests.get(kurl(shared_service, "/rid/crlf"), headers={"X-Request-Id": "evil"},
                      timeout=TIMEOUT)
    assert (ok.status_code, ok.headers["X-Request-Id"]) == (404, "evil")


# --- the options: --log-format json, --access-log off and PATH --------------------------------------


def test_with_log_format_json_every_line_of_every_process_is_json(
        shared_volumes: list[NginxVolume], make_service: Callable[..., MkvService]) -> None:
    svc = make_service(shared_volumes, extra=["--log-format", "json"])
    assert put(svc, "/rid/json", b"j" * 10, headers={"X-Request-Id": "json-put"}).status_code == 201
    assert get(svc, "/rid/json").status_code == 302

    def seen() -> set[tuple[str, str]]:
        return {(d["process"], d["logger"]) for d in map(json.loads, svc.output().splitlines())}

    want = {("serve", "gunicorn.error"), ("worker", "gunicorn.error"), ("worker", "mkv.access"),
            ("writer", "mkv.writer"), ("health", "mkv.health"), ("serve", "mkv.service.supervise")}
    wait_until(lambda: want <= seen(), TIMEOUT, "a line of every process")
    svc.stop()  # its shutdown lines too
    docs = [json.loads(line) for line in svc.output().splitlines()]  # every line, or this fails
    assert all({"time", "level", "pid", "process", "logger", "message"} <= set(d) for d in docs)
    (access,) = [d for d in docs if d.get("request_id") == "json-put"]
    assert access["logger"] == "mkv.access"
    assert (access["method"], access["path"], access["status"], access["bytes_in"]) == \
        ("PUT", "/rid/json", 201, 10)
    assert sorted(access["volumes"]) == sorted(v.address for v in shared_volumes)
    assert any(d["message"].startswith("Shutting down") for d in docs)


def test_access_log_off_writes_no_access_lines(shared_volumes: list[NginxVolume],
                                               make_service: Callable[..., MkvService]) -> None:
    svc = make_service(shared_volumes, extra=["--access-log", "off"])
    r = put(svc, "/rid/off", b"o", headers={"X-Request-Id": "off-put"})
    assert (r.status_code, r.headers["X-Request-Id"]) == (201, "off-put")  # ids stay on
    assert get(svc, "/rid/off").status_code == 302
    svc.stop()  # every line written
    out = svc.output()
    assert "gunicorn.error] INFO Shutting down" in out
    assert "mkv.access" not in out and "off-put" not in out


def test_access_log_to_a_file_that_logrotate_moves(
        shared_volumes: list[NginxVolume], make_service: Callable[..., MkvService],
        tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    svc = make_service(shared_volumes, extra=["--access-log", str(path)])
    assert put(svc, "/rid/file", b"f", headers={"X-Request-Id": "file-put"}).status_code == 201

    def lines_of(p: Path) -> list[str]:
        return p.read_text().splitlines() if p.exists() else []

    wait_until(lambda: any(line.endswith(" rid=file-put") for line in lines_of(path)), TIMEOUT,
               "the PUT's line in the file")
    path.rename(tmp_path / "access.log.1")  # what logrotate does, then no signal at all
    assert requests.get(kurl(svc, "/rid/file"), headers={"X-Request-Id": "after-rotate"},
                        allow_redirects=False, timeout=TIMEOUT).status_code == 302
    wait_until(lambda: any(line.endswith(" rid=after-rotate") for line in lines_of(path)),
               TIMEOUT, "a line in the new file")
    assert all(ACCESS_LINE.match(line) for line in lines_of(path) + lines_of(tmp_path / "access.log.1"))
    svc.stop()
    assert "mkv.access" not in svc.output()  # the file has them, the service's log does not
