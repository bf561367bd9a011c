"""mkv-rebuild: the pure merge/classification core, the pipelining client, and the CLI end to
end against real nginx volumes and a real `mkv serve`.

End-to-end tests run `python -m mkv.tools.rebuild` as a subprocess, the way an operator does,
and check the exit code, the summary on stderr and the index it wrote (opened with apsw).
Data is either PUT through the service (the equivalence test) or planted straight onto the
volumes' disks (inconsistencies, a dead volume), which is faster and lets a test write what
the service never would.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import apsw
import pytest
import requests

from mkv import keys
from mkv.config import Config
from mkv.index import schema
from mkv.keys import key_hash, sidecar_body
from mkv.model import PendingOp, PendingState, Record, State
from mkv.ring import Ring
from mkv.tools import rebuild, scan
from mkv.tools.scan import Candidate, KeyResolver, Kind, Leaf
from mkv.volumes.errors import VolumeUnreachable
from mkv.volumes.pool import Retry
from mkv.writer.server import serve_in_thread
from tests.cluster import NginxVolume, free_port
from tests.helpers import REPO, rows, run_cli
from tests.service import MkvService

TIMEOUT = 30


# --- helpers ---------------------------------------------------------------------------------


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def leaf_dir(vol: NginxVolume, key: str) -> Path:
    h = key_hash(key)
    d = vol.root / h[0:2] / h[2:4]
    d.mkdir(parents=True, exist_ok=True)
    return d


def plant(vol: NginxVolume, key: str, data: bytes, *, blob: bytes | None = None,
          sidecar: bytes | None = None, with_blob: bool = True, with_sidecar: bool = True,
          gen: str = "") -> None:
    """Write a replica onto a volume's disk as the service would (or, given overrides, not):
    named <h> without a generation (as before generations), else <h>.<gen>."""
    d = leaf_dir(vol, key)
    name = key_hash(key) + (f".{gen}" if gen else "")
    if with_blob:
        (d / name).write_bytes(data if blob is None else blob)
    if with_sidecar:
        (d / f"{name}.key").write_bytes(
            sidecar_body(key, len(data), md5(data)) if sidecar is None else sidecar)


def url_of(svc: MkvService, key: str) -> str:
    return svc.url + quote(key, safe="/")


def make_values(n: int, seed: int) -> dict[str, bytes]:
    """n keys: plain, unicode and '/'-rich; 1 B..4 KiB values plus a few of about 1 MiB."""
    rnd = random.Random(seed)
    shapes = [
        lambda i: f"/plain/{i}",
        lambda i: f"/ünïcødé/日本語/ключ-{i}",
        lambda i: f"/a/b//c/{i}/d/e/f/",
        lambda i: f"/emoji/🙂/{i}?&%=#+ x",
        lambda i: f"/deep/{'/'.join(str(i))}/leaf",
    ]
    out = {}
    for i in range(n):
        size = rnd.choice((1, 2, 17, 512, 1000, 4096)) if i % 7 else rnd.randint(1, 4096)
        if i % 400 == 399:
            size = (1 << 20) + rnd.randint(0, 4096)
        out[shapes[i % len(shapes)](i)] = rnd.randbytes(size)
    return out


def put_all(svc: MkvService, values: dict[str, bytes]) -> None:
    local = threading.local()

    def put(item: tuple[str, bytes]) -> None:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        r = s.put(url_of(svc, item[0]), data=item[1], timeout=TIMEOUT)
        assert r.status_code == 201, (item[0], r.status_code, r.text)

    with ThreadPoolExecutor(16) as ex:
        list(ex.map(put, values.items()))


# --- the pure core -----------------------------------------------------------------------------


def entry(name: str, size: int = 1, kind: str = "file") -> dict:
    return {"name": name, "type": kind, "size": size, "mtime": "Sun, 29 Nov 2026 10:43:13 GMT"}


def test_top_dirs_keep_only_fanout_directories() -> None:
    entries = [entry("ab", kind="directory"), entry("zz", kind="directory"),
               entry("0f", kind="directory"), entry("cd"), entry("ABC", kind="directory")]
    assert scan.top_dirs(entries) == ["0f", "ab"]


def test_parse_leaf_sorts_blobs_sidecars_and_strays() -> None:
    h1, h2 = "abcd" + "1" * 60, "abcd" + "2" * 60
    leaf = scan.parse_leaf("ab/cd", [
        entry(h1, 10), entry(h1 + ".key", 70), entry(h2 + ".key"),
        entry("README"), entry("ffff" + "0" * 60), entry("abcd" + "Z" * 60),
        entry(h2[:-1] + "00", kind="directory")])
    assert leaf.blobs == {h1: (10, "Sun, 29 Nov 2026 10:43:13 GMT")}
    assert leaf.sidecars == {h1: 70, h2: 1}
    assert sorted(leaf.strays) == sorted(["README", "ffff" + "0" * 60, "abcd" + "Z" * 60,
                                          h2[:-1] + "00"])


def test_merge_dir_counts_only_replicas_with_blob_and_sidecar() -> None:
    h1, h2, h3 = ("abcd" + c * 60 for c in "123")
    leaves = {
        "v1": Leaf({h1: (5, "t"), h2: (3, "t")}, {h1: 60}, []),
        "v2": Leaf({h1: (5, "t")}, {h1: 61, h3: 60}, ["junk"]),
    }
    cands, problems = scan.merge_dir("ab/cd", leaves)
    assert [(c.hash, c.replicas) for c in cands] == [(h1, [("v1", 5, "t", 60), ("v2", 5, "t", 61)])]
    got = {(p.kind, p.volume, p.path) for p in problems}
    assert got == {
        (Kind.BLOB_WITHOUT_SIDECAR, "v1", f"/ab/cd/{h2}"),
        (Kind.SIDECAR_WITHOUT_BLOB, "v2", f"/ab/cd/{h3}.key"),
        (Kind.STRAY, "v2", "/ab/cd/junk"),
    }


GEN = "0123456789abcdef012"  # 19 digits, as new writes have


def test_parse_leaf_takes_both_name_forms_and_pairs_nothing_yet() -> None:
    h = "abcd" + "1" * 60
    g32 = "f" * 32
    leaf = scan.parse_leaf("ab/cd", [
        entry(h, 10), entry(h + ".key", 70),  # before generations
        entry(f"{h}.{GEN}", 11), entry(f"{h}.{GEN}.key", 71),  # a generation
        entry(f"{h}.{g32}", 12), entry(f"{h}.0.key", 72)])  # the longest and the shortest
    assert leaf.blobs == {h: (10, "Sun, 29 Nov 2026 10:43:13 GMT"),
                          f"{h}.{GEN}": (11, "Sun, 29 Nov 2026 10:43:13 GMT"),
                          f"{h}.{g32}": (12, "Sun, 29 Nov 2026 10:43:13 GMT")}
    assert leaf.sidecars == {h: 70, f"{h}.{GEN}": 71, f"{h}.0": 72}
    assert leaf.strays == []


@pytest.mark.parametrize("name", [
    "abcd" + "1" * 60 + ".ABC",  # uppercase
    "abcd" + "1" * 60 + ".ABC.key",
    "abcd" + "1" * 60 + ".12g4",  # not hex
    "abcd" + "1" * 60 + ".12g4.key",
    "abcd" + "1" * 60 + "." + "a" * 33,  # longer than 32 digits
    "abcd" + "1" * 60 + "." + "a" * 33 + ".key",
    "abcd" + "1" * 60 + ".",  # empty
    "abcd" + "1" * 60 + "..key",
    "abcd" + "1" * 60 + ".12.34",  # two generations
    "abcd" + "1" * 60 + ".key.key",
    "abcd" + "1" * 60 + ".12.key.tmp",
    "abcd" + "1" * 60 + "-12",
    "abcd" + "1" * 59 + ".12",  # a short hash
    "ffff" + "1" * 60 + ".12",  # another directory's hash
    "ffff" + "1" * 60 + ".12.key",
    "ABCD" + "1" * 60 + ".12",
    " abcd" + "1" * 60 + ".12",
])
def test_parse_leaf_bad_names_with_a_generation_are_stray(name: str) -> None:
    leaf = scan.parse_leaf("ab/cd", [entry(name)])
    assert (leaf.blobs, leaf.sidecars, leaf.strays) == ({}, {}, [name])


def test_parse_leaf_a_directory_named_like_a_write_is_stray() -> None:
    name = "abcd" + "1" * 60 + "." + GEN
    leaf = scan.parse_leaf("ab/cd", [entry(name, kind="directory")])
    assert (leaf.blobs, leaf.sidecars, leaf.strays) == ({}, {}, [name])


def test_merge_dir_pairs_blob_and_sidecar_by_file_id() -> None:
    h = "abcd" + "1" * 60
    old, new, other = h, f"{h}.{GEN}", f"{h}.{'e' * 19}"
    leaves = {
        "v1": Leaf({old: (5, "t"), new: (6, "t")}, {old: 60, new: 61}, []),
        "v2": Leaf({new: (6, "t")}, {new: 61}, []),
        # a blob of one generation and a sidecar of another: two halves, no replica
        "v3": Leaf({new: (6, "t")}, {other: 61}, []),
    }
    cands, problems = scan.merge_dir("ab/cd", leaves)
    got = {(c.hash, c.gen): c.replicas for c in cands}
    assert got == {(h, ""): [("v1", 5, "t", 60)],
                   (h, GEN): [("v1", 6, "t", 61), ("v2", 6, "t", 61)]}
    by_gen = {c.gen: c for c in cands}
    assert by_gen[""].blob_path == f"/ab/cd/{h}" and by_gen[""].sidecar_path == f"/ab/cd/{h}.key"
    assert by_gen[GEN].blob_path == f"/ab/cd/{h}.{GEN}"
    assert by_gen[GEN].sidecar_path == f"/ab/cd/{h}.{GEN}.key"
    assert {(p.kind, p.volume, p.path) for p in problems} == {
        (Kind.BLOB_WITHOUT_SIDECAR, "v3", f"/ab/cd/{new}"),
        (Kind.SIDECAR_WITHOUT_BLOB, "v3", f"/ab/cd/{other}.key"),
    }


def test_candidate_paths_are_the_keys_paths() -> None:
    key = "/ünï/k"
    h = key_hash(key)
    for gen in ("", GEN):
        c = Candidate(h, f"{h[0:2]}/{h[2:4]}", [], gen)
        assert c.blob_path == keys.blob_path(key, gen)
        assert c.sidecar_path == keys.sidecar_path(key, gen)


@pytest.mark.parametrize("body, kind", [
    (b"{not json", Kind.CORRUPT_SIDECAR),
    (b"\xff\xfe", Kind.CORRUPT_SIDECAR),
    (b"[1, 2]", Kind.CORRUPT_SIDECAR),
    (b'{"key": "/k", "size": -1, "md5": ""}', Kind.CORRUPT_SIDECAR),
    (b'{"key": "/k", "size": true, "md5": ""}', Kind.CORRUPT_SIDECAR),
    (b'{"key": "/k", "size": 1}', Kind.CORRUPT_SIDECAR),
    (b'{"key": "/other", "size": 1, "md5": ""}', Kind.WRONG_HASH),
])
def test_decode_sidecar_rejects(body: bytes, kind: Kind) -> None:
    out = scan.decode_sidecar(key_hash("/k"), body)
    assert isinstance(out, tuple) and out[0] is kind


def test_decode_sidecar_accepts_what_the_service_writes() -> None:
    key = "/ünï/cødé 🙂"
    out = scan.decode_sidecar(key_hash(key), sidecar_body(key, 12, "a" * 32))
    assert out == scan.Sidecar(key, 12, "a" * 32)


def test_parse_mtime() -> None:
    assert scan.parse_mtime("Thu, 01 Jan 1970 00:01:40 GMT") == 100.0
    assert scan.parse_mtime("Sun, 29 Nov 2026 10:43:13 GMT") == 1795948993.0
    assert scan.parse_mtime("garbage") == 0.0


def test_ring_order_is_the_ring_walk_filtered() -> None:
    ring = Ring(["a:1", "b:1", "c:1", "d:1", "d:2/x"])
    for i in range(300):
        key = f"/k{i}"
        order = ring.order(key)
        held = random.Random(i).sample(order, random.Random(-i).randint(1, 4))
        assert scan.ring_order(ring, key, sorted(held)) == tuple(v for v in order if v in held)


def _resolver(key: str, replicas: list[tuple], sidecar_len: int | None = None) -> KeyResolver:
    """replicas: (volume, blob size[, sidecar file size]); the sidecar size defaults to the
    length of the usual test sidecar, sidecar_body(key, 5, "m")."""
    h = key_hash(key)
    default = len(sidecar_body(key, 5, "m")) if sidecar_len is None else sidecar_len
    return KeyResolver(Candidate(h, f"{h[0:2]}/{h[2:4]}", [
        (r[0], r[1], "Thu, 01 Jan 1970 00:01:40 GMT", r[2] if len(r) > 2 else default)
        for r in replicas]))


def _drive(r: KeyResolver, bodies: dict[str, bytes | tuple]) -> list[str]:
    reads = []
    while (v := r.next_read()) is not None:
        reads.append(v)
        r.feed(v, bodies[v])
    return reads


RING = Ring(["a:1", "b:1", "c:1"])


def test_resolver_reads_the_generations_sidecar_and_records_its_gen() -> None:
    key = "/k"
    h = key_hash(key)
    good = sidecar_body(key, 5, "m")
    r = KeyResolver(Candidate(h, f"{h[0:2]}/{h[2:4]}", [
        (v, 5, "Thu, 01 Jan 1970 00:01:40 GMT", len(good)) for v in ("a:1", "b:1")], GEN))
    assert r.cand.sidecar_path == keys.sidecar_path(key, GEN)
    first = r.next_read()
    other = ({"a:1", "b:1"} - {first}).pop()
    assert _drive(r, {first: b"{corrupt", other: good}) == [first, other]
    assert r.record(RING) == Record(key, State.LIVE, (other,), 5, "m", 100.0, GEN)
    assert [(p.kind, p.volume, p.path) for p in r.problems] == [
        (Kind.CORRUPT_SIDECAR, first, keys.sidecar_path(key, GEN))]


def test_resolver_reads_one_sidecar_when_replicas_agree() -> None:
    key = "/k"
    good = sidecar_body(key, 5, "m")
    r = _resolver(key, [("a:1", 5), ("b:1", 5), ("c:1", 5)])
    assert len(_drive(r, {v: good for v in ("a:1", "b:1", "c:1")})) == 1
    rec = r.record(RING)
    assert rec == Record(key, State.LIVE, tuple(RING.order(key)), 5, "m", 100.0)
    assert r.problems == []


def test_resolver_leaves_out_the_replica_whose_size_disagrees_with_the_majority() -> None:
    key = "/k"
    good = sidecar_body(key, 5, "m")
    for bad in ("a:1", "b:1", "c:1"):  # whichever replica is read first
        r = _resolver(key, [(v, 4 if v == bad else 5) for v in ("a:1", "b:1", "c:1")])
        assert len(_drive(r, {v: good for v in ("a:1", "b:1", "c:1")})) == 1
        rec = r.record(RING)
        assert rec is not None and set(rec.volumes) == {"a:1", "b:1", "c:1"} - {bad}
        assert [(p.kind, p.volume) for p in r.problems] == [(Kind.SIZE_MISMATCH, bad)]


def test_resolver_falls_back_to_the_next_replica_when_a_sidecar_is_bad() -> None:
    key = "/k"
    good = sidecar_body(key, 5, "m")
    r = _resolver(key, [("a:1", 5), ("b:1", 5)])
    first = r.next_read()
    other = ({"a:1", "b:1"} - {first}).pop()
    assert _drive(r, {first: b"{corrupt", other: good}) == [first, other]
    rec = r.record(RING)
    assert rec is not None and rec.volumes == (other,)
    assert [(p.kind, p.volume) for p in r.problems] == [(Kind.CORRUPT_SIDECAR, first)]


def test_resolver_checks_replicas_whose_sidecar_length_differs() -> None:
    key = "/k"
    good = sidecar_body(key, 5, "m")
    other = sidecar_body(key, 5, "another md5")
    for bad in ("a:1", "c:1"):
        r = _resolver(key, [("a:1", 5, 9 if bad == "a:1" else len(good)), ("b:1", 5),
                            ("c:1", 5, len(other) if bad == "c:1" else len(good))])
        reads = _drive(r, {"a:1": b"\x00garbage" if bad == "a:1" else good, "b:1": good,
                           "c:1": other if bad == "c:1" else good})
        assert len(reads) == 2 and bad in reads  # the deciding read, then the odd one out
        rec = r.record(RING)
        assert rec is not None and set(rec.volumes) == {"a:1", "b:1", "c:1"} - {bad}
        kinds = [(p.kind, p.volume) for p in r.problems]
        assert kinds == [(Kind.CORRUPT_SIDECAR if bad == "a:1" else Kind.CONFLICT, bad)]


def test_resolver_imports_nothing_when_no_sidecar_is_good() -> None:
    key = "/k"
    r = _resolver(key, [("a:1", 5), ("b:1", 5)])
    _drive(r, {"a:1": sidecar_body("/other", 5, "m"), "b:1": (Kind.UNREADABLE, "answered 404")})
    assert r.record(RING) is None
    assert sorted(p.kind.name for p in r.problems) == ["UNREADABLE", "WRONG_HASH"]


def test_resolver_all_sizes_wrong_imports_nothing() -> None:
    key = "/k"
    r = _resolver(key, [("a:1", 4)])
    _drive(r, {"a:1": sidecar_body(key, 5, "m")})
    assert r.record(RING) is None
    assert [p.kind for p in r.problems] == [Kind.SIZE_MISMATCH]


def _rec(key: str, gen: str, volumes: tuple[str, ...] = ("a:1", "b:1"), size: int = 5,
         state: State = State.LIVE) -> Record:
    return Record(key, state, volumes, size, f"md5 of {gen or 'legacy'}", 100.0, gen)


def test_newest_per_key_keeps_the_newest_generation_and_reports_the_others() -> None:
    legacy, older, newest = _rec("/k", ""), _rec("/k", "f" * 18, ("c:1",)), _rec("/k", "1" + "0" * 18)
    alone = _rec("/alone", GEN)
    for order in ([legacy, older, newest, alone], [newest, alone, older, legacy],
                  [alone, older, legacy, newest]):
        kept, superseded = scan.newest_per_key(order)
        assert sorted(kept, key=lambda r: r.key) == [alone, newest]
        assert {(p.kind, p.volume, p.path) for p in superseded} == {
            (Kind.SUPERSEDED, "a:1", keys.blob_path("/k")),
            (Kind.SUPERSEDED, "b:1", keys.blob_path("/k")),
            (Kind.SUPERSEDED, "c:1", keys.blob_path("/k", "f" * 18)),
        }
        assert len(superseded) == 3  # one per replica of each older generation
        detail = next(p.detail for p in superseded if p.volume == "c:1")
        assert "f" * 18 in detail and f"keeps gen {newest.gen}" in detail and "'/k'" in detail


def test_newest_per_key_orders_generations_by_gen_order_not_as_strings() -> None:
    short, long = _rec("/k", "f"), _rec("/k", "10")  # "f" > "10" as strings; 15 < 16
    kept, superseded = scan.newest_per_key([long, short])
    assert kept == [long] and {p.path for p in superseded} == {keys.blob_path("/k", "f")}


def test_newest_per_key_state_does_not_matter_only_the_generation() -> None:
    unlinked = _rec("/k", GEN, state=State.UNLINKED)
    kept, superseded = scan.newest_per_key([unlinked, _rec("/k", "")])
    assert kept == [unlinked] and [p.kind for p in superseded] == [Kind.SUPERSEDED] * 2


def test_newest_per_key_with_one_generation_per_key_changes_nothing() -> None:
    records = [_rec(f"/k{i}", GEN if i % 2 else "") for i in range(10)]
    assert scan.newest_per_key(records) == (records, [])
    assert scan.newest_per_key([]) == ([], [])


def test_an_older_generation_is_kept_when_the_newer_one_made_no_record() -> None:
    """All of the newer write's replicas were bad (reported by its resolver): the older
    generation, the newest that produced a record, is the key's record."""
    key = "/k"
    h = key_hash(key)
    good = sidecar_body(key, 5, "m")

    def resolver(gen: str) -> KeyResolver:
        return KeyResolver(Candidate(h, f"{h[0:2]}/{h[2:4]}", [
            ("a:1", 5, "Thu, 01 Jan 1970 00:01:40 GMT", len(good))], gen))

    new, old = resolver(GEN), resolver("")
    _drive(new, {"a:1": b"{corrupt"})
    _drive(old, {"a:1": good})
    records = [rec for r in (new, old) if (rec := r.record(RING)) is not None]
    kept, superseded = scan.newest_per_key(records)
    assert [(r.key, r.gen) for r in kept] == [(key, "")] and superseded == []
    assert [(p.kind, p.path) for p in new.problems] == [
        (Kind.CORRUPT_SIDECAR, keys.sidecar_path(key, GEN))]


