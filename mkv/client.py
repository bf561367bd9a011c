"""A Python client for mkv's HTTP API, on requests.

    from mkv.client import Client, KeyExists, NotFound

    mkv = Client("http://localhost:3000", token=None, timeout=30)
    mkv.put("/photos/cat.jpg", b"...")                  # bytes: Content-Length, Content-MD5
    with open("big.bin", "rb") as f:
        mkv.put("/backups/big.bin", f)                  # a file: streamed, never held whole
    mkv.put("/logs/today", (line for line in lines))    # any iterable of bytes: chunked
    data = mkv.get("/photos/cat.jpg")                   # follows the 302 to a volume
    with mkv.open("/backups/big.bin") as f:             # Range reads on the volume
        f.seek(-1024, 2); tail = f.read()
    st = mkv.stat("/photos/cat.jpg")                    # Stat(size, md5, volumes, ...)
    for key in mkv.list("/photos/"): ...                # every page, through `next`
    mkv.unlink("/photos/cat.jpg"); mkv.delete("/photos/cat.jpg")

What it does for its caller:

- **Keys are encoded once.** A key is the URL path, "/" included; the client
  percent-encodes every byte but letters, digits, "-_~" and "/", dots included, and
  sends that exact path (requests would decode %2E and resolve dot segments: "/a/../b"
  would quietly become "/b"; sent as it is, the service refuses it with BadRequest).
  A key without a leading "/" gets one.
- **Redirects.** GET and HEAD of a key answer 302 to a volume (or to the `fallback`
  service); the client follows it itself, sending its token only to the service.
- **Retries with backoff** (`retries`, `backoff`, `max_backoff`) on 409 (a write in
  flight), 429 (listings; its Retry-After is honoured), 502, 503 and connection
  errors or timeouts, for what is safe to repeat: reads, listings, DELETE and UNLINK
  always; PUT only when its body can be sent again (bytes, or a seekable file). Each
  retry is logged (logger `mkv.client`, warning).
- **A retried PUT whose earlier attempt may have landed** meets 403 key_exists: put
  then reads the key's md5 and size (stat) and returns normally if they are the
  value's own, else raises KeyExists. A retried DELETE or UNLINK that meets 404 after
  an attempt that may have landed returns normally: the key is gone (or unlinked)
  either way.
- **md5=True** (the default): bytes and seekable files are sent with Content-MD5
  (a file is read once more to hash it first), so the service refuses a body that
  changed on the way and keeps nothing (BadRequest). An iterable's md5 can be known
  only at its end: it is counted on the way and compared with the md5 the service
  recorded, and DigestMismatch is raised if they differ (the value stays written; the
  service must compute md5, its default).
- **Typed errors**, all MkvError: BadRequest (400, 411), Unauthorized (401), Forbidden
  (403, a wrong token), KeyExists and Protected (403), NotFound (404), Conflict (409),
  TooLarge (413), RateLimited (429), ServerError (500), Unavailable (502, 503, no
  connection), DigestMismatch, ValueChanged.

A Client holds a requests Session (kept-alive connections): use one per thread.
This module imports nothing of the service.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, urlsplit

import requests
import requests.auth
import urllib3.exceptions

log = logging.getLogger("mkv.client")

#: Bytes a file is read by, when streamed or hashed.
CHUNK = 1 << 20

T = TypeVar("T")

#: What put() takes: bytes, a binary file, or an iterable of bytes.
Value = bytes | bytearray | memoryview | BinaryIO | Iterable[bytes]


# --- errors -----------------------------------------------------------------------------------


class MkvError(Exception):
    """Every error of this client. `status` is the HTTP status (None without an
    answer), `error` the service's error name ("key_exists", ...; "" when the answer
    had no JSON body, as an answer to HEAD), `detail` its explanation."""

    def __init__(self, detail: str, status: int | None = None, error: str = "",
                 retry_after: float | None = None) -> None:
        head = f"{status} {error}".rstrip() if status else ""
        super().__init__(f"{head}: {detail}" if head else detail)
        self.detail = detail
        self.status = status
        self.error = error
        self.retry_after = retry_after


class BadRequest(MkvError):
    """400 (bad key, bad query, Content-MD5 mismatch, body cut short) or 411 (empty value)."""


class Unauthorized(MkvError):
    """401: the service wants a token (`api-tokens-file`) and none was given."""


class Forbidden(MkvError):
    """403: the token is not one of the service's."""


class KeyExists(MkvError):
    """403 key_exists: a live key is never overwritten (DELETE or UNLINK it first)."""


