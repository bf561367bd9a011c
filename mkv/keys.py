"""Key validation and the on-disk names of a key's blob and sidecar.

A key is the percent-decoded URL path (leading slash included, as minikeyvalue's
clients expect), UTF-8, without control characters. Its blob lives under the
sha256 of the key, fanned out over two directory levels so no directory grows
past 65,536 entries; the `.key` sidecar beside it lets `mkv-rebuild` recover the key.
"""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import unquote_to_bytes

#: Paths under this prefix belong to the service itself (health, metrics).
RESERVED_PREFIX = "/-/"


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
#: A "." or ".." segment, with "/" or "\\" around it (or at either end).
_DOT_SEGMENT = re.compile(r"(?:^|[/\\])\.{1,2}(?=$|[/\\])")


class BadKey(ValueError):
    """The request path cannot be a key; the message says why, for the 400 body."""


def decode_path(raw_path: str | bytes) -> str:
    """Percent-decode a raw request path (no query) into a key, strictly as UTF-8.

    The raw path is used rather than the server's decoded one so that invalid
    UTF-8 is refused instead of silently replaced.
    """
    if isinstance(raw_path, str):
        raw_path = raw_path.encode("latin-1")
    try:
        return unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadKey("key is not valid UTF-8 after percent-decoding") from exc


def check_key(key: str, max_key_bytes: int, *, prefix: bool = False) -> str:
    """Return `key` if it may be stored, else raise BadKey.

    With `prefix=True` the bare "/" (list everything) is allowed.
    """
    if not key.startswith("/"):
        raise BadKey("key must start with /")
    if key == "/" and not prefix:
        raise BadKey("empty key")
    if len(key.encode("utf-8")) > max_key_bytes:
        raise BadKey(f"key longer than {max_key_bytes} bytes")
    if _CONTROL.search(key):
        raise BadKey("key contains control characters")
    if key.startswith(RESERVED_PREFIX) or key == RESERVED_PREFIX.rstrip("/"):
        raise BadKey(f"keys under {RESERVED_PREFIX} are reserved")
    return key


def check_new_key(key: str, max_key_bytes: int) -> str:
    """`check_key`, and for a key about to be written also no "." or ".." segment.

    HTTP clients and proxies resolve dot segments before a request leaves (RFC 3986),
    so such a key could not be named again reliably, and it reads as path traversal
    (its files are named by its hash, so it could never leave a volume root). Backslashes
    count as separators here too. Keys written before this rule stay readable.
    """
    check_key(key, max_key_bytes)
    if _DOT_SEGMENT.search(key):
        raise BadKey('key has a "." or ".." path segment')
    return key


def key_hash(key: str) -> str:
    """Hex sha256 of the key: the blob's file name on every volume."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


#: A generation: lowercase hex, at most 32 digits (docs/design.md, "Volumes and the
#: on-disk format"). New writes use GEN_DIGITS: microseconds since the epoch, then random.
GEN_RE = re.compile("[0-9a-f]{1,32}")
GEN_DIGITS = 19


def new_gen(now_ns: int, rand: bytes) -> str:
    """A write's generation: 13 hex digits of microseconds, 6 of `rand` (3 bytes). Two
    writes of one key never share one, and a later write's sorts after an earlier's."""
    return f"{now_ns // 1000:013x}{rand[:3].hex()}"


def gen_order(gen: str) -> tuple[int, str]:
    """Sort key of generations: "" (written before generations) is the oldest."""
    return (len(gen), gen)


def blob_path(key: str, gen: str = "") -> str:
    """URL path of a write's blob on a volume: /<h[0:2]>/<h[2:4]>/<h>[.<gen>]."""
    h = key_hash(key)
    return f"/{h[0:2]}/{h[2:4]}/{h}.{gen}" if gen else f"/{h[0:2]}/{h[2:4]}/{h}"


def sidecar_path(key: str, gen: str = "") -> str:
    """URL path of a write's sidecar, written only once the blob is complete."""
    return blob_path(key, gen) + ".key"


def sidecar_body(key: str, size: int, md5: str, unlinked: bool = False) -> bytes:
    """The sidecar's one line of JSON. An UNLINKed key's sidecar says so, so that a
    rebuilt index keeps it hidden instead of bringing it back to life."""
    doc: dict = {"key": key, "size": size, "md5": md5}
    if unlinked:
        doc["unlinked"] = True
    return json.dumps(doc, ensure_ascii=False).encode() + b"\n"


def next_prefix(prefix: str) -> str | None:
    """Smallest string greater than every string starting with `prefix` (by UTF-8 bytes).

    SQLite's BINARY collation compares UTF-8 bytes, which order the same as code
    points, so incrementing the last code point gives the exclusive upper bound
    of a range scan. None means "no upper bound".
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot be encoded
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None