def test_single_copy_is_its_own_kind_apart_from_under_replicated() -> None:
    records = [_rec("/one", "", ("a:1",)), _rec("/two", "", ("a:1", "b:1")),
               _rec("/three", "", ("a:1", "b:1", "c:1"))]
    got = [(p.kind, p.volume, p.path, p.detail) for p in scan.replication_problems(records, 3)]
    assert got == [(Kind.SINGLE_COPY, "a:1", "/one", "1 of 3"),
                   (Kind.UNDER_REPLICATED, "a:1,b:1", "/two", "2 of 3")]
    got = [(p.kind, p.path) for p in scan.replication_problems(records, 2)]
    assert got == [(Kind.SINGLE_COPY, "/one")]
    assert scan.replication_problems(records, 1) == []  # one copy is all that was asked for
    report = scan.Report()
    report.add(scan.replication_problems(records, 3))
    text = "\n".join(report.lines())
    assert "restored from a single copy" in text and "a:1 /one: 1 of 3" in text
    assert "key has fewer replicas than --replicas: 1" in text


def test_single_copy_detail_names_the_unreachable_volumes_of_its_placement() -> None:
    key = "/one"
    home = RING.place(key, 3)
    held, dead = home[0], home[1]
    [p] = scan.replication_problems([_rec(key, "", (held,))], 3, RING, {dead, "x:9"})
    assert p.kind is Kind.SINGLE_COPY
    assert p.detail == f"1 of 3, not read from {dead} (unreachable)"
    [p] = scan.replication_problems([_rec(key, "", (held,))], 3, RING, {"x:9"})
    assert p.detail == "1 of 3"