class Protected(MkvError):
    """403 protected: the service runs with `protect`; UNLINK before DELETE."""


class NotFound(MkvError):
    """404: no such key (missing, deleted or unlinked)."""


class Conflict(MkvError):
    """409: another write to the key is in flight."""


class TooLarge(MkvError):
    """413: over the service's `max-value-bytes`."""


class RateLimited(MkvError):
    """429: listings are coming faster than the service's `list-rate`."""


class ServerError(MkvError):
    """500, or any status the API does not name."""


class Unavailable(MkvError):
    """502 (a volume failed, nothing recorded), 503 (too few volumes, or the writer is
    down), or no answer at all (connection refused or reset, timeout)."""


class DigestMismatch(MkvError):
    """The md5 the service recorded is not the md5 of what was sent."""


class ValueChanged(MkvError):
    """open(): the key was written again (another value) while it was being read."""


_BY_ERROR: dict[str, type[MkvError]] = {
    "key_exists": KeyExists, "protected": Protected, "forbidden": Forbidden,
    "unauthorized": Unauthorized,
}
_BY_STATUS: dict[int, type[MkvError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    411: BadRequest, 413: TooLarge, 429: RateLimited, 502: Unavailable, 503: Unavailable,
}

#: Worth trying again: nothing was done, and a moment later it may be.
RETRYABLE: tuple[type[MkvError], ...] = (Conflict, RateLimited, Unavailable)

#: requests' ways of saying there was no (whole) answer.
_NO_ANSWER = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)

#: The same, when a streamed body is read straight from urllib3 (BlobReader).
_READ_FAILED = (*_NO_ANSWER, urllib3.exceptions.HTTPError, OSError)

#: The longest Retry-After honoured, in seconds.
MAX_RETRY_AFTER = 10.0


def error_from(resp: requests.Response) -> MkvError:
    """The typed error of an answer: by the JSON error's name, else by status."""
    name, detail = "", resp.reason or ""
    try:
        doc = resp.json()
        name, detail = str(doc["error"]), str(doc["detail"])
    except (ValueError, KeyError, TypeError):
        if resp.text:
            detail = resp.text[:200]
    cls = _BY_ERROR.get(name) or _BY_STATUS.get(resp.status_code) or (
        ServerError if resp.status_code >= 500 else MkvError)
    return cls(detail, resp.status_code, name, _retry_after(resp))


