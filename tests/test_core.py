"""Pure decisions and key rules, tested without a server."""

import dataclasses
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mkv import core, keys, signing
from mkv.config import Config
from mkv.core import Cas, Health, PendingAction
from mkv.model import HealthRow, Pending, PendingOp, PendingState, Record, State
from mkv.ring import Ring
from mkv.service.query import BadQuery, ListQuery, parse_query, request_target
from mkv.service.store import BadDigest, parse_content_md5
from mkv.volumes.errors import ShortWrite, VolumeStatus, VolumeTimeout, VolumeUnreachable

VOLS = ["a:1", "b:2", "c:3", "d:4"]


def rec(key="/k", state=State.LIVE, volumes=("a:1", "b:2", "c:3")):
    return Record(key, state, tuple(volumes), 5, "m", 0.0)


# --- keys ---


def test_blob_and_sidecar_paths():
    h = hashlib.sha256("/ключ".encode()).hexdigest()
    assert keys.blob_path("/ключ") == f"/{h[:2]}/{h[2:4]}/{h}"
    assert keys.sidecar_path("/ключ") == f"/{h[:2]}/{h[2:4]}/{h}.key"


@pytest.mark.parametrize("raw,expected", [
    ("/a%20b", "/a b"), ("/%C3%BC", "/ü"), ("/a%2Fb", "/a/b"), ("/a/../b", "/a/../b"),
    ("/q%3Fx%3D1%26y", "/q?x=1&y"),
])
def test_decode_path(raw, expected):
    assert keys.decode_path(raw) == expected


@pytest.mark.parametrize("raw", ["/%FF", "/%C3%28", "/\xff"])
def test_decode_path_refuses_invalid_utf8(raw):
    with pytest.raises(keys.BadKey):
        keys.decode_path(raw)


@pytest.mark.parametrize("key", ["/", "nokey", "/a\x00", "/a\nb", "/\x7f", "/\x85", "/-/health",
                                 "/-/x", "/" + "x" * 1024])
def test_check_key_refuses(key):
    with pytest.raises(keys.BadKey):
        keys.check_key(key, 1024)


def test_check_key_allows_prefix_root_and_limits_bytes_not_chars():
    assert keys.check_key("/", 1024, prefix=True) == "/"
    assert keys.check_key("/" + "é" * 511, 1024) == "/" + "é" * 511
    with pytest.raises(keys.BadKey):
        keys.check_key("/" + "é" * 512, 1024)


@given(st.text(min_size=0, max_size=6), st.text(min_size=0, max_size=6))
def test_next_prefix_bounds_exactly_the_prefixed_strings(prefix, other):
    upper = keys.next_prefix(prefix)
    enc = lambda s: s.encode("utf-8", "surrogatepass")  # noqa: E731
    if any(0xD800 <= ord(c) <= 0xDFFF for c in prefix + other):
        return
    inside = enc(other) >= enc(prefix) and (upper is None or enc(other) < enc(upper))
    assert inside == other.startswith(prefix)


# --- health ---


def test_health_status_stale_is_unknown():
    rows = {"a:1": HealthRow("a:1", True, 100.0, 0, 1, None),
            "b:2": HealthRow("b:2", False, 100.0, 0, None, "x"),
            "c:3": HealthRow("c:3", False, 10.0, 0, None, "old")}
    h = core.health_status(rows, now=101.0, stale_after=5.0)
    assert h == {"a:1": Health.UP, "b:2": Health.DOWN, "c:3": Health.UNKNOWN}
    assert core.usable("c:3", h) and core.usable("zzz:1", h) and not core.usable("b:2", h)


# --- placement ---


def test_place_skips_down_volumes_clockwise():
    ring = Ring(VOLS)
    for i in range(200):
        key = f"/k{i}"
        first = ring.place(key, 3)
        down = {first[0]: Health.DOWN}
        moved = core.place(key, ring, down, 3)
        assert first[0] not in moved and len(set(moved)) == 3
        assert moved == [v for v in ring.order(key) if v != first[0]][:3]


def test_place_needs_r_healthy_domains():
    ring = Ring(VOLS)
    with pytest.raises(core.NotEnoughVolumes):
        core.place("/k", ring, {"a:1": Health.DOWN, "b:2": Health.DOWN}, 3)