def test_report_counts_and_samples() -> None:
    report = scan.Report(keep=2)
    report.add(scan.Problem(Kind.STRAY, "v", f"/p{i}") for i in range(5))
    assert report.total == 5
    text = "\n".join(report.lines())
    assert "unexpected name in the fan-out tree: 5" in text and "... and 3 more" in text


# --- the pipelining client ---------------------------------------------------------------------


class ScriptedServer:
    """A socket server that answers each GET with a chunked body in pieces, and closes the
    connection (announcing it) every `close_every` answers, like nginx's keepalive_requests."""

    def __init__(self, close_every: int) -> None:
        self.close_every = close_every
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        buf, answered = b"", 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                path = head.split(b" ")[1]
                answered += 1
                closing = answered == self.close_every
                if path.endswith(b"/missing"):
                    body = b"<html>not found</html>"
                    out = (b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
                else:
                    out = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                           + (b"Connection: close\r\n" if closing else b"") + b"\r\n"
                           + b"3\r\n" + path[:3] + b"\r\n"
                           + b"%x;ext=1\r\n" % len(path[3:]) + path[3:] + b"\r\n0\r\nX-T: 1\r\n\r\n")
                for i in range(0, len(out), 7):  # dribble it out in small pieces
                    conn.sendall(out[i:i + 7])
                if closing:  # lingering close, as nginx does: no RST over unread requests
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(2)
                    while conn.recv(4096):
                        pass
                    return

    def close(self) -> None:
        self.sock.close()


