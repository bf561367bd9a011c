"""The request target (path and query) as the API reads it: the key, decoded exactly
once and strictly, and the query strings it understands (?list, ?unlinked, start,
limit). Pure, so every refusal is tested without a server."""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl

from mkv.keys import BadKey, decode_path
from mkv.model import State

#: Largest limit SQLite takes (a signed 64-bit integer).
MAX_LIMIT = (1 << 63) - 1


class BadQuery(ValueError):
    """A query string mkv does not understand (400)."""


@dataclasses.dataclass(frozen=True)
class ListQuery:
    state: State
    start: str
    limit: int | None


def parse_query(query: str) -> ListQuery | None:
    """None for a plain key request; a ListQuery for ?list / ?unlinked; BadQuery otherwise."""
    if not query:
        return None
    try:
        pairs = parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadQuery(f"malformed query string: {exc}") from exc
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise BadQuery(f"{name} given twice")
        params[name] = value
    modes = [m for m in ("list", "unlinked") if m in params]
    if len(modes) != 1:
        raise BadQuery("expected exactly one of ?list or ?unlinked")
    unknown = set(params) - {"list", "unlinked", "start", "limit"}
    if unknown:
        raise BadQuery(f"unknown query parameter {sorted(unknown)[0]!r}")
    limit = None
    if "limit" in params:
        text = params["limit"]
        if not text.isascii() or not text.isdigit() or int(text) < 1:
            raise BadQuery("limit must be a positive integer")
        if int(text) > MAX_LIMIT:
            raise BadQuery(f"limit must be at most {MAX_LIMIT}")
        limit = int(text)
    state = State.LIVE if modes[0] == "list" else State.UNLINKED
    return ListQuery(state, params.get("start", ""), limit)


def request_target(env: dict) -> tuple[str, str]:
    """The key (percent-decoded once, strictly as UTF-8) and the raw query of a request.

    The server's raw target (RAW_URI, REQUEST_URI) is used rather than PATH_INFO, so that
    invalid UTF-8 is refused instead of silently replaced. It is the absolute form only
    when it starts with http:// or https://: a `://` anywhere else is part of the key.
    Without a raw target, PATH_INFO is the path already decoded once and is not decoded
    again.
    """
    raw = env.get("RAW_URI")
    if raw is None:
        raw = env.get("REQUEST_URI")
    if raw is None:
        try:
            key = env.get("PATH_INFO", "/").encode("latin-1").decode("utf-8")
        except UnicodeError as exc:
            raise BadKey("key is not valid UTF-8") from exc
        return key, env.get("QUERY_STRING", "")
    scheme = raw[:8].lower()
    if scheme.startswith(("http://", "https://")):
        rest = raw.split("://", 1)[1]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        raw = rest[cut:]
        raw = raw if raw.startswith("/") else "/" + raw
    if not raw.startswith("/"):
        raise BadKey("the request target must be a path starting with /")
    path, sep, query = raw.partition("?")
    return decode_path(path), query if sep else env.get("QUERY_STRING", "")
