"""Placement: a consistent hash ring over volumes (docs/design.md, "Placement").

Pure code, no IO. The hash functions and the vnode naming below decide where every blob
lives, so they are part of the on-disk contract: changing them moves every key. So is
the rule that picks a key's replicas from its walk (`spread`): distinct zones when the
fleet has enough of them, else distinct hosts, else distinct nginx (host:port).
"""

from __future__ import annotations

import ipaddress
import math
import re
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from hashlib import blake2b
from itertools import chain

# 4000 vnodes per volume keeps each volume's share of the hash space within about +-5 % of
# fair for 3..10 volumes (the spread shrinks like 1/sqrt(vnodes)); lookups are a bisect,
# so the count costs memory and start-up time, not per-request time.
DEFAULT_VNODES = 4000

_VOLUME = re.compile(r"(?P<host>\[[^\]]*\]|[^:/\[\]]*):(?P<port>[^/]*)(?P<prefix>/.*)?", re.DOTALL)
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


#: Points at which `copy_shares` samples the placement: about +-1 % (absolute) of noise
#: on a share of copies, for a few tens of milliseconds of work once per ring.
SHARE_POINTS = 8192


class BadVolume(ValueError):
    """A volume string that is not host:port or host:port/prefix."""


class BadDomains(ValueError):
    """Failure domains that do not nest: an nginx on two hosts, or a host in two zones."""


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
    """The host:port part (the volume's nginx): prefixes behind one nginx die together,
    so two replicas never share one, whatever the zones and hosts say."""
    return volume.split("/", 1)[0]


def address_host(volume: str) -> str:
    """The host part of a canonical volume ("10.0.0.5" of "10.0.0.5:3001/d1"): the machine
    a volume is on unless its configuration names another (`host=`)."""
    return failure_domain(volume).rsplit(":", 1)[0]


def spread(candidates: Sequence[tuple[str, str, str]], replicas: int) -> list[int]:
    """The placement rule: which of a key's candidates (in walk order) hold its replicas.

    A candidate is (zone, host, nginx). Each replica goes to the first candidate clockwise
    on an nginx not taken yet that shares the least with the replicas chosen so far: a
    new zone first, else a new host (in the zone with the fewest replicas), else a new
    nginx (on the least used host). So the replicas are in distinct zones when there are
    at least R zones, else on distinct hosts when there are at least R hosts, else on
    distinct nginx, and as spread out as the level below allows. Returns indexes into
    `candidates`, at most one per nginx (fewer than R when there are fewer nginx).

    With one zone and every nginx its own host, every candidate after the first scores
    the same, and the rule is "the first R distinct nginx clockwise": the placement mkv
    always had, which a configuration without placement attributes keeps.
    """
    out: list[int] = []
    nginx_taken: set[str] = set()
    zones: Counter[str] = Counter()
    hosts: Counter[str] = Counter()
    for _ in range(replicas):
        best, best_score = -1, (3, 0, 0)
        for i, (zone, host, nginx) in enumerate(candidates):
            if nginx in nginx_taken:
                continue
            in_zone = zones[zone]
            if not in_zone:  # a new zone: nothing scores better, and it is the first
                best = i
                break
            on_host = hosts[host]
            score = (1 if not on_host else 2, in_zone, on_host)
            if score < best_score:
                best, best_score = i, score
        if best < 0:
            break
        zone, host, nginx = candidates[best]
        out.append(best)
        nginx_taken.add(nginx)
        zones[zone] += 1
        hosts[host] += 1
    return out