def test_reads_parse_chunked_answers_and_resend_after_connection_close() -> None:
    server = ScriptedServer(close_every=5)
    try:
        reads = rebuild.Reads(5.0)
        paths = [f"/ab/{i}" for i in range(23)] + ["/missing"]
        out = reads.get_many(f"127.0.0.1:{server.port}/pre", paths)
        assert out[:-1] == [(200, f"/pre/ab/{i}".encode()) for i in range(23)]
        assert out[-1][0] == 404
        assert server.connections == 5  # 24 answers, a new connection every 5
        assert reads.requests == 24
        reads.close()
    finally:
        server.close()


def test_reads_give_up_on_a_refusing_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rebuild, "PATIENT", Retry(attempts=4, backoff=(0.01,)))
    with pytest.raises(VolumeUnreachable):
        rebuild.Reads(1.0).get_many(f"127.0.0.1:{free_port()}", ["/"])


# --- the index file ----------------------------------------------------------------------------


def make_index(path: Path, keys: list[str]) -> bytes:
    conn = schema.open_index(str(path))
    with conn:
        schema.write_records(conn, [Record(k, State.LIVE, ("x:1",), 1, "", 1.0) for k in keys])
    conn.close()
    return path.read_bytes()


def test_index_content_detection(tmp_path: Path) -> None:
    assert not rebuild.index_has_content(str(tmp_path / "none.db"))
    (tmp_path / "zero.db").write_bytes(b"")
    assert not rebuild.index_has_content(str(tmp_path / "zero.db"))
    make_index(tmp_path / "empty.db", [])
    assert not rebuild.index_has_content(str(tmp_path / "empty.db"))
    make_index(tmp_path / "full.db", ["/k"])
    assert rebuild.index_has_content(str(tmp_path / "full.db"))
    (tmp_path / "text.db").write_text("not sqlite at all, please keep me")
    assert rebuild.index_has_content(str(tmp_path / "text.db"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty.db", "full.db", "text.db", "zero.db"]  # looking left nothing behind


def test_replace_file_drops_the_old_wal(tmp_path: Path) -> None:
    target, tmp = tmp_path / "schema.db", tmp_path / ".schema.db.rebuild-1.tmp"
    target.write_bytes(b"old")
    (tmp_path / "schema.db-wal").write_bytes(b"old wal")
    (tmp_path / "schema.db-shm").write_bytes(b"old shm")
    tmp.write_bytes(b"new")
    rebuild.replace_file(str(tmp), str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schema.db"]
    assert target.read_bytes() == b"new"


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas, n", [(3, 1000), (2, 150)])
def test_rebuild_reproduces_the_index_and_the_service_serves_it(
        replicas: int, n: int, volumes: list[NginxVolume],
        make_service: Callable[..., MkvService], tmp_path: Path) -> None:
    svc = make_service(volumes, replicas=replicas)
    values = make_values(n, seed=replicas)
    put_all(svc, values)
    svc.stop()
    original = rows(svc.db)
    assert len(original) == n

    fresh = MkvService(tmp_path / "rebuilt", [v.address for v in volumes], replicas=replicas)
    proc = run_cli(volumes, fresh.db, replicas=replicas)
    assert proc.returncode == 0, proc.stderr
    assert f"{rebuild.PROG}: {n} keys, {n * replicas} replicas" in proc.stderr
    assert "problems: none" in proc.stderr
    rebuilt = rows(fresh.db)
    assert rebuilt.keys() == original.keys()
    assert rebuilt == original  # state, volumes in ring order, size, md5
    assert not list((tmp_path / "rebuilt").glob(".*tmp*"))

    if replicas != 3:
        return
    fresh.start()
    try:
        with requests.Session() as s:
            for key in values:
                r = s.get(url_of(fresh, key), allow_redirects=False, timeout=TIMEOUT)
                assert r.status_code == 302, (key, r.status_code)
            for key in random.Random(1).sample(sorted(values), 40):
                r = s.get(url_of(fresh, key), timeout=TIMEOUT)
                assert r.status_code == 200 and r.content == values[key], key
    finally:
        fresh.stop()


def test_planted_inconsistencies_are_reported_not_imported(
        volumes: list[NginxVolume], tmp_path: Path) -> None:
    addresses = [v.address for v in volumes]
    ring = Ring(addresses)
    by_addr = {v.address: v for v in volumes}
    v1, v2, v3 = volumes

    for v in volumes:  # two healthy keys on all three volumes
        plant(v, "/good", b"good value")
        plant(v, "/ok/ünï", b"x" * 3000)
    plant(v1, "/unfinished", b"bytes", with_sidecar=False)
    plant(v2, "/lost-bytes", b"bytes", with_blob=False)
    plant(v1, "/corrupt", b"bytes", sidecar=b'{"key": "/corrupt", "size": 5, "md')
    plant(v3, "/wrong-hash", b"bytes", sidecar=sidecar_body("/somebody-else", 5, md5(b"bytes")))
    for v in volumes:  # one replica truncated
        plant(v, "/mismatch", b"twelve bytes", blob=b"twelve" if v is v2 else None)
    for v in volumes:  # one replica's sidecar corrupt: the others still make the key
        plant(v, "/one-bad-sidecar", b"abc", sidecar=b"\x00garbage" if v is v3 else None)
    (leaf_dir(v1, "/good") / "README.txt").write_text("not mkv's")

    db = tmp_path / "schema.db"
    proc = run_cli(volumes, db)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    h = key_hash
    for line in [
        "blob without sidecar (unfinished write): 1",
        f"{v1.address} /{h('/unfinished')[:2]}/{h('/unfinished')[2:4]}/{h('/unfinished')}",
        "sidecar without blob: 1",
        f"{v2.address} /{h('/lost-bytes')[:2]}/{h('/lost-bytes')[2:4]}/{h('/lost-bytes')}.key",
        "corrupt sidecar JSON: 2",
        f"{v1.address} /{h('/corrupt')[:2]}/{h('/corrupt')[2:4]}/{h('/corrupt')}.key",
        f"{v3.address} /{h('/one-bad-sidecar')[:2]}/{h('/one-bad-sidecar')[2:4]}/"
        f"{h('/one-bad-sidecar')}.key",
        "sidecar key does not hash to its file name: 1",
        f"{v3.address} /{h('/wrong-hash')[:2]}/{h('/wrong-hash')[2:4]}/{h('/wrong-hash')}.key",
        "blob size differs from its sidecar: 1",
        f"{v2.address} /{h('/mismatch')[:2]}/{h('/mismatch')[2:4]}/{h('/mismatch')}: "
        "blob 6 bytes, sidecar says 12",
        "unexpected name in the fan-out tree: 1",
        "README.txt",
        "key has fewer replicas than --replicas: 2",
    ]:
        assert line in err, f"{line!r} not in:\n{err}"
    assert "PARTIAL" not in err

    got = rows(db)
    assert set(got) == {"/good", "/ok/ünï", "/mismatch", "/one-bad-sidecar"}
    assert got["/good"] == (1, ",".join(ring.order("/good")), 10, md5(b"good value"))
    assert got["/mismatch"][1] == ",".join(a for a in ring.order("/mismatch") if a != v2.address)
    assert got["/mismatch"][2] == 12
    assert got["/one-bad-sidecar"][1].split(",") == [
        a for a in ring.order("/one-bad-sidecar") if by_addr[a] is not v3]


def test_the_newest_generation_is_restored_and_older_ones_reported_superseded(
        volumes: list[NginxVolume], tmp_path: Path) -> None:
    """Two writes of one key side by side on every volume, as a PUT over an old key leaves
    them until cleanup runs: an old copy named as before generations and a newer one named
    with its generation, each with blob and sidecar. The index must name the newer write."""
    addresses = [v.address for v in volumes]
    ring = Ring(addresses)
    by_addr = {v.address: v for v in volumes}
    old_value, new_value = b"the old value", b"the newer, longer value"
    old_gen, new_gen = "0623c9d3a1b2c3d4e5f", "0623c9d3a1b2c3d4e60"  # 19 digits, by time
    for v in volumes:
        plant(v, "/twice", old_value)
        plant(v, "/twice", new_value, gen=new_gen)
        plant(v, "/gen-only", b"fresh", gen=old_gen)
    # the newest write of "/resurrected" made it to one volume only; an older one to two
    home = ring.place("/resurrected", 3)
    plant(by_addr[home[0]], "/resurrected", b"newest", gen=new_gen)
    for a in home[1:]:
        plant(by_addr[a], "/resurrected", b"older", gen=old_gen)

    db = tmp_path / "schema.db"
    proc = run_cli(volumes, db)
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    h = key_hash("/twice")
    hr = key_hash("/resurrected")
    for line in [
        f"{rebuild.PROG}: 3 keys, 7 replicas",
        "an older write's copies, left out of the index: 5",
        *(f"{a} /{h[:2]}/{h[2:4]}/{h}: no gen (written before generations), "
          f"{len(old_value)} bytes md5 '{md5(old_value)}' (key '/twice'); "
          f"the index keeps gen {new_gen}" for a in addresses),
        *(f"{a} /{hr[:2]}/{hr[2:4]}/{hr}.{old_gen}: gen {old_gen}, 5 bytes" for a in home[1:]),
        f"{Kind.SINGLE_COPY.value}: 1",
        f"{home[0]} /resurrected: 1 of 3",
    ]:
        assert line in err, f"{line!r} not in:\n{err}"
    for kind in ("blob without sidecar", "sidecar without blob", "unexpected name",
                 "fewer replicas than", "PARTIAL"):
        assert kind not in err, err

    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        got = {r[0]: tuple(r[1:]) for r in conn.execute(
            "SELECT key, state, volumes, size, md5, gen FROM keys")}
        queued = set(conn.execute("SELECT key, gen, volume, op, state FROM pending"))
    finally:
        conn.close()
    # the older writes' copies are due removals in the new index: the service's health
    # process removes them once it runs on it
    due = (int(PendingOp.REMOVE), int(PendingState.DUE))
    assert queued == {("/twice", "", a, *due) for a in addresses} | {
        ("/resurrected", old_gen, a, *due) for a in home[1:]}
    assert got == {
        "/twice": (int(State.LIVE), ",".join(ring.order("/twice")), len(new_value),
                   md5(new_value), new_gen),
        "/gen-only": (int(State.LIVE), ",".join(ring.order("/gen-only")), 5, md5(b"fresh"),
                      old_gen),
        "/resurrected": (int(State.LIVE), home[0], 6, md5(b"newest"), new_gen),
    }


def test_a_dead_volume_gives_a_partial_index_and_exit_1(
        volumes: list[NginxVolume], tmp_path: Path) -> None:
    addresses = [v.address for v in volumes]
    by_addr = {v.address: v for v in volumes}
    ring = Ring(addresses)
    dead = volumes[1]
    expected = {}
    for i in range(120):  # R=2 keys: each survives on at least one live volume
        key, data = f"/two/{i}", f"value {i}".encode()
        held = ring.place(key, 2)
        for a in held:
            plant(by_addr[a], key, data)
        expected[key] = ",".join(a for a in held if a != dead.address)
    for i in range(30):  # R=1 keys that live only on the dead volume are lost
        plant(dead, f"/only-dead/{i}", b"gone")
    dead.kill()

    db = tmp_path / "schema.db"
    started = time.monotonic()
    proc = run_cli(volumes, db, replicas=2)
    assert time.monotonic() - started < 30
    assert proc.returncode == 1, proc.stderr
    assert "PARTIAL" in proc.stderr and dead.address in proc.stderr
    assert "volume unreachable" in proc.stderr
    assert "scanned 2/3 volumes" in proc.stderr
    # the R=2 keys whose other copy is on the dead volume: one copy, and the summary says why
    assert "restored from a single copy" in proc.stderr
    assert "(unreachable)" in proc.stderr and f"not read from {dead.address}" in proc.stderr
    got = rows(db)
    assert {k: v[1] for k, v in got.items()} == expected


def test_refuses_to_overwrite_an_index_without_force(
        volumes: list[NginxVolume], tmp_path: Path) -> None:
    for v in volumes:
        plant(v, "/real", b"real")
    (tmp_path / "idx").mkdir()
    db = tmp_path / "idx" / "schema.db"
    before = make_index(db, ["/old-1", "/old-2"])
    stat = db.stat()

    proc = run_cli(volumes, db)
    assert proc.returncode == 2
    assert "--force" in proc.stderr
    assert db.read_bytes() == before and db.stat().st_mtime_ns == stat.st_mtime_ns

    (tmp_path / "idx" / "schema.db-wal").write_bytes(b"")  # a stale WAL must not survive
    proc = run_cli(volumes, db, "--force")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in db.parent.iterdir()) == ["schema.db"]  # no temp, WAL or SHM
    assert set(rows(db)) == {"/real"}

    empty = tmp_path / "idx" / "empty.db"  # an index without keys (a fresh service's) needs no --force
    make_index(empty, [])
    assert run_cli(volumes, empty).returncode == 0
    assert set(rows(empty)) == {"/real"}


def test_refuses_while_a_writer_serves_the_db(volumes: list[NginxVolume], tmp_path: Path) -> None:
    db = tmp_path / "schema.db"
    server, thread = serve_in_thread(str(db), str(tmp_path / "w.sock"))  # holds the writer lock
    try:
        proc = run_cli(volumes, db)
        assert proc.returncode == 2
        assert "live mkv writer" in proc.stderr
        assert rows(db) == {}  # the writer's empty index, not replaced
    finally:
        server.stop()
        thread.join(10)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(db) + ".writer.sock")
    stale.close()  # the socket file of a dead writer does not count, nor its lock file
    assert os.path.exists(str(db) + ".writer.lock")
    proc = run_cli(volumes, db)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def hung_volume() -> Iterator[str]:
    """A volume that accepts connections and never answers."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=64)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_killed_rebuild_leaves_the_old_index_untouched(
        volumes: list[NginxVolume], hung_volume: str, tmp_path: Path) -> None:
    (tmp_path / "idx").mkdir()
    db = tmp_path / "idx" / "schema.db"
    before = make_index(db, ["/old"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MKV_")} | {"MKV_CONFIG": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mkv.tools.rebuild", "--volumes",
         ",".join([volumes[0].address, hung_volume]), "--replicas", "1", "--db", str(db),
         "--force", "--volume-timeout", "1"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not list(db.parent.glob(".schema.db.rebuild-*.tmp")):
            assert time.monotonic() < deadline and proc.poll() is None, "no temporary index"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "left as it was" in err
    # how far it got, not a traceback
    assert re.search(r"interrupted after [0-9.]+s: \d+/\d+ directories of \d/2 volumes scanned, "
                     r"\d+ keys found; index not written", err), err
    assert "Traceback" not in err
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["schema.db"]


def test_interrupted_in_process_rebuild_leaves_no_half_index(
        volumes: list[NginxVolume], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(50):
        plant(volumes[i % 3], f"/k{i}", b"v")
    (tmp_path / "idx").mkdir()
    db = tmp_path / "idx" / "schema.db"
    before = make_index(db, ["/old"])

    def boom(self, dirs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rebuild.Scanner, "unit", boom)
    cfg = Config(volumes=tuple(v.address for v in volumes), replicas=1, db=str(db))
    with pytest.raises(KeyboardInterrupt):
        rebuild.rebuild(cfg, str(db), force=True, progress=False)
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["schema.db"]


def test_no_readable_volume_writes_no_index(tmp_path: Path) -> None:
    db = tmp_path / "schema.db"
    before = make_index(db, ["/old"])
    proc = run_cli([f"127.0.0.1:{free_port()}"], db, "--force", replicas=1)
    assert proc.returncode == 1
    assert "index NOT written" in proc.stderr and "PARTIAL" in proc.stderr
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schema.db"]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    proc = run_cli(["127.0.0.1:1"], tmp_path / "no-such-dir" / "schema.db", replicas=1)
    assert proc.returncode == 2 and "db: directory" in proc.stderr
    proc = run_cli(["127.0.0.1:1"], tmp_path / "schema.db", "--concurrency", "0", replicas=1)
    assert proc.returncode == 2 and "concurrency" in proc.stderr


def test_unlinked_keys_stay_unlinked_after_a_rebuild(
        volumes: list[NginxVolume], make_service: Callable[..., MkvService],
        tmp_path: Path) -> None:
    svc = make_service(volumes, replicas=3)
    values = {"/keep": b"kept", "/hidden": b"soft-deleted", "/back": b"first"}
    put_all(svc, values)
    assert requests.request("UNLINK", url_of(svc, "/hidden"), timeout=TIMEOUT).status_code == 204
    assert requests.request("UNLINK", url_of(svc, "/back"), timeout=TIMEOUT).status_code == 204
    assert requests.put(url_of(svc, "/back"), data=b"second", timeout=TIMEOUT).status_code == 201
    svc.stop()
    original = rows(svc.db)

    fresh = tmp_path / "rebuilt.db"
    proc = run_cli(volumes, fresh)
    assert proc.returncode == 0, proc.stderr
    rebuilt = rows(fresh)
    assert rebuilt == original
    assert rebuilt["/hidden"][0] == int(State.UNLINKED) and rebuilt["/back"][0] == int(State.LIVE)
