"""The `volumes` entries: each volume's address, public URL, weight, zone and host.

An entry is `address[=URL][;weight=W][;zone=Z][;host=H]`, for example
`10.0.0.5:3001=https://vol1.example.com;weight=2;zone=a` (docs/design.md, "Placement").
Pure code: parsing, and the rule that gives every volume its failure domains. The rule is
chosen so that a list without any attribute places every key where it always was.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from mkv.ring import BadDomains, BadVolume, address_host, parse_volume, sites

#: What an entry may say about placement, after its address.
ATTRIBUTES = ("weight", "zone", "host")

#: Weights a ring handles well: a volume has `vnodes` x weight points, so a large weight
#: costs memory and start-up time in every process, and a tiny one gives a lumpy share.
MIN_WEIGHT, MAX_WEIGHT = 0.1, 20.0

_LABEL = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class BadEntry(ValueError):
    """A `volumes` entry that cannot be used; the message names the entry and the rule."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One volume as configured. None: the entry does not say (the defaults apply)."""

    volume: str
    url: str = ""
    weight: float | None = None
    zone: str | None = None
    host: str | None = None

    @property
    def places(self) -> bool:
        """The entry says something about placement."""
        return (self.weight, self.zone, self.host) != (None, None, None)


def public_url(text: str) -> str:
    """A volume's public base URL (scheme://host[:port], no path): where clients are sent,
    while mkv keeps talking to the address before the "="; ValueError if it is not one."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"public URL {text!r} must be http:// or https:// and a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"public URL {text!r} must be scheme://host[:port] only (the "
                         "volume's own path prefix follows it)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"public URL {text!r} has a bad port") from None
    return f"{parts.scheme}://{parts.netloc}"


def _weight(entry: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and MIN_WEIGHT <= weight <= MAX_WEIGHT):
        raise BadEntry(f"{entry}: weight {text!r} must be a number from {MIN_WEIGHT:g} to "
                       f"{MAX_WEIGHT:g} (to empty a volume, leave it out and run mkv-rebalance)")
    return weight


def _label(entry: str, name: str, text: str) -> str:
    label = text.strip().lower()
    if not _LABEL.fullmatch(label):
        raise BadEntry(f"{entry}: {name} {text!r} must be 1 to 63 of a-z 0-9 . _ - "
                       "(starting with a letter or digit)")
    return label


def parse_entry(text: str) -> Entry:
    """One entry of `volumes`; BadEntry or BadVolume (naming it) if it is wrong."""
    first, *attrs = text.strip().split(";")
    address, has_url, url = first.partition("=")
    volume = parse_volume(address)
    found: dict[str, str] = {}
    for attr in attrs:
        name, eq, value = attr.partition("=")
        name = name.strip().lower()
        if name not in ATTRIBUTES or not eq:
            near = difflib.get_close_matches(name, ATTRIBUTES, n=1)
            hint = f"; did you mean {near[0]}=?" if near else ""
            raise BadEntry(f"{text}: {attr!r} is not one of "
                           f"{', '.join(a + '=' for a in ATTRIBUTES)}{hint}")
        if name in found:
            raise BadEntry(f"{text}: {name}= is given twice")
        found[name] = value
    try:
        base = public_url(url) if has_url else ""
    except ValueError as exc:
        raise BadEntry(f"{address}: {exc}") from None
    return Entry(volume, base,
                 _weight(text, found["weight"]) if "weight" in found else None,
                 _label(text, "zone", found["zone"]) if "zone" in found else None,
                 _label(text, "host", found["host"]) if "host" in found else None)


def parse_entries(texts: Iterable[str]) -> tuple[list[Entry], list[str]]:
    """Every entry that parses, and one problem line per entry that does not."""
    entries: list[Entry] = []
    problems: list[str] = []
    for text in texts:
        try:
            entries.append(parse_entry(text))
        except (BadEntry, BadVolume) as exc:
            problems.append(str(exc))
    return entries, problems


def domains(entries: Sequence[Entry]) -> tuple[tuple[str, str, str], ...]:
    """(volume, zone, host) of every volume, or () for a list that says nothing about
    placement (the ring then counts every nginx as a host of its own, as mkv always did).

    Once any entry has an attribute, the list is placed by domains: a volume is on its
    `host=`, else on its address's host, and in its `zone=`. Zones are named for every
    volume or for none (a volume left out of all zones would be a zone of its own by
    accident). BadDomains if the zones are half given or the domains do not nest.
    """
    if not any(e.places for e in entries):
        return ()
    unzoned = [e.volume for e in entries if e.zone is None]
    if len(unzoned) not in (0, len(entries)):
        raise BadDomains(f"zone= is given for some volumes but not for {', '.join(unzoned)}: "
                         "name a zone for every volume or for none")
    out = tuple((e.volume, e.zone or "", e.host or address_host(e.volume)) for e in entries)
    sites([v for v, _, _ in out], {v: (z, h) for v, z, h in out})  # raises if they do not nest
    return out