def _retry_after(resp: requests.Response) -> float | None:
    try:
        return float(resp.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


# --- keys and bodies --------------------------------------------------------------------------


def key_path(key: str) -> str:
    """The key as the URL path that the service decodes back into exactly this key."""
    if not key.startswith("/"):
        key = "/" + key
    return quote(key, safe="/").replace(".", "%2E")


@dataclasses.dataclass(frozen=True)
class Stat:
    """What stat() says of a key: its size (the volume's Content-Length), md5 (hex; ""
    when the service does not compute md5s), the volumes holding it, and where it was
    read from."""

    key: str
    size: int
    md5: str
    volumes: tuple[str, ...]
    url: str


class _Body:
    """A PUT's body: sent again on a retry only if `replayable`."""

    replayable = True
    size: int | None = None

    def payload(self) -> Any:
        raise NotImplementedError

    def md5(self) -> str:
        raise NotImplementedError


class _Bytes(_Body):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self._md5 = ""

    def payload(self) -> bytes:
        return self.data

    def md5(self) -> str:
        if not self._md5:
            self._md5 = hashlib.md5(self.data, usedforsecurity=False).hexdigest()
        return self._md5


class _FileStream:
    """`size` bytes of a file from `offset`: requests sends it with Content-Length (from
    __len__), a chunk at a time. A file that ends early fails the upload (the service
    keeps nothing) rather than leaving the service waiting for the rest."""

    def __init__(self, f: Any, offset: int, size: int) -> None:
        self.f, self.offset, self.size = f, offset, size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        self.f.seek(self.offset)
        left = self.size
        while left:
            chunk = self.f.read(min(CHUNK, left))
            if not chunk:
                raise OSError(f"the file ended {left} bytes short of its size at the start")
            left -= len(chunk)
            yield chunk


class _File(_Body):
    """A seekable file, from where it stands to its end."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.offset = f.tell()
        self.size = f.seek(0, os.SEEK_END) - self.offset
        f.seek(self.offset)
        self._md5 = ""

    def payload(self) -> _FileStream:
        return _FileStream(self.f, self.offset, self.size)

    def md5(self) -> str:
        if not self._md5:
            digest = hashlib.md5(usedforsecurity=False)
            for chunk in _FileStream(self.f, self.offset, self.size):
                digest.update(chunk)
            self._md5 = digest.hexdigest()
        return self._md5


class _Chunks(_Body):
    """An iterable (or a file that cannot seek): sent once, chunked, hashed on the way."""

    replayable = False

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self._digest = hashlib.md5(usedforsecurity=False)

    def payload(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError(f"a value's chunks are bytes, not {type(chunk).__name__}")
            if chunk:  # an empty chunk would end a chunked body
                self._digest.update(chunk)
                yield chunk

    def md5(self) -> str:
        """Of what was sent (known once the body is)."""
        return self._digest.hexdigest()


def _body(value: Value) -> _Body:
    if isinstance(value, (bytes, bytearray)):
        return _Bytes(bytes(value))
    if isinstance(value, memoryview):
        return _Bytes(value.tobytes())
    if isinstance(value, str):
        raise TypeError("a value is bytes, not str: encode it first")
    if isinstance(value, io.TextIOBase):
        raise TypeError("open the file in binary mode ('rb')")
    if hasattr(value, "read"):
        seekable = getattr(value, "seekable", None)
        if seekable is not None and seekable():
            return _File(value)
        return _Chunks(iter(lambda: value.read(CHUNK), b""))
    if isinstance(value, Iterable):
        return _Chunks(value)
    raise TypeError(f"cannot send a {type(value).__name__}: bytes, a binary file or an "
                    "iterable of bytes")


class _Bearer(requests.auth.AuthBase):
    """Authorization: Bearer, on the service's requests only. Given as requests' auth,
    so no .netrc entry replaces it."""

    def __init__(self, token: str) -> None:
        self.header = f"Bearer {token}"

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = self.header
        return r


@dataclasses.dataclass(frozen=True)
class _Location:
    """Where the service sent a read of a key."""

    url: str
    md5: str
    volumes: tuple[str, ...]


# --- the client -------------------------------------------------------------------------------


class Client:
    """The mkv service at `url` (http://host:port). `token` is sent as `Authorization:
    Bearer` to the service (never to the volumes). `timeout` is requests' timeout (to
    connect, and between bytes) for every request. A retryable failure is tried again
    up to `retries` times, `backoff` seconds after the first and twice as long each
    time after, at most `max_backoff` (with jitter)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, *,
                 retries: int = 4, backoff: float = 0.1, max_backoff: float = 2.0,
                 session: requests.Session | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.session = session or requests.Session()
        self._auth = _Bearer(token) if token else None

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writes ---

    def put(self, key: str, value: Value, md5: bool = True) -> None:
        """Write a value under a new key: bytes, a binary file (seekable: streamed with
        Content-Length from where it stands to its end; otherwise chunked), or an
        iterable of bytes (chunked). The value is never held whole unless it is bytes.
        Raises KeyExists if the key is live."""
        body = _body(value)
        headers = {}
        if md5 and body.replayable:
            headers["Content-MD5"] = base64.b64encode(bytes.fromhex(body.md5())).decode()

        def attempt(n: int) -> None:
            try:
                self._service("PUT", key_path(key), data=body.payload(), headers=headers,
                              ok=(201,))
            except KeyExists:
                if n == 0 or not self._is_ours(key, body):
                    raise

        self._retry(f"PUT {key}", attempt, retry=body.replayable)
        if md5 and not body.replayable:
            recorded = self.stat(key).md5
            if recorded and recorded != body.md5():
                raise DigestMismatch(f"{key}: the service recorded md5 {recorded}, "
                                     f"the value sent has {body.md5()}")

    def _is_ours(self, key: str, body: _Body) -> bool:
        """After a retry meets key_exists: is the live value the one an earlier attempt
        of this put wrote (same size and md5)? Unknowable when the service has no md5."""
        try:
            st = self.stat(key)
        except NotFound:
            return False
        return bool(st.md5) and st.size == body.size and st.md5 == body.md5()

    def delete(self, key: str) -> None:
        """Delete a key (204). Raises NotFound, or Protected with `protect` on."""
        self._remove("DELETE", key)

    def unlink(self, key: str) -> None:
        """Soft-delete a key: hidden at once, its bytes kept (listed by unlinked=True)."""
        self._remove("UNLINK", key)

    def _remove(self, method: str, key: str) -> None:
        uncertain = False

        def attempt(n: int) -> None:
            nonlocal uncertain
            try:
                self._service(method, key_path(key), ok=(204,))
            except NotFound:
                if not uncertain:
                    raise  # an earlier attempt that may have landed did what was asked
            except Unavailable:
                uncertain = True  # no answer, or 503: the writer may have committed
                raise

        self._retry(f"{method} {key}", attempt)

    # --- reads ---

    def get(self, key: str) -> bytes:
        """The value, whole (open() streams it instead)."""
        def attempt(n: int) -> bytes:
            loc = self._locate("GET", key)
            resp = self._volume("GET", loc.url)
            try:
                return resp.content
            except _NO_ANSWER as exc:
                raise Unavailable(f"GET {loc.url}: {exc}") from exc
        return self._retry(f"GET {key}", attempt)

    def stat(self, key: str) -> Stat:
        """Size, md5 and volumes of a key: the service's HEAD (Content-Md5, Key-Volumes),
        then the volume's (Content-Length). Raises NotFound."""
        def attempt(n: int) -> Stat:
            loc = self._locate("HEAD", key)
            resp = self._volume("HEAD", loc.url)
            return Stat(key, int(resp.headers.get("Content-Length", -1)), loc.md5, loc.volumes,
                        loc.url)
        return self._retry(f"HEAD {key}", attempt)

    def open(self, key: str) -> BlobReader:
        """A read-only binary file over the value (read, readinto, seek, tell): bytes are
        streamed from a volume with Range requests, from wherever the file stands."""
        def attempt(n: int) -> BlobReader:
            loc = self._locate("GET", key)
            size = int(self._volume("HEAD", loc.url).headers.get("Content-Length", -1))
            if size < 0:
                raise ServerError(f"{loc.url}: the volume gave no Content-Length")
            return BlobReader(self, key, loc, size)
        return self._retry(f"open {key}", attempt)

    def list(self, prefix: str = "/", *, unlinked: bool = False,
             page: int | None = None) -> Iterator[str]:
        """Every key under `prefix`, in the service's order (bytes), page after page
        (`page` keys a request; the service caps it at its `max-list-limit`).
        `unlinked=True` lists the unlinked keys instead."""
        start = ""
        while True:
            query = "unlinked" if unlinked else "list"
            if start:
                query += "&start=" + quote(start, safe="")
            if page is not None:
                query += f"&limit={page}"
            path = f"{key_path(prefix)}?{query}"
            doc = self._retry(f"GET {path}",
                              lambda n, path=path: self._service("GET", path).json())
            yield from doc["keys"]
            start = doc["next"]
            if not start:
                return

    # --- HTTP ---

    def _send(self, method: str, url: str, *, auth: requests.auth.AuthBase | None = None,
              data: Any = None, headers: dict[str, str] | None = None, stream: bool = False,
              redirects: bool = False) -> requests.Response:
        prep = self.session.prepare_request(requests.Request(method, url, headers=headers,
                                                             data=data, auth=auth))
        prep.url = url  # exactly as encoded here: requests would decode %2E into a dot
        return self.session.send(prep, timeout=self.timeout, stream=stream,
                                 allow_redirects=redirects)

    def _service(self, method: str, path: str, *, data: Any = None,
                 headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200,)
                 ) -> requests.Response:
        """One request to the service; an answer outside `ok` is raised as its error."""
        try:
            resp = self._send(method, self.url + path, auth=self._auth, data=data,
                              headers=headers)
        except _NO_ANSWER as exc:
            raise Unavailable(f"{method} {path}: {exc}") from exc
        if resp.status_code not in ok:
            raise error_from(resp)
        return resp

    def _locate(self, method: str, key: str) -> _Location:
        resp = self._service(method, key_path(key), ok=(302,))
        volumes = resp.headers.get("Key-Volumes", "")
        return _Location(resp.headers["Location"], resp.headers.get("Content-Md5", ""),
                         tuple(volumes.split(",")) if volumes else ())

    def _volume(self, method: str, url: str, headers: dict[str, str] | None = None,
                stream: bool = False, ok: tuple[int, ...] = (200,)) -> requests.Response:
        """A request to where the service redirected (a volume, or the fallback
        service, whose own redirect is followed). A failure, a 404 included (a copy
        moved or removed since the redirect), is Unavailable: asking the service again
        gives a fresh redirect, or the key's real status."""
        try:
            resp = self._send(method, url, headers=headers, stream=stream, redirects=True)
        except _NO_ANSWER as exc:
            raise Unavailable(f"{method} {url}: {exc}") from exc
        if resp.status_code not in ok:
            resp.close()
            raise Unavailable(f"{method} {url} answered {resp.status_code}", resp.status_code)
        return resp

    def _retry(self, what: str, attempt: Callable[[int], T], retry: bool = True) -> T:
        """`attempt(n)` (n = 0, 1, ...) until it returns, or raises an error that is
        not RETRYABLE, or the retries are spent."""
        n = 0
        while True:
            try:
                return attempt(n)
            except RETRYABLE as exc:
                if not retry or n >= self.retries:
                    raise
                n += 1
                delay = self.delay(n, exc.retry_after)
                log.warning("%s: %s; retry %d of %d in %.2f s", what, exc, n, self.retries, delay)
                time.sleep(delay)

    def delay(self, n: int, retry_after: float | None = None) -> float:
        """Seconds before retry `n` (1, 2, ...): exponential, capped, with jitter (so
        clients that failed together do not come back together); at least the
        service's Retry-After."""
        base = min(self.max_backoff, self.backoff * 2 ** (n - 1))
        wait = base * random.uniform(0.5, 1.0)
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
        return wait


class BlobReader(io.RawIOBase):
    """A value read as a file: `read(n)` returns n bytes unless at the end. Sequential
    reads share one streamed GET from the volume (`Range: bytes=<pos>-`); a seek drops
    it and the next read starts another at the new position. A volume that fails
    mid-read is left for a fresh redirect (the client's retries), which must name the
    same write (the same blob path), or ValueChanged is raised. `size` and `md5` (hex,
    "" when the service has none) describe the value."""

    def __init__(self, client: Client, key: str, loc: _Location, size: int) -> None:
        super().__init__()
        self.client = client
        self.key = key
        self.size = size
        self.md5 = loc.md5
        self._loc = loc
        self._pos = 0
        self._resp: requests.Response | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("seek on a closed file")
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        if pos != self._pos:
            self._drop()
            self._pos = pos
        return pos

    def readinto(self, b: Any) -> int:
        if self.closed:
            raise ValueError("read of a closed file")
        view = memoryview(b).cast("B")
        want = min(len(view), self.size - self._pos)
        got = 0
        failures = 0
        while got < want:
            try:
                data = self._stream().raw.read(want - got, decode_content=False)
                if not data:
                    raise Unavailable(f"{self._loc.url}: the body ended at {self._pos} "
                                      f"of {self.size} bytes")
            except (*_READ_FAILED, *RETRYABLE) as exc:
                self._drop()
                failures += 1
                if failures > self.client.retries:
                    if isinstance(exc, MkvError):
                        raise
                    raise Unavailable(f"GET {self._loc.url}: {exc}") from exc
                delay = self.client.delay(failures)
                log.warning("read of %s at %d: %s; retry %d of %d in %.2f s", self.key,
                            self._pos, exc, failures, self.client.retries, delay)
                time.sleep(delay)
                self._relocate()
                continue
            view[got:got + len(data)] = data
            got += len(data)
            self._pos += len(data)
        return got

    def readall(self) -> bytes:
        out = bytearray(max(0, self.size - self._pos))
        n = self.readinto(out)
        return bytes(out[:n])

    def _stream(self) -> requests.Response:
        if self._resp is None:
            resp = self.client._volume("GET", self._loc.url, stream=True, ok=(206, 200),
                                       headers={"Range": f"bytes={self._pos}-"})
            if resp.status_code == 200 and self._pos:
                resp.close()
                raise ServerError(f"{self._loc.url} does not answer Range requests")
            self._resp = resp
        return self._resp

    def _relocate(self) -> None:
        """A fresh redirect from the service: another replica, the same write."""
        loc = self.client._retry(f"GET {self.key}", lambda n: self.client._locate("GET", self.key))
        if _blob_name(loc.url) != _blob_name(self._loc.url):
            raise ValueChanged(f"{self.key} was written again while it was being read")
        self._loc = loc

    def _drop(self) -> None:
        resp = getattr(self, "_resp", None)  # also from __del__ after a failed __init__
        if resp is not None:
            resp.close()
            self._resp = None

    def close(self) -> None:
        self._drop()
        super().close()


def _blob_name(url: str) -> str:
    """The file a redirect points at, `<sha256>.<generation>`: the same on every replica
    of one write (their URLs may differ in host and prefix), another for any other."""
    return urlsplit(url).path.rsplit("/", 1)[-1]
