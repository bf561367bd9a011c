"""Property tests of the placement rule with weights and failure domains (docs/design.md,
"Placement"): `mkv.ring.spread` on its own, and the Ring that feeds it a key's walk.

The structural properties (which domains a key's replicas are in, what a change of the
fleet leaves alone) hold for any vnode count, so they run on small rings. The claims about
shares are about the default vnode count, and run with it.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mkv import config
from mkv.ring import BadDomains, BadVolume, Ring, address_host, failure_domain, spread

FAST = settings(max_examples=80, deadline=None)
MANY = settings(max_examples=400, deadline=None)  # the rule alone is cheap: search harder
SLOW = settings(max_examples=8, deadline=None)
SMALL_VNODES = 16

Fleet = tuple[dict[str, tuple[str, str]], dict[str, float]]  # volume -> (zone, host); weights


ONE_OR_FOUR = st.sampled_from([1.0, 4.0])


@st.composite
def fleets(draw, zones=(1, 4), hosts=(1, 4), nginx=(1, 3), prefixes=True,
           weights=ONE_OR_FOUR) -> Fleet:
    """Zones of unequal size: each zone has its own number of hosts, each host its own
    number of nginx (ports), and an nginx sometimes serves two disks (prefixes)."""
    domains: dict[str, tuple[str, str]] = {}
    weight: dict[str, float] = {}
    for z in range(draw(st.integers(*zones))):
        for h in range(draw(st.integers(*hosts))):
            host = f"10.{z}.{h}.1"
            for port in range(3000, 3000 + draw(st.integers(*nginx))):
                disks = draw(st.sampled_from([[""], ["/d1", "/d2"]])) if prefixes else [""]
                for disk in disks:
                    vol = f"{host}:{port}{disk}"
                    domains[vol], weight[vol] = (f"z{z}", host), draw(weights)
    return domains, weight


def sites_of(domains: dict[str, tuple[str, str]], vols) -> list[tuple[str, str, str]]:
    return [(*domains[v], failure_domain(v)) for v in vols]


def count(items) -> int:
    return len(set(items))


keys = st.lists(st.text(max_size=20), min_size=1, max_size=10)


# ---------------------------------------------------------------- the rule on its own


@MANY
@given(fleets(), st.data(), st.integers(1, 6))
def test_replicas_cover_as_many_zones_and_hosts_as_the_candidates_allow(fleet, data, r):
    domains, _ = fleet
    cands = sites_of(domains, data.draw(st.permutations(sorted(domains))))
    chosen = [cands[i] for i in spread(cands, r)]
    zones, hosts, nginx = ({s[level] for s in cands} for level in range(3))
    assert len(chosen) == min(r, len(nginx))
    assert count(s[2] for s in chosen) == len(chosen)  # never two on one nginx
    # distinct zones when there are R of them, else distinct hosts, else distinct nginx,
    # and at every level as many domains as there are (so at the top level available,
    # no two replicas share a domain)
    assert count(s[0] for s in chosen) == min(r, len(zones))
    assert count(s[1] for s in chosen) == min(r, len(hosts))
    assert cands[spread(cands, r)[0]] == cands[0]  # the walk's first volume is the primary


@FAST
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(1, 4)), min_size=1,
                max_size=12, unique=True), st.integers(1, 5))
def test_one_zone_and_every_nginx_its_own_host_is_the_first_r_distinct_nginx(walk, r):
    cands = [("", f"{h}:{p}", f"{h}:{p}") for h, p in walk]
    assert spread(cands, r) == list(range(min(r, len(cands))))


# ---------------------------------------------------------------- the ring


@FAST
@given(fleets(), keys, st.integers(1, 5), st.data())
def test_the_ring_places_by_the_rule_over_the_usable_volumes(fleet, ks, r, data):
    domains, weights = fleet
    ring = Ring(domains, vnodes=SMALL_VNODES, weights=weights, domains=domains)
    down = set(data.draw(st.lists(st.sampled_from(sorted(domains)), unique=True)))
    for k in ks:
        walk = [v for v in ring.order(k) if v not in down]
        got = ring.place_avoiding(k, r, lambda v: v not in down)
        assert got == [walk[i] for i in spread(sites_of(domains, walk), r)]
        assert ring.place_avoiding(k, r, lambda v: True) == ring.place(k, r)


@FAST
@given(fleets(), keys, st.integers(1, 5), st.data())
def test_legacy_ring_is_the_rule_with_every_nginx_its_own_host(fleet, ks, r, data):
    """Ring(volumes) (no domains: the placement of a configuration without attributes)
    gives what `spread` gives with one zone and each host:port a host: the fast loop
    that serves it and the rule agree."""
    vols = sorted(fleet[0])
    legacy = Ring(vols, vnodes=SMALL_VNODES)
    ruled = Ring(vols, vnodes=SMALL_VNODES, domains={v: ("", failure_domain(v)) for v in vols})
    down = set(data.draw(st.lists(st.sampled_from(vols), unique=True)))
    for k in ks:
        assert legacy.place(k, r) == ruled.place(k, r)
        assert (legacy.place_avoiding(k, r, lambda v: v not in down)
                == ruled.place_avoiding(k, r, lambda v: v not in down))


@FAST
@given(fleets(), st.data(), keys, st.integers(1, 4))
def test_a_volume_added_or_removed_leaves_every_key_it_does_not_take_or_hold(fleet, data, ks, r):
    """The rule looks only at the walk, so a volume that is not chosen changes nothing."""
    domains, weights = fleet
    vols = sorted(domains)
    gone = data.draw(st.sampled_from(vols))
    assume(len(vols) > 1)
    rest = {v: d for v, d in domains.items() if v != gone}
    full = Ring(domains, vnodes=SMALL_VNODES, weights=weights, domains=domains)
    less = Ring(rest, vnodes=SMALL_VNODES, weights={v: weights[v] for v in rest}, domains=rest)
    for k in ks:
        if gone not in full.place(k, r):
            assert less.place(k, r) == full.place(k, r)


def test_domains_must_nest():
    with pytest.raises(BadDomains, match="one nginx, so one host"):
        Ring(["h:1/a", "h:1/b"], domains={"h:1/a": ("z", "x"), "h:1/b": ("z", "y")})
    with pytest.raises(BadDomains, match="one zone"):
        Ring(["h:1", "h:2"], domains={"h:1": ("a", "h"), "h:2": ("b", "h")})
    with pytest.raises(BadVolume, match="not in the ring"):
        Ring(["h:1"], domains={"g:1": ("", "g")})
    ring = Ring(["10.0.0.5:1/d", "[::1]:2"], vnodes=1, domains={})  # defaults: address host
    assert ring.site("10.0.0.5:1/d") == ("", "10.0.0.5") and ring.site("[::1]:2") == ("", "[::1]")
    assert address_host("[2001:db8::1]:80/x") == "[2001:db8::1]"
    assert Ring(["h:1"], vnodes=1).site("h:1") == ("", "h:1")  # legacy: host:port is the host


# ---------------------------------------------------------------- existing configurations


def ring_of(volumes: str, replicas: int = 3) -> Ring:
    parser = config.build_parser("mkv", "")
    ns = config.parse(parser, ["--volumes", volumes, "--replicas", str(replicas), "--db", "i.db"],
                      env={})
    return config.validate(ns).ring()


PINNED = "a.example:8001,b.example:8002,c.example:8003/d1,c.example:8003/d2,10.0.0.4:80"


def test_a_configuration_without_attributes_places_every_key_as_before():
    """The pinned placement of tests/test_ring.py, through the configuration; and clusters
    whose volumes share a host (one machine, or some machines with several nginx) keep the
    first R distinct host:port clockwise, which is what mkv has always stored."""
    ring = ring_of(PINNED)
    assert ring.place("hello", 3) == ["c.example:8003/d1", "a.example:8001", "b.example:8002"]
    assert ring.place("photos/2024/cat.jpg", 3) == [
        "c.example:8003/d2", "a.example:8001", "10.0.0.4:80"]
    assert ring.place("ключ", 3) == ["10.0.0.4:80", "c.example:8003/d1", "a.example:8001"]
    for vols in ("127.0.0.1:3001,127.0.0.1:3002,127.0.0.1:3003",
                 "h1:1,h1:2,h1:3,h2:1,h3:1,h3:2"):
        ring, before = ring_of(vols), Ring(vols.split(","))
        for i in range(2000):
            assert ring.place(f"k{i}", 3) == before.place(f"k{i}", 3)


def test_the_first_attribute_puts_volumes_on_their_address_host():
    ring = ring_of("h1:1;weight=1,h1:2,h1:3,h2:1,h3:1,h3:2")
    assert all(count(address_host(v) for v in ring.place(f"k{i}", 3)) == 3 for i in range(2000))
    legacy = ring_of("h1:1,h1:2,h1:3,h2:1,h3:1,h3:2")
    assert any(count(address_host(v) for v in legacy.place(f"k{i}", 3)) < 3 for i in range(2000))


# ---------------------------------------------------------------- shares, default vnodes

KEYS = [f"bucket/{i:06d}.bin" for i in range(20_000)]


def copies(ring: Ring, r: int) -> Counter:
    return Counter(v for k in KEYS for v in ring.place(k, r))


@SLOW
@given(st.lists(ONE_OR_FOUR, min_size=3, max_size=10))
def test_shares_follow_weights_of_1_and_4_side_by_side(ws):
    assume(1.0 in ws and 4.0 in ws)
    vols = [f"10.0.0.{i}:3000" for i in range(len(ws))]
    weights = dict(zip(vols, ws, strict=True))
    ring = Ring(vols, weights=weights, domains={})
    total = sum(ws)
    shares = ring.shares()
    counts = copies(ring, 1)
    for v in vols:  # exact share of the circle within 7 %; 20,000 keys add about 2 %
        assert shares[v] == pytest.approx(weights[v] / total, rel=0.07), (v, shares)
        assert counts[v] / len(KEYS) == pytest.approx(weights[v] / total, rel=0.10), (v, counts)
        assert ring.copy_shares(1)[v] == pytest.approx(shares[v], abs=0.015)


@SLOW
@given(fleets(zones=(3, 3), hosts=(1, 4), nginx=(1, 2), prefixes=False), st.integers(1, 3))
def test_three_zones_with_uneven_hosts(fleet, r):
    """R = 3 over three zones: one copy per zone, so each zone holds a third of the copies
    however many hosts it has, and inside a zone the copies follow the weights. R = 1:
    the weights alone."""
    domains, weights = fleet
    assume(len({h for _, h in domains.values()}) > 3)  # zones of unequal size
    ring = Ring(domains, weights=weights, domains=domains)
    got = copies(ring, r)
    total = sum(got.values())
    zone_copies, zone_weight = Counter(), Counter()
    for v, (z, _) in domains.items():
        zone_copies[z] += got[v]
        zone_weight[z] += weights[v]
    for v, (z, _) in domains.items():
        if r == 1:
            expected = weights[v] / sum(weights.values())
        else:
            expected = zone_copies[z] / total * weights[v] / zone_weight[z]
        assert got[v] / total == pytest.approx(expected, rel=0.12, abs=0.004), (v, r)
    if r == 3:
        assert all(count(domains[v][0] for v in ring.place(k, 3)) == 3 for k in KEYS[:2000])
        assert all(n / total == pytest.approx(1 / 3, abs=1e-9) for n in zone_copies.values())


@SLOW
@given(fleets(zones=(2, 3), hosts=(2, 3), nginx=(1, 2), prefixes=False), st.data(),
       st.integers(1, 3))
def test_adding_a_volume_moves_about_its_share(fleet, data, r):
    """Copies that move are the copies the new volume takes (about its share), nothing
    more: no key that does not get it moves, and a key that does loses one copy."""
    domains, weights = fleet
    zone, host = data.draw(st.sampled_from(sorted(set(domains.values()))))
    added = f"{host}:3999"  # another disk of a host
    if data.draw(st.booleans()):  # or a new host in a zone
        host, added = f"new-{zone}", f"new.{zone}.example:3999"
    grown = {**domains, added: (zone, host)}
    old = Ring(domains, weights=weights, domains=domains)
    new = Ring(grown, weights={**weights, added: data.draw(ONE_OR_FOUR)},
               domains=grown)
    moved = taken = 0
    for k in KEYS[:5000]:
        before, after = set(old.place(k, r)), set(new.place(k, r))
        moved += len(after - before)
        taken += added in after
        if added not in after:
            assert after == before
    slots = 5000 * r
    assert moved <= taken + 0.01 * slots, (moved, taken)
    assert moved / slots == pytest.approx(new.copy_shares(r)[added], abs=0.03)


def test_copy_shares_sum_to_one_and_are_even_when_every_volume_holds_every_key():
    ring = Ring(["a:1", "b:1", "c:1", "d:1"], weights={"a:1": 4.0}, domains={})
    for r in (1, 2, 4):
        assert sum(ring.copy_shares(r).values()) == pytest.approx(1.0)
    assert set(ring.copy_shares(4).values()) == {0.25}
    assert ring.copy_shares(1)["a:1"] == pytest.approx(4 / 7, abs=0.03)


def test_measured_shares_and_movement():
    """Figures for the record (pytest -s): three zones of 1, 2 and 4 hosts, two disks a
    host weighing 1 and 4; a disk added to a host and one removed; and two hosts of four
    8 TB disks beside one of four 16 TB disks."""
    domains = {f"10.{z}.{h}.1:{3000 + d}": (f"z{z}", f"10.{z}.{h}.1")
               for z, hosts in enumerate((1, 2, 4)) for h in range(hosts) for d in range(2)}
    weights = {v: 4.0 if v.endswith(":3001") else 1.0 for v in domains}
    ring = Ring(domains, weights=weights, domains=domains)
    total_weight = sum(weights.values())
    exact = max(abs(s / (weights[v] / total_weight) - 1) for v, s in ring.shares().items())
    lines = [f"weights 1 and 4: each volume's share of the circle off its weight by at most "
             f"{exact:.1%}"]
    assert exact < 0.07
    for r in (1, 3):
        got = copies(ring, r)
        total = sum(got.values())
        zone_copies, zone_weight = Counter(), Counter()
        for v, (z, _) in domains.items():
            zone_copies[z] += got[v]
            zone_weight[z] += weights[v]
        worst = max(abs(got[v] / total / (
            weights[v] / sum(weights.values()) if r == 1
            else zone_copies[z] / total * weights[v] / zone_weight[z]) - 1)
            for v, (z, _) in domains.items())
        lines.append(f"R={r}: zone shares {[round(zone_copies[z] / total, 3) for z in sorted(zone_copies)]}, "
                     f"worst volume off its weight by {worst:.1%}")
        assert worst < 0.08
    for r in (2, 3):
        added = "10.1.0.1:3002"
        grown = {**domains, added: ("z1", "10.1.0.1")}
        bigger = Ring(grown, weights={**weights, added: 4.0}, domains=grown)
        gone = "10.2.3.1:3001"
        rest = {v: d for v, d in domains.items() if v != gone}
        smaller = Ring(rest, weights={v: weights[v] for v in rest}, domains=rest)
        for name, other, vol, share in (("added", bigger, added, bigger.copy_shares(r)[added]),
                                        ("removed", smaller, gone, ring.copy_shares(r)[gone])):
            moved = sum(len(set(other.place(k, r)) - set(ring.place(k, r))) for k in KEYS)
            frac = moved / (len(KEYS) * r)
            lines.append(f"R={r}: {name} {vol}: {frac:.2%} of copies moved, its share {share:.2%}")
            assert frac == pytest.approx(share, abs=0.01)
    issue = {f"10.0.0.{h}:{3000 + d}": ("", f"10.0.0.{h}") for h in (1, 2, 3) for d in range(4)}
    capacity = Ring(issue, weights={v: 2.0 if v.startswith("10.0.0.3") else 1.0 for v in issue},
                    domains=issue)
    for r in (1, 2, 3):
        got = copies(capacity, r)
        per_host = [sum(n for v, n in got.items() if v.startswith(f"10.0.0.{h}:")) / sum(got.values())
                    for h in (1, 2, 3)]
        lines.append(f"8+8+16 TB hosts, R={r}: hosts hold {[round(x, 3) for x in per_host]} "
                     "of the copies (capacity 0.25, 0.25, 0.5)")
    print("\n" + "\n".join(lines))
