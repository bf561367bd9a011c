"""Placement: a consistent hash ring over volumes (docs/design.md, "Placement").

Pure code, no IO. The hash functions and the vnode naming below decide where every blob
lives, so they are part of the on-disk contract: changing them moves every key.
"""

from __future__ import annotations

import ipaddress
import math
import re
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from hashlib import blake2b
from itertools import chain

# 4000 vnodes per volume keeps each volume's share of the hash space within about +-5 % of
# fair for 3..10 volumes (the spread shrinks like 1/sqrt(vnodes)); lookups are a bisect,
# so the count costs memory and start-up time, not per-request time.
DEFAULT_VNODES = 4000

_VOLUME = re.compile(r"(?P<host>\[[^\]]*\]|[^:/\[\]]*):(?P<port>[^/]*)(?P<prefix>/.*)?", re.DOTALL)
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class BadVolume(ValueError):
    """A volume string that is not host:port or host:port/prefix."""


def _bad(text: object, why: str) -> BadVolume:  # every message names the text and the rule
    return BadVolume(f"bad volume {text!r}: {why} (expected host:port or host:port/prefix)")


def _host(text: str, host: str) -> str:
    """Canonical host, so that spellings of one server ("H", "h") are one volume and domain."""
    try:
        if host.startswith("["):
            ip = ipaddress.IPv6Address(host[1:-1])
            if ip.scope_id:  # a zone id ("%eth0") means nothing to another machine
                raise ValueError
            return f"[{ip.compressed}]"
        if host.rsplit(".", 1)[-1].isdigit():  # all-numeric top label: IPv4 or nothing
            return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise _bad(text, f"{host!r} is not a valid IP address") from None
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _bad(text, f"{host!r} is not a hostname")
    return host.lower()


def parse_volume(text: str) -> str:
    """Validate a volume and return its canonical spelling.

    Volumes end up in URLs, blob paths and the index, so anything that could mean two
    things (a scheme, "..", an empty or trailing path segment, port 0) is refused here
    rather than discovered later as a 404 or a key written where nobody looks for it.
    """
    if not isinstance(text, str):
        raise _bad(text, "not a string")
    s = text.strip()
    if "://" in s:
        raise _bad(text, "drop the scheme")
    m = _VOLUME.fullmatch(s)
    if not m or not m["host"]:
        raise _bad(text, "missing host or port")
    port = m["port"]
    digits = port.isascii() and port.isdigit() and len(port.lstrip("0")) <= 5
    if not (digits and 1 <= int(port) <= 65535):
        raise _bad(text, f"port {port!r} is not in 1..65535")
    prefix = m["prefix"] or ""
    for seg in prefix.split("/")[1:]:
        if not seg:
            raise _bad(text, "empty prefix segment (a trailing or doubled '/')")
        if not _SEGMENT.fullmatch(seg) or seg in (".", ".."):
            raise _bad(text, f"prefix segment {seg!r} is not [A-Za-z0-9._-]+ (nor . or ..)")
    return f"{_host(text, m['host'])}:{int(port)}{prefix}"


def failure_domain(volume: str) -> str:
    """The host:port part: prefixes behind one nginx die together, so count as one."""
    return volume.split("/", 1)[0]


def _hash(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """Volumes own many points on a 64-bit circle; a key goes to the owners clockwise of it.

    Everything is precomputed here because walk/place run on every request: a sorted array
    of positions to bisect and a parallel array of owner indices. The ring is immutable: a
    new volume set means a new Ring.
    """

    def __init__(self, volumes: Iterable[str], vnodes: int = DEFAULT_VNODES,
                 weights: Mapping[str, float] | None = None) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        names = [parse_volume(v) for v in volumes]
        dupes = sorted({v for v in names if names.count(v) > 1})
        if dupes:
            raise BadVolume(f"duplicate volumes: {', '.join(dupes)}")
        self.volumes: tuple[str, ...] = tuple(sorted(names))
        wanted = {parse_volume(v): w for v, w in (weights or {}).items()}
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise BadVolume(f"weights given for volumes not in the ring: {', '.join(unknown)}")
        points: list[int] = []  # position << 32 | volume index: sorts by (position, name)
        for idx, v in enumerate(self.volumes):
            w = float(wanted.get(v, 1.0))
            if not (w > 0 and math.isfinite(w)):
                raise ValueError(f"weight of {v} must be a finite number > 0, got {w}")
            count = max(1, round(vnodes * w))
            points += (_hash(f"{v}\x00{i}".encode()) << 32 | idx for i in range(count))
        points.sort()
        self._positions = array("Q", [p >> 32 for p in points])
        self._owners = array("I", [p & 0xFFFFFFFF for p in points])
        domains = sorted({failure_domain(v) for v in self.volumes})
        self._domain = [domains.index(failure_domain(v)) for v in self.volumes]
        self._ndomains = len(domains)  # 0 for an empty ring: place() then returns []

    def _clockwise(self, key: str) -> Iterable[int]:
        """Vnode indexes from the key's position round the circle, once each."""
        start = bisect_left(self._positions, _hash(key.encode()))
        return chain(range(start, len(self._owners)), range(start))

    def walk(self, key: str) -> Iterator[str]:
        """Every volume once, clockwise from the key: the order to look for or put it in."""
        n, owners, seen = len(self.volumes), self._owners, set()
        for i in self._clockwise(key) if n else ():
            o = owners[i]
            if o not in seen:
                seen.add(o)
                yield self.volumes[o]
                if len(seen) == n:
                    return

    def order(self, key: str) -> list[str]:
        return list(self.walk(key))

    def place(self, key: str, replicas: int) -> list[str]:
        """The key's home: the first `replicas` volumes clockwise in distinct failure domains."""
        return self.place_avoiding(key, replicas, None)

    def place_avoiding(self, key: str, replicas: int,
                       usable: Callable[[str], bool] | None) -> list[str]:
        """Like place, but a volume that is not usable (down) passes its turn to the next.

        A skipped volume does not claim its domain, so a sibling prefix on the same host can
        stand in for it. May return fewer than `replicas` volumes: the caller decides (503).
        """
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        out: list[str] = []
        want, n = min(replicas, self._ndomains), len(self.volumes)
        owners, volumes, domain = self._owners, self.volumes, self._domain
        seen: set[int] = set()
        taken: set[int] = set()
        for i in self._clockwise(key) if want else ():
            o = owners[i]
            if o in seen:
                continue
            seen.add(o)
            if domain[o] not in taken and (usable is None or usable(volumes[o])):
                taken.add(domain[o])
                out.append(volumes[o])
                if len(out) == want:
                    break
            if len(seen) == n:
                break
        return out

    def shares(self) -> dict[str, float]:
        """Fraction of the hash space each volume is primary for: its load, exactly."""
        out = dict.fromkeys(self.volumes, 0.0)
        pos, owners = self._positions, self._owners
        for i, p in enumerate(pos):  # arc (pos[i-1], pos[i]] belongs to owners[i]
            arc = (p - pos[i - 1]) % 2**64 or (2**64 if len(pos) == 1 else 0)
            out[self.volumes[owners[i]]] += arc / 2**64
        return out