def test_balanced():
    ring = Ring(VOLS)
    good = rec(volumes=ring.place("/k", 3))
    assert core.balanced(good, ring, 3)
    assert not core.balanced(rec(volumes=list(reversed(good.volumes))), ring, 3)


# --- reads ---


def test_read_target_redirects_to_first_healthy_replica():
    r = rec()
    t = core.read_target("/k", r, {}, failover=False)
    assert isinstance(t, core.Redirect) and t.volume == "a:1"
    assert t.location == f"http://a:1{keys.blob_path('/k')}"
    t = core.read_target("/k", r, {"a:1": Health.DOWN})
    assert t.volume == "b:2"


def test_read_target_sends_clients_to_a_public_url_with_the_volume_path():
    r = dataclasses.replace(rec(), volumes=("a:1/d1", "b:2"), gen="abc")
    public = {"a:1/d1": "https://vol-a.example.com", "b:2": "http://10.9.9.9:8080"}
    t = core.read_target("/k", r, {}, public=public, failover=False)
    assert t.path == "/d1" + keys.blob_path("/k", "abc")
    assert t.location == "https://vol-a.example.com" + t.path and t.volume == "a:1/d1"
    t = core.read_target("/k", r, {"a:1/d1": Health.DOWN}, public=public)
    assert t.location == "http://10.9.9.9:8080" + keys.blob_path("/k", "abc")
    # no public URL: the address mkv uses
    assert core.read_target("/k", r, {}, failover=False).location == (
        "http://a:1/d1" + keys.blob_path("/k", "abc"))


def test_read_target_names_the_other_replicas_for_failover():
    """docs/design.md, "Read failover": every other usable replica, in the order the
    rotation would reach them, then those of unknown health; never a down one."""
    r = rec(volumes=("a:1", "b:2/d2", "c:3", "d:4"))
    blob = keys.blob_path("/k")
    up = {v: Health.UP for v in r.volumes}
    t = core.read_target("/k", r, up, spread=1)
    assert t.volume == "b:2/d2"
    assert t.hops == (("c:3", blob), ("d:4", blob), ("a:1", blob))
    assert t.location == f"http://b:2/d2{blob}?next=c:3,d:4,a:1"
    mixed = {"a:1": Health.UP, "b:2/d2": Health.UNKNOWN, "c:3": Health.DOWN, "d:4": Health.UP}
    t = core.read_target("/k", r, mixed, spread=1)
    assert t.volume == "d:4"
    assert t.hops == (("a:1", blob), ("b:2/d2", "/d2" + blob))
    # one replica: nothing to fail over to, the Location is as short as before
    one = core.read_target("/k", rec(volumes=("a:1",)), {})
    assert one.hops == () and one.location == f"http://a:1{blob}"


def test_failover_hops_keep_the_scheme_and_name_public_hosts():
    """The volume sends the client on scheme-relative, so a hop is only a replica clients
    reach with the same scheme; a public URL's host stands for its volume."""
    r = rec(volumes=("a:1", "b:2/d2", "c:3"))
    blob = keys.blob_path("/k")
    public = {"a:1": "https://a.example.com", "b:2/d2": "https://b.example.com:8443"}
    t = core.read_target("/k", r, {}, public=public)
    assert t.hops == (("b.example.com:8443/d2", "/d2" + blob),)  # c:3 is http
    assert t.location == f"https://a.example.com{blob}?next=b.example.com:8443/d2"


def test_a_signed_read_target_signs_every_hop():
    r = rec(volumes=("a:1", "b:2/d2"))
    blob = keys.blob_path("/k")
    t = core.read_target("/k", r, {}, secret="s3cret", now=1000.5, ttl=60)
    tail = f"b:2/d2~{signing.signature('/d2' + blob, 1060, 's3cret')}"
    first = signing.signature(f"{blob}?{tail}", 1060, "s3cret")
    assert t.location == f"http://a:1{blob}?md5={first}&expires=1060&next={tail}"


def test_read_target_spreads_over_up_replicas():
    r = rec()
    up = {v: Health.UP for v in r.volumes}
    assert {core.read_target("/k", r, up, spread=i).volume for i in range(6)} == set(r.volumes)


def test_read_target_prefers_known_up_over_unknown():
    r = rec()
    t = core.read_target("/k", r, {"a:1": Health.UNKNOWN, "b:2": Health.UP}, spread=0)
    assert t.volume == "b:2"


