"""Property tests of the placement ring (docs/design.md, "Placement").

Invariants that do not depend on the vnode count run on small rings (fast, and fewer vnodes
make collisions between volumes more likely, which is where bugs hide). Load-balance
properties run with DEFAULT_VNODES, since that is what the claim is about.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mkv.ring import DEFAULT_VNODES, BadVolume, Ring, failure_domain, parse_volume

FAST = settings(max_examples=60, deadline=None)
SLOW = settings(max_examples=12, deadline=None)
SMALL_VNODES = 16

# ---------------------------------------------------------------- strategies

hostnames = st.from_regex(r"[a-z][a-z0-9-]{0,6}[a-z0-9]", fullmatch=True)
ports = st.integers(1, 65535)
domains = st.builds(lambda h, p: f"{h}:{p}", hostnames, ports)
prefixes = st.lists(st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,4}", fullmatch=True)
                    .filter(lambda s: s not in (".", "..")), max_size=2)
keys = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@st.composite
def volume_sets(draw, min_size: int = 1, max_size: int = 8) -> list[str]:
    """Canonical, distinct volumes, often several prefixes behind one host:port."""
    doms = draw(st.lists(domains, min_size=1, max_size=max_size, unique=True))
    vols = draw(st.lists(st.builds(lambda d, p: d + "".join("/" + s for s in p),
                                   st.sampled_from(doms), prefixes),
                         min_size=min_size, max_size=max_size, unique=True))
    return vols


def distinct_hosts(n_min: int, n_max: int):
    """Volumes that are each their own failure domain (the 'equal volumes' of the load claims)."""
    return st.lists(domains, min_size=n_min, max_size=n_max, unique=True)


# ---------------------------------------------------------------- reference model


def h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def reference_order(volumes: list[str], key: str, vnodes: int) -> list[str]:
    """The contract written out naively: vnode i of v sits at blake2b-64(f"{v}\\0{i}")."""
    points = sorted((h64(f"{v}\x00{i}".encode()), v) for v in volumes for i in range(vnodes))
    start = bisect_left([p for p, _ in points], h64(key.encode()))
    order: list[str] = []
    for _, v in points[start:] + points[:start]:
        if v not in order:
            order.append(v)
    return order


def greedy(order: list[str], replicas: int, usable=lambda v: True) -> list[str]:
    out: list[str] = []
    for v in order:
        if len(out) < replicas and usable(v) and failure_domain(v) not in map(failure_domain, out):
            out.append(v)
    return out


def respell(volume: str) -> str:
    """Another spelling of the same volume: host in upper case, port with a leading zero."""
    domain, slash, prefix = volume.partition("/")
    return domain.upper().replace(":", ":0") + slash + prefix


def is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(x in it for x in short)


# ---------------------------------------------------------------- walk and place


@FAST
@given(volume_sets(), st.lists(keys, min_size=1, max_size=10))
def test_walk_matches_contract_and_yields_every_volume_once(vols, ks):
    ring = Ring(vols, vnodes=SMALL_VNODES)
    assert ring.volumes == tuple(sorted(vols))
    for k in ks:
        order = ring.order(k)
        assert sorted(order) == sorted(vols) and len(set(order)) == len(order)
        assert order == list(ring.walk(k)) == reference_order(vols, k, SMALL_VNODES)


@FAST
@given(volume_sets(), st.lists(keys, min_size=1, max_size=10), st.integers(1, 5))
def test_place_gives_r_distinct_domains_or_all_of_them(vols, ks, r):
    ring = Ring(vols, vnodes=SMALL_VNODES)
    n_domains = len({failure_domain(v) for v in vols})
    for k in ks:
        placed = ring.place(k, r)
        assert len(placed) == min(r, n_domains)
        assert len({failure_domain(v) for v in placed}) == len(placed)
        assert placed == greedy(ring.order(k), r)  # first R domains clockwise


def test_prefixes_behind_one_nginx_share_a_domain():
    ring = Ring(["h:1/d1", "h:1/d2", "g:2"], vnodes=SMALL_VNODES)
    for i in range(300):
        two, three = ring.place(f"k{i}", 2), ring.place(f"k{i}", 3)
        assert "g:2" in two and len({failure_domain(v) for v in two}) == 2
        assert three == two  # only two domains exist
    only_one_host = Ring(["h:1/d1", "h:1/d2", "h:1/d3"], vnodes=SMALL_VNODES)
    assert all(len(only_one_host.place(f"k{i}", 3)) == 1 for i in range(100))


@FAST
@given(volume_sets(), st.randoms(use_true_random=False), st.lists(keys, max_size=10))
def test_deterministic_and_independent_of_listing_order(vols, rnd, ks):
    shuffled = list(vols)
    rnd.shuffle(shuffled)
    a, b = Ring(vols, vnodes=SMALL_VNODES), Ring(shuffled, vnodes=SMALL_VNODES)
    # the same volumes spelled differently (host case, padding, leading zeros) are the same ring
    c = Ring([f"  {respell(v)}\t" for v in shuffled], vnodes=SMALL_VNODES)
    assert a.volumes == b.volumes == c.volumes
    for k in ks:
        assert a.order(k) == b.order(k) == c.order(k) == Ring(vols, vnodes=SMALL_VNODES).order(k)
        assert a.place(k, 3) == b.place(k, 3) == c.place(k, 3)


def test_placement_is_pinned():
    """Hash, vnode naming and tie-breaking are an on-disk contract: a change moves every key."""
    ring = Ring(["a.example:8001", "b.example:8002", "c.example:8003/d1",
                 "c.example:8003/d2", "10.0.0.4:80"])
    assert ring.place("hello", 3) == ["c.example:8003/d1", "a.example:8001", "b.example:8002"]
    assert ring.place("photos/2024/cat.jpg", 3) == [
        "c.example:8003/d2", "a.example:8001", "10.0.0.4:80"]
    assert ring.place("ключ", 3) == ["10.0.0.4:80", "c.example:8003/d1", "a.example:8001"]
    assert ring.order("") == ["b.example:8002", "10.0.0.4:80", "c.example:8003/d1",
                              "c.example:8003/d2", "a.example:8001"]


def test_edges():
    empty = Ring([])
    assert empty.order("k") == [] and empty.place("k", 3) == []
    assert empty.place_avoiding("k", 3, lambda v: True) == []
    one = Ring(["h:1"], vnodes=1)
    assert one.place("k", 0) == [] and one.place("k", 3) == ["h:1"]
    assert one.shares() == {"h:1": 1.0}
    with pytest.raises(ValueError):
        one.place("k", -1)
    with pytest.raises(ValueError):
        Ring(["h:1"], vnodes=0)


# ---------------------------------------------------------------- membership changes


@FAST
@given(volume_sets(max_size=7), st.data(), st.lists(keys, min_size=1, max_size=20),
       st.integers(1, 4))
def test_adding_a_volume_moves_keys_only_onto_it(vols, data, ks, r):
    # the newcomer is a new host, or another disk behind a host already in the ring
    added = data.draw(st.one_of(
        domains, st.builds(lambda d, s: f"{d}/{s}",
                           st.sampled_from(sorted({failure_domain(v) for v in vols})),
                           st.sampled_from(["new", "d9"]))))
    assume(added not in vols)
    old, grown = Ring(vols, vnodes=SMALL_VNODES), Ring([*vols, added], vnodes=SMALL_VNODES)
    for k in ks:
        before, after = old.place(k, r), grown.place(k, r)
        assert [v for v in grown.order(k) if v != added] == old.order(k)
        if added not in after:
            assert after == before
            continue
        rest = [v for v in after if v != added]
        assert is_subsequence(rest, before)  # survivors keep their relative order
        lost = set(before) - set(rest)
        assert len(lost) <= 1  # the new volume replaced at most one old holder
        assert len(after) == len(before) + (0 if lost else 1)


@FAST
@given(volume_sets(min_size=2), st.data(), st.lists(keys, min_size=1, max_size=20),
       st.integers(1, 4))
def test_removing_a_volume_moves_only_keys_it_held(vols, data, ks, r):
    gone = data.draw(st.sampled_from(vols))
    old = Ring(vols, vnodes=SMALL_VNODES)
    shrunk = Ring([v for v in vols if v != gone], vnodes=SMALL_VNODES)
    for k in ks:
        before, after = old.place(k, r), shrunk.place(k, r)
        if gone not in before:
            assert after == before
        else:
            assert set(before) - {gone} <= set(after)
            assert len(set(after) - set(before)) <= 1


KEYS_2K = [f"obj/{i}" for i in range(2000)]


@SLOW
@given(distinct_hosts(3, 8), domains)
def test_adding_a_volume_moves_about_one_in_n_plus_one(vols, added):
    assume(added not in vols)
    old, grown = Ring(vols), Ring([*vols, added])
    moved = [k for k in KEYS_2K if old.place(k, 1) != grown.place(k, 1)]
    assert all(grown.place(k, 1) == [added] for k in moved)
    expected = 1 / (len(vols) + 1)
    assert abs(len(moved) / len(KEYS_2K) - expected) < 0.2 * expected + 0.02


# ---------------------------------------------------------------- load balance


KEYS_20K = [f"bucket/{i:06d}.bin" for i in range(20_000)]


@SLOW
@given(distinct_hosts(3, 8))
def test_load_is_close_to_fair_share_with_default_vnodes(vols):
    ring = Ring(vols)
    fair = 1 / len(vols)
    shares = ring.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(abs(s / fair - 1) < 0.07 for s in shares.values()), shares  # seen: <= 4.4 %
    counts = Counter(ring.place(k, 1)[0] for k in KEYS_20K)
    for v in vols:  # sampling adds about 2 % noise on top of the exact share
        assert abs(counts[v] / len(KEYS_20K) / fair - 1) < 0.10, (v, counts)
        assert counts[v] / len(KEYS_20K) == pytest.approx(shares[v], abs=0.015)


@SLOW
@given(distinct_hosts(3, 6), st.sampled_from([0.5, 2.0, 3.0]))
def test_weights_scale_load(vols, weight):
    heavy, *light = vols
    # weights are keyed by any spelling of the volume
    ring = Ring(vols, weights={heavy.upper(): weight, light[0]: 1.0})
    shares = ring.shares()
    base = sum(shares[v] for v in light) / len(light)
    assert shares[heavy] / base == pytest.approx(weight, rel=0.12)
    counts = Counter(ring.place(k, 1)[0] for k in KEYS_20K)
    base_n = sum(counts[v] for v in light) / len(light)
    assert counts[heavy] / base_n == pytest.approx(weight, rel=0.15)


def test_bad_weights():
    with pytest.raises(ValueError):
        Ring(["h:1", "g:1"], weights={"h:1": 0})
    with pytest.raises(ValueError):
        Ring(["h:1", "g:1"], weights={"h:1": float("nan")})
    with pytest.raises(BadVolume, match="not in the ring"):
        Ring(["h:1", "g:1"], weights={"x:1": 2})
    assert len(Ring(["h:1"], vnodes=10, weights={"h:1": 0.001})._positions) == 1  # >= 1 vnode


# ---------------------------------------------------------------- place_avoiding


@FAST
@given(volume_sets(), st.data(), st.lists(keys, min_size=1, max_size=10), st.integers(1, 4))
def test_place_avoiding_skips_unusable_volumes(vols, data, ks, r):
    down = set(data.draw(st.lists(st.sampled_from(vols), unique=True)))
    ring = Ring(vols, vnodes=SMALL_VNODES)
    live_domains = {failure_domain(v) for v in vols if v not in down}
    for k in ks:
        placed = ring.place_avoiding(k, r, lambda v: v not in down)
        assert not set(placed) & down
        assert len({failure_domain(v) for v in placed}) == len(placed)
        assert len(placed) == min(r, len(live_domains))  # fewer than R when not enough
        assert placed == greedy(ring.order(k), r, lambda v: v not in down)
        assert ring.place_avoiding(k, r, lambda v: True) == ring.place(k, r)


def test_down_primary_hands_over_to_the_next_clockwise():
    ring = Ring(["a:1", "b:1", "c:1/x", "c:1/y", "d:1"], vnodes=SMALL_VNODES)
    for i in range(200):
        order = ring.order(f"k{i}")
        home = ring.place(f"k{i}", 2)
        got = ring.place_avoiding(f"k{i}", 2, lambda v, dead=home[0]: v != dead)
        assert home[0] == order[0] and got[0] == order[1]
        assert home[1] in got
        # a dead prefix does not take its host out: its sibling may stand in
        if home[0] in ("c:1/x", "c:1/y"):
            sibling = "c:1/y" if home[0] == "c:1/x" else "c:1/x"
            if order.index(sibling) < order.index(home[1]):
                assert got[0] == sibling


# ---------------------------------------------------------------- parse_volume

GOOD = {
    "h:1": "h:1",
    "localhost:65535": "localhost:65535",
    "  Vol-1.Example.COM:080/Disk_1/a.b  ": "vol-1.example.com:80/Disk_1/a.b",
    "10.0.0.1:8080/d1": "10.0.0.1:8080/d1",
    "[::1]:80": "[::1]:80",
    "[2001:DB8:0:0::1]:3000/x": "[2001:db8::1]:3000/x",
    "under_score:1": "under_score:1",
}
BAD = ["", "   ", "h", "h:", ":80", "h:0", "h:70000", "h:-1", "h:1x", "h:1/", "h:1//d",
       "h:1/../x", "h:1/a/..", "h:1/./a", "h:1/a b", "h 1:80", "h :80", "h:8 0", "http://h:1",
       "h:1:2", "::1:80", "[::1:80", "[zz]:1", "[fe80::1%eth0]:1", "300.1.1.1:80", "-h:1",
       "h..x:1", "h:1/d?x", "h:1\n/d", None]


@pytest.mark.parametrize(("text", "canonical"), GOOD.items())
def test_parse_volume_accepts_good_forms(text, canonical):
    assert parse_volume(text) == canonical
    assert parse_volume(canonical) == canonical


@pytest.mark.parametrize("text", BAD)
def test_parse_volume_rejects_bad_forms(text):
    with pytest.raises(BadVolume) as err:
        parse_volume(text)
    assert repr(text) in str(err.value)  # the message names the offending text
    with pytest.raises(BadVolume):
        Ring(["ok:1", text])


@FAST
@given(volume_sets(max_size=1), st.sampled_from(["", " ", "\t", "\n "]), st.booleans())
def test_parse_volume_canonicalises_and_keeps_the_domain(vols, pad, other_spelling):
    (v,) = vols
    text = pad + (respell(v) if other_spelling else v) + pad
    assert parse_volume(text) == v
    assert parse_volume(parse_volume(text)) == v
    assert failure_domain(parse_volume(text)) == v.split("/")[0]


@FAST
@given(volume_sets(max_size=1), st.data())
def test_parse_volume_rejects_inner_whitespace(vols, data):
    (v,) = vols
    i = data.draw(st.integers(1, len(v) - 1))
    with pytest.raises(BadVolume):
        parse_volume(v[:i] + data.draw(st.sampled_from([" ", "\t", "\n"])) + v[i:])


def test_duplicates_are_refused_after_canonicalisation():
    with pytest.raises(BadVolume, match="duplicate"):
        Ring(["h:1", "g:2", "h:1"])
    with pytest.raises(BadVolume, match="duplicate"):
        Ring(["H:1/d", " h:01/d"])
    assert len(Ring(["h:1/d1", "h:1/d2"], vnodes=1).volumes) == 2


def test_default_vnodes_is_what_the_ring_uses():
    assert len(Ring(["h:1", "g:1"])._positions) == 2 * DEFAULT_VNODES