def _hash(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


class Ring:
    """Volumes own many points on a 64-bit circle; a key goes to the owners clockwise of it.

    Everything is precomputed here because walk/place run on every request: a sorted array
    of positions to bisect and a parallel array of owner indices. The ring is immutable: a
    new volume set means a new Ring.

    `weights` scale a volume's point count (its share of the circle). `domains` gives
    volumes their (zone, host); a volume it leaves out is on its address's host, in the
    zone "". Without `domains` (None) every nginx is a host of its own in one zone, which
    is the placement of a configuration that names no weight, zone or host.
    """

    def __init__(self, volumes: Iterable[str], vnodes: int = DEFAULT_VNODES,
                 weights: Mapping[str, float] | None = None,
                 domains: Mapping[str, tuple[str, str]] | None = None) -> None:
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
        self.weights: dict[str, float] = {}
        points: list[int] = []  # position << 32 | volume index: sorts by (position, name)
        for idx, v in enumerate(self.volumes):
            w = float(wanted.get(v, 1.0))
            if not (w > 0 and math.isfinite(w)):
                raise ValueError(f"weight of {v} must be a finite number > 0, got {w}")
            self.weights[v] = w
            count = max(1, round(vnodes * w))
            points += (_hash(f"{v}\x00{i}".encode()) << 32 | idx for i in range(count))
        points.sort()
        self._positions = array("Q", [p >> 32 for p in points])
        self._owners = array("I", [p & 0xFFFFFFFF for p in points])
        self.sites: tuple[tuple[str, str, str], ...] = sites(self.volumes, domains)
        self._legacy = domains is None  # one zone, each nginx its own host
        nginxes = sorted({failure_domain(v) for v in self.volumes})
        self._domain = [nginxes.index(failure_domain(v)) for v in self.volumes]
        self._ndomains = len(nginxes)  # 0 for an empty ring: place() then returns []
        self._copy_shares: dict[int, dict[str, float]] = {}

    def site(self, volume: str) -> tuple[str, str]:
        """(zone, host) of a volume, as placement sees them."""
        zone, host, _ = self.sites[self.volumes.index(parse_volume(volume))]
        return zone, host

    def _clockwise_from(self, position: int) -> Iterable[int]:
        """Vnode indexes from a position round the circle, once each."""
        start = bisect_left(self._positions, position)
        return chain(range(start, len(self._owners)), range(start))

    def _clockwise(self, key: str) -> Iterable[int]:
        return self._clockwise_from(_hash(key.encode()))

    def _walk(self, vnodes: Iterable[int]) -> Iterator[int]:
        n, owners, seen = len(self.volumes), self._owners, set()
        for i in vnodes if n else ():
            o = owners[i]
            if o not in seen:
                seen.add(o)
                yield o
                if len(seen) == n:
                    return

    def walk(self, key: str) -> Iterator[str]:
        """Every volume once, clockwise from the key: the order to look for or put it in."""
        return (self.volumes[o] for o in self._walk(self._clockwise(key)))

    def order(self, key: str) -> list[str]:
        return list(self.walk(key))

    def place(self, key: str, replicas: int) -> list[str]:
        """The key's home: R volumes of its walk in distinct failure domains (`spread`)."""
        return self.place_avoiding(key, replicas, None)

    def place_avoiding(self, key: str, replicas: int,
                       usable: Callable[[str], bool] | None) -> list[str]:
        """Like place, but a volume that is not usable (down) passes its turn to the next.

        A skipped volume does not claim its domain, so a sibling prefix on the same host can
        stand in for it, and the rule spreads the replicas over the domains still usable.
        May return fewer than `replicas` volumes: the caller decides (503).
        """
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        return self._place(self._clockwise(key), replicas, usable)

    def _place(self, vnodes: Iterable[int], replicas: int,
               usable: Callable[[str], bool] | None) -> list[str]:
        volumes = self.volumes
        if not self._legacy:
            walk = [o for o in self._walk(vnodes) if usable is None or usable(volumes[o])]
            return [volumes[walk[i]] for i in spread([self.sites[o] for o in walk], replicas)]
        # one zone, each nginx its own host: `spread` comes to the first R distinct nginx
        # clockwise, which this loop finds without walking further than it must
        out: list[str] = []
        want, n = min(replicas, self._ndomains), len(volumes)
        owners, domain = self._owners, self._domain
        seen: set[int] = set()
        taken: set[int] = set()
        for i in vnodes if want else ():
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

    def copy_shares(self, replicas: int, points: int = SHARE_POINTS) -> dict[str, float]:
        """Fraction of all copies each volume holds under the placement rule (they sum to
        1): what its disk fills with, measured at `points` evenly spaced positions of the
        circle (the positions keys hash to), once per ring."""
        if replicas not in self._copy_shares:
            counts = dict.fromkeys(self.volumes, 0)
            step = 2**64 // points
            for i in range(points):
                for v in self._place(self._clockwise_from(i * step + step // 2), replicas, None):
                    counts[v] += 1
            total = sum(counts.values()) or 1
            self._copy_shares[replicas] = {v: c / total for v, c in counts.items()}
        return dict(self._copy_shares[replicas])


def sites(volumes: Sequence[str], domains: Mapping[str, tuple[str, str]] | None
           ) -> tuple[tuple[str, str, str], ...]:
    """(zone, host, nginx) of each volume, checked to nest: every nginx on one host, every
    host in one zone (a tree, so "a new zone" always means "a new host" too)."""
    if domains is None:
        return tuple(("", failure_domain(v), failure_domain(v)) for v in volumes)
    given = {parse_volume(v): d for v, d in domains.items()}
    unknown = sorted(set(given) - set(volumes))
    if unknown:
        raise BadVolume(f"domains given for volumes not in the ring: {', '.join(unknown)}")
    sites = tuple((*given.get(v, ("", address_host(v))), failure_domain(v)) for v in volumes)
    host_of: dict[str, str] = {}
    zone_of: dict[str, str] = {}
    for zone, host, nginx in sites:
        if host_of.setdefault(nginx, host) != host:
            raise BadDomains(f"{nginx} is one nginx, so one host: not both "
                             f"{host_of[nginx]!r} and {host!r}")
        if zone_of.setdefault(host, zone) != zone:
            raise BadDomains(f"host {host!r} is in one zone: not both {zone_of[host]!r} "
                             f"and {zone!r}")
    return sites