def test_read_target_unavailable_and_missing():
    r = rec()
    assert isinstance(core.read_target("/k", r, {v: Health.DOWN for v in r.volumes}),
                      core.Unavailable)
    assert isinstance(core.read_target("/k", None, {}), core.NotFound)
    for state in (State.UNLINKED, State.DELETING):
        assert isinstance(core.read_target("/k", rec(state=state), {}), core.NotFound)


def test_read_target_fallback_only_for_unknown_keys():
    t = core.read_target("/a b", None, {}, fallback="old:80")
    assert t == core.Redirect("http://old:80/a%20b", None)
    assert isinstance(core.read_target("/k", rec(state=State.UNLINKED), {}, fallback="old:80"),
                      core.NotFound)


# --- writes ---


def test_put_outcome_needs_every_replica():
    assert core.put_outcome([None, None, None]) is core.PutOutcome.STORED
    assert core.put_outcome([None, VolumeUnreachable("a:1", "x"), None]) is core.PutOutcome.FAILED
    assert core.put_outcome([]) is core.PutOutcome.FAILED


def test_verdicts():
    V = core.Verdict
    assert core.put_verdict(None) is V.PROCEED
    assert core.put_verdict(rec()) is V.EXISTS
    assert core.put_verdict(rec(state=State.UNLINKED)) is V.PROCEED
    assert core.delete_verdict(None, False) is V.MISSING
    assert core.delete_verdict(rec(state=State.DELETING), False) is V.MISSING
    assert core.delete_verdict(rec(), True) is V.PROTECTED
    assert core.delete_verdict(rec(state=State.UNLINKED), True) is V.PROCEED
    assert core.delete_verdict(rec(), False) is V.PROCEED
    assert core.unlink_verdict(rec()) is V.PROCEED
    assert core.unlink_verdict(rec(state=State.UNLINKED)) is V.MISSING


def test_a_put_over_an_unlinked_or_deleting_record_leaves_only_its_other_copies():
    new = rec(volumes=("b:2", "c:3", "d:4"))
    for state in (State.UNLINKED, State.DELETING):
        assert core.replaced_copies(rec(state=state, volumes=("a:1", "b:2", "c:3")), new) == ["a:1"]
    assert core.replaced_copies(None, new) == []
    assert core.replaced_copies(rec(), new) == []  # a live key is never replaced


# --- queries ---


@pytest.mark.parametrize("q,expected", [
    ("", None),
    ("list", ListQuery(State.LIVE, "", None)),
    ("list=", ListQuery(State.LIVE, "", None)),
    ("unlinked&limit=5", ListQuery(State.UNLINKED, "", 5)),
    ("list&start=%2Fa%20b&limit=10", ListQuery(State.LIVE, "/a b", 10)),
])
def test_parse_query(q, expected):
    assert parse_query(q) == expected


@pytest.mark.parametrize("q", ["list&limit=abc", "list&limit=0", "list&limit=-1", "list&limit=",
                               "foo", "list&unlinked", "list&list", "list&bogus=1",
                               "list&start=%FF", "limit=3"])
def test_parse_query_refuses(q):
    with pytest.raises(BadQuery):
        parse_query(q)


# --- Content-MD5 ---


def test_content_md5_forms():
    import base64
    d = hashlib.md5(b"hi").digest()
    assert parse_content_md5(base64.b64encode(d).decode()) == d.hex()
    assert parse_content_md5(d.hex().upper()) == d.hex()
    assert parse_content_md5(None) is None
    for bad in ("zzz", base64.b64encode(b"short").decode()):
        with pytest.raises(BadDigest):
            parse_content_md5(bad)


# --- decisions moved out of the shells ------------------------------------------------------


def test_stale_after_is_a_few_probe_rounds():
    assert core.stale_after(1.0, 1.0) == 4.0
    assert core.stale_after(1.0, 5.0) == 16.0  # slow probes stretch it


def test_blamed_skips_torn_uploads_and_the_requests_own_4xx():
    refused = VolumeUnreachable("a:1", "refused")
    timed_out = VolumeTimeout("b:2", "slow")
    errors = [None, refused, ShortWrite("c:3", "short"), VolumeStatus("c:3", 405, "PUT", "/x"),
              VolumeStatus("b:2", 507, "PUT", "/x"), timed_out, ValueError("not a volume's")]
    assert [e.volume for e in core.blamed(errors)] == ["a:1", "b:2", "b:2"]


