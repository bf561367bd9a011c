"""The query strings the API understands (?list, ?unlinked, start, limit), parsed into
plain values; pure, so every refusal is tested without a server."""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl

from mkv.model import State


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
        limit = int(text)
    state = State.LIVE if modes[0] == "list" else State.UNLINKED
    return ListQuery(state, params.get("start", ""), limit)