def test_reachable_split_and_copies_left():
    r = rec(state=State.DELETING)
    health = {"a:1": Health.UP, "b:2": Health.DOWN}  # c:3 unknown: tried
    now, later = core.reachable_split(r, health)
    assert (now, later) == (["a:1", "c:3"], ["b:2"])
    assert core.copies_left(r, later, ["c:3"]) == ("b:2", "c:3")
    assert core.copies_left(r, [], []) == ()


def test_can_write_needs_the_writer_and_r_domains():
    assert core.can_write(["a:1", "b:2", "c:3"], True, 3)
    assert not core.can_write(["a:1", "b:2", "c:3"], False, 3)
    assert not core.can_write(["a:1", "a:1/d2", "b:2"], True, 3)  # two disks, one host


def test_put_cas():
    new = rec(volumes=("a:1",))
    live, unlinked = rec(), rec(state=State.UNLINKED)
    assert core.put_cas(None, new, expect=None, checked=False, guard_new=True) is Cas.WRITE
    assert core.put_cas(unlinked, new, expect=None, checked=False, guard_new=True) is Cas.WRITE
    assert core.put_cas(live, new, expect=None, checked=False, guard_new=True) is Cas.CONFLICT
    assert core.put_cas(new, new, expect=None, checked=False, guard_new=True) is Cas.DONE
    assert core.put_cas(live, new, expect=live, checked=True, guard_new=False) is Cas.WRITE
    assert core.put_cas(unlinked, new, expect=live, checked=True, guard_new=False) is Cas.CONFLICT
    assert core.put_cas(new, new, expect=live, checked=True, guard_new=False) is Cas.DONE
    assert core.put_cas(live, new, expect=None, checked=False, guard_new=False) is Cas.WRITE


def test_state_and_delete_cas():
    live = rec()
    changed = dataclasses.replace(live, state=State.DELETING, mtime=live.mtime + 5)
    assert core.state_cas(live, State.DELETING, expect=live, checked=True) is Cas.WRITE
    assert core.state_cas(changed, State.DELETING, expect=live, checked=True) is Cas.DONE
    other = dataclasses.replace(changed, md5="other")
    assert core.state_cas(other, State.DELETING, expect=live, checked=True) is Cas.CONFLICT
    assert core.state_cas(None, State.DELETING, expect=live, checked=True) is Cas.CONFLICT
    assert core.state_cas(other, State.DELETING, expect=None, checked=False) is Cas.WRITE
    assert core.delete_cas(None, expect=live, checked=True) is Cas.WRITE  # gone already
    assert core.delete_cas(live, expect=live, checked=True) is Cas.WRITE
    assert core.delete_cas(other, expect=live, checked=True) is Cas.CONFLICT


def test_move_in_place_needs_the_ring_volumes_in_the_index():
    r = rec()
    move = core.rebalance_plan(r, r.volumes, set(r.volumes), set(r.volumes))
    assert move.in_place(r)
    reordered = core.rebalance_plan(r, tuple(reversed(r.volumes)), set(r.volumes), set(r.volumes))
    assert reordered.noop and not reordered.in_place(r)


def test_config_ring_uses_the_configured_vnodes():
    cfg = Config(volumes=("a:1", "b:2", "c:3"), vnodes=7)
    assert cfg.ring().place("/k", 2) == Ring(["a:1", "b:2", "c:3"], vnodes=7).place("/k", 2)
    assert Config(volumes=("a:1", "b:2")).ring().place("/k", 2) == Ring(["a:1", "b:2"]).place("/k", 2)


# --- the request target ---------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("/public/x://y/victim", ("/public/x://y/victim", "")),
    ("/a://b", ("/a://b", "")),
    ("/a%3A%2F%2Fb?list", ("/a://b", "list")),
    ("http://host:3000/k?list&limit=2", ("/k", "list&limit=2")),
    ("HTTPS://host/a/b", ("/a/b", "")),
    ("http://host?list", ("/", "list")),
    ("http://host", ("/", "")),
])
def test_request_target(raw, expected):
    assert request_target({"RAW_URI": raw, "QUERY_STRING": ""}) == expected


@pytest.mark.parametrize("raw", ["*", "", "k", "ftp://host/k", "x://y/z"])
def test_request_target_refuses_what_is_not_a_path(raw):
    with pytest.raises(keys.BadKey):
        request_target({"RAW_URI": raw})


def test_request_target_without_a_raw_target_decodes_once():
    # PATH_INFO is the path already percent-decoded, its bytes as latin-1 text
    env = {"PATH_INFO": "/pct%41/é".encode().decode("latin-1"), "QUERY_STRING": "list"}
    assert request_target(env) == ("/pct%41/é", "list")
    with pytest.raises(keys.BadKey):
        request_target({"PATH_INFO": "/\xff"})


# --- pending operations ---------------------------------------------------------------------


def pend(volume, op=PendingOp.REMOVE, state=PendingState.DUE):
    return Pending("/k", volume, op, state, 1.0)


def test_a_copy_the_record_names_is_never_removed_by_a_pending_operation():
    live = rec()  # a:1, b:2, c:3
    assert core.pending_action(pend("a:1"), live) is PendingAction.DROP
    assert core.pending_action(pend("d:4"), live) is PendingAction.REMOVE
    assert core.pending_action(pend("a:1"), None) is PendingAction.REMOVE
    deleting = rec(state=State.DELETING)  # the delete machinery owns those copies
    assert core.pending_action(pend("a:1"), deleting) is PendingAction.DROP


def test_a_sidecar_is_marked_only_while_the_key_is_unlinked_there():
    mark = PendingOp.MARK_UNLINKED
    assert core.pending_action(pend("a:1", mark), rec(state=State.UNLINKED)) is PendingAction.MARK
    assert core.pending_action(pend("d:4", mark), rec(state=State.UNLINKED)) is PendingAction.DROP
    assert core.pending_action(pend("a:1", mark), rec()) is PendingAction.DROP  # live again
    assert core.pending_action(pend("a:1", mark), None) is PendingAction.DROP


def test_a_put_records_only_copies_still_its_own():
    own = [pend("a:1", state=PendingState.INTENT), pend("b:2", state=PendingState.ORPHANED)]
    assert core.intents_cover(own, rec(volumes=("a:1", "b:2")))
    assert not core.intents_cover(own, rec(volumes=("a:1", "c:3")))
    assert not core.intents_cover([pend("a:1")], rec(volumes=("a:1",)))  # due: maybe removed
    assert not core.intents_cover([pend("a:1", PendingOp.MARK_UNLINKED, PendingState.INTENT)],
                                  rec(volumes=("a:1",)))
    other_write = dataclasses.replace(pend("a:1", state=PendingState.INTENT), gen="g2")
    assert not core.intents_cover([other_write], rec(volumes=("a:1",)))


def test_pending_operations_tell_generations_apart():
    newer = dataclasses.replace(rec(), gen="g2")  # the same volumes, another write's files
    assert core.pending_action(pend("a:1"), newer) is PendingAction.REMOVE
    assert core.pending_action(dataclasses.replace(pend("a:1"), gen="g2"), newer) is PendingAction.DROP
    old = dataclasses.replace(rec(state=State.UNLINKED), gen="g1")
    assert core.replaced_copies(old, newer) == ["a:1", "b:2", "c:3"]  # every old file goes


def test_orphan_grace_outlasts_a_stalled_volume_and_client():
    assert core.orphan_grace(10.0, 30.0) == 400.0


@pytest.mark.parametrize("key", ["/../x", "/a/..", "/./x", "/a/./b", "/..\\x", "/a\\..\\b", "/a/.."])
def test_a_key_to_write_has_no_dot_segment(key: str) -> None:
    assert keys.check_key(key, 1024) == key  # still a key to read or delete
    with pytest.raises(keys.BadKey, match="segment"):
        keys.check_new_key(key, 1024)


@pytest.mark.parametrize("key", ["/.hidden", "/a..b", "/...", "/a/.x/", "/..x", "/x.", "/a/b"])
def test_dots_that_are_not_segments_may_be_written(key: str) -> None:
    assert keys.check_new_key(key, 1024) == key


def test_can_read_needs_the_index_and_one_volume_not_down():
    assert core.can_read(True, ["a:1"])
    assert not core.can_read(True, [])
    assert not core.can_read(False, ["a:1", "b:2", "c:3"])
