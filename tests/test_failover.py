"""Read failover inside nginx (docs/design.md, "Read failover"), against real volumes and a
real `mkv serve`: a redirect to a volume that lacks the blob goes on to the key's next
replica named in the Location, signed or not, and nowhere else.

Clients outside the writers are sockets bound to 127.0.0.2 (tests/helpers.py CLIENT); the
signing volumes here list 127.0.0.1 alone as writer.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from mkv.signing import redirect_query
from mkv.volumes.nginx import Disk, parse_writers
from tests.cluster import NginxVolume
from tests.conftest import start_volumes
from tests.helpers import CLIENT, TIMEOUT, blob_rel, get, index_record, kurl, put

OUTSIDER = "127.0.0.2"
ONLY_LOCALHOST = parse_writers("127.0.0.1")
SECRET = "failover-secret-0123456789"
BLOB = blob_rel("a failover key")  # /ab/cd/<hash>


def call(port: int, method: str, path: str, body: bytes | None = None,
         source: str = "127.0.0.1") -> tuple[int, str | None, bytes]:
    """One request from `source`, path sent as is: (status, Location, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Location"), resp.read()
    finally:
        conn.close()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., list[NginxVolume]]]:
    """Factory: start(n, **NginxVolume.start options) -> n volumes; stopped at the end."""
    started: list[NginxVolume] = []

    def make(n: int, **kw: object) -> list[NginxVolume]:
        batch = start_volumes(tmp_path / f"batch{len(started)}", n, **kw)
        started.extend(batch)
        return batch

    yield make
    for volume in started:
        volume.stop()


def hop(vol: NginxVolume, prefix: str = "") -> tuple[str, str]:
    return vol.address + prefix, prefix + BLOB


def link(vol: NginxVolume, hops: list[tuple[str, str]], secret: str = "", prefix: str = "",
         ttl: int = 60) -> str:
    """A redirect as mkv makes it: to `vol` (under `prefix`), failing over to `hops`."""
    return vol.url + prefix + BLOB + redirect_query(prefix + BLOB, hops, time.time(), ttl, secret)


# --- unsigned volumes -----------------------------------------------------------------------------


def test_a_missing_blob_sends_the_client_to_the_next_hop(start) -> None:
    a, b = start(2)
    assert call(b.port, "PUT", BLOB, b"on b only")[0] == 201
    url = link(a, [hop(b)])
    assert url == f"{a.url}{BLOB}?next={b.address}"
    status, location, _ = call(a.port, "GET", url.removeprefix(a.url), source=OUTSIDER)
    assert (status, location) == (302, f"//{b.address}{BLOB}")
    got = requests.get(url, timeout=TIMEOUT)
    assert (got.status_code, got.content) == (200, b"on b only")
    assert [r.status_code for r in got.history] == [302]
    head = requests.head(url, allow_redirects=True, timeout=TIMEOUT)
    assert (head.status_code, head.headers["Content-Length"]) == (200, str(len(b"on b only")))


def test_the_volume_that_has_the_blob_serves_it_whatever_the_hops(start) -> None:
    a, b = start(2)
    assert call(a.port, "PUT", BLOB, b"here")[0] == 201
    assert call(a.port, "GET", link(a, [hop(b)]).removeprefix(a.url), source=OUTSIDER) == (
        200, None, b"here")


def test_hops_are_followed_in_order_and_the_last_404_stays(start) -> None:
    a, b, c = start(3)
    url = link(a, [hop(b), hop(c)])
    status, location, _ = call(a.port, "GET", url.removeprefix(a.url))
    assert (status, location) == (302, f"//{b.address}{BLOB}?next={c.address}")
    status, location, _ = call(b.port, "GET", f"{BLOB}?next={c.address}")
    assert (status, location) == (302, f"//{c.address}{BLOB}")
    # every copy gone: the client ends with the last volume's 404
    gone = requests.get(url, timeout=TIMEOUT)
    assert gone.status_code == 404
    assert [urlsplit(r.url).port for r in gone.history] == [a.port, b.port]
    assert requests.head(url, allow_redirects=True, timeout=TIMEOUT).status_code == 404
    # the copy on the last hop is found
    assert call(c.port, "PUT", BLOB, b"on c")[0] == 201
    assert requests.get(url, timeout=TIMEOUT).content == b"on c"


def test_without_hops_sidecars_listings_and_writes_keep_their_404(start) -> None:
    a, b = start(2)
    assert call(b.port, "PUT", BLOB, b"x")[0] == 201
    assert call(b.port, "PUT", BLOB + ".key", b"{}\n")[0] == 201
    nxt = f"?next={b.address}"
    assert call(a.port, "GET", BLOB)[0] == 404
    assert call(a.port, "GET", BLOB + ".key" + nxt)[:2] == (404, None)
    assert call(a.port, "GET", BLOB[:4] + "/" + nxt)[:2] == (404, None)  # a listing
    assert call(a.port, "GET", "/.nginx/nginx.conf" + nxt)[:2] == (404, None)
    assert call(a.port, "GET", "/zz/yy" + BLOB + nxt)[:2] == (404, None)  # not a blob path
    assert call(a.port, "DELETE", BLOB + nxt)[:2] == (404, None)  # mkv's own removals


@pytest.mark.parametrize("value, location", [
    ("[::1]:3002/d2,[fd00::5]:80", f"//[::1]:3002/d2{BLOB}?next=[fd00::5]:80"),
    ("vol2.example.com/d-1.x", f"//vol2.example.com/d-1.x{BLOB}")])
def test_ipv6_and_named_hosts_are_hops(start, value: str, location: str) -> None:
    (a,) = start(1)
    assert call(a.port, "GET", f"{BLOB}?next={value}", source=OUTSIDER)[:2] == (302, location)


@pytest.mark.parametrize("value", [
    "evil.example@{b}", "http://evil.example", "//evil.example", "{b}/two/segments",
    "{b}/d1/", "{b}?x=1", "{b}%2F..", "{b}\\evil.example", "{b},", ",{b}", "{b},,{b}",
    "{b},http://evil.example", "{b}~AAAAAAAAAAAAAAAAAAAAAA", "{b}/.hidden"])
def test_a_hop_that_is_not_host_port_and_prefix_is_refused(start, value: str) -> None:
    """Unsigned, a hop is host[:port][/prefix] and the whole list must be: no scheme, user,
    path, query or escape that would send the client anywhere but that host's blob."""
    a, b = start(2)
    assert call(b.port, "PUT", BLOB, b"x")[0] == 201
    status, location, _ = call(a.port, "GET", f"{BLOB}?next={value.format(b=b.address)}",
                               source=OUTSIDER)
    assert (status, location) == (404, None)


# --- signed volumes -------------------------------------------------------------------------------


def signed_volumes(start, n: int) -> list[NginxVolume]:
    return start(n, writers=ONLY_LOCALHOST, secret=SECRET)


def test_signed_failover_passes_each_hop_its_own_signature(start) -> None:
    a, b, c = signed_volumes(start, 3)
    assert call(c.port, "PUT", BLOB, b"signed, on c")[0] == 201
    url = link(a, [hop(b), hop(c)], SECRET)
    got = CLIENT.get(url, timeout=TIMEOUT)
    assert (got.status_code, got.content) == (200, b"signed, on c")
    assert [urlsplit(r.url).port for r in got.history] == [a.port, b.port]
    # each hop's link is valid on its own volume only for the rest of the list
    second = got.history[1].url
    query = parse_qs(urlsplit(second).query)
    assert query["next"] == [f"{c.address}~{query['next'][0].split('~')[1]}"]
    assert CLIENT.head(url, allow_redirects=True, timeout=TIMEOUT).status_code == 200


def tamper(url: str, change: Callable[[str], str]) -> str:
    base, _, query = url.partition("?next=")
    return base + "?next=" + change(query) if query else url


@pytest.mark.parametrize("how", ["another host", "a hop dropped", "a hop added", "reordered",
                                 "list removed", "unsigned list"])
def test_a_changed_hop_list_is_refused_and_redirects_nowhere(start, how: str) -> None:
    a, b, c = signed_volumes(start, 3)
    assert call(c.port, "PUT", BLOB, b"x")[0] == 201
    url = link(a, [hop(b), hop(c)], SECRET)
    base, _, rest = url.partition("&next=")
    first, second = rest.split(",")
    changed = {
        "another host": f"{base}&next={first.replace(b.address, '127.0.0.1:1')},{second}",
        "a hop dropped": f"{base}&next={second}",
        "a hop added": f"{base}&next={rest},{second}",
        "reordered": f"{base}&next={second},{first}",
        "list removed": base,
        "unsigned list": f"{base}&next={b.address},{c.address}",
    }[how]
    status, location, _ = call(a.port, "GET", changed.removeprefix(a.url), source=OUTSIDER)
    assert (status, location) == (403, None)
    # the link as signed works
    assert CLIENT.get(url, timeout=TIMEOUT).content == b"x"


def test_an_expired_link_does_not_fail_over(start) -> None:
    a, b = signed_volumes(start, 2)
    assert call(b.port, "PUT", BLOB, b"x")[0] == 201
    url = link(a, [hop(b)], SECRET, ttl=-5)
    assert call(a.port, "GET", url.removeprefix(a.url), source=OUTSIDER)[:2] == (403, None)


def test_signed_disks_of_one_nginx_fail_over_to_each_other(start, tmp_path: Path) -> None:
    disks = [Disk(f"/disk{i}", tmp_path / f"mnt{i}") for i in (1, 2, 3)]
    (vol,) = start(1, disks=disks, writers=ONLY_LOCALHOST, secret=SECRET)
    assert call(vol.port, "PUT", "/disk3" + BLOB, b"on disk3")[0] == 201
    url = link(vol, [hop(vol, "/disk2"), hop(vol, "/disk3")], SECRET, prefix="/disk1")
    got = CLIENT.get(url, timeout=TIMEOUT)
    assert (got.status_code, got.content) == (200, b"on disk3")
    assert [urlsplit(r.url).path for r in got.history] == ["/disk1" + BLOB, "/disk2" + BLOB]
    # a hop's signature is for its own prefix: the same list sent to another disk is refused
    assert call(vol.port, "GET", url.removeprefix(vol.url).replace("/disk1", "/disk2", 1),
                source=OUTSIDER)[0] == 403


def test_unsigned_disks_fail_over_too(start, tmp_path: Path) -> None:
    disks = [Disk(f"/disk{i}", tmp_path / f"mnt{i}") for i in (1, 2)]
    (vol,) = start(1, disks=disks)
    assert call(vol.port, "PUT", "/disk2" + BLOB, b"on disk2")[0] == 201
    url = link(vol, [hop(vol, "/disk2")], prefix="/disk1")
    assert requests.get(url, timeout=TIMEOUT).content == b"on disk2"


# --- through mkv ----------------------------------------------------------------------------------


def lose_the_first_copy(svc, vols: list[NginxVolume], key: str) -> tuple[str, NginxVolume]:
    """Delete by hand the blob on the volume a GET redirects to: (the Location, that volume)."""
    location = get(svc, key).headers["Location"]
    port = urlsplit(location).port
    (vol,) = [v for v in vols if v.port == port]
    record = index_record(svc, key)
    assert record is not None
    (vol.root / blob_rel(key, record.gen).lstrip("/")).unlink()
    return location, vol


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_lost_copy_is_read_from_the_next_replica(tmp_path: Path, make_service,
                                                   signed: bool) -> None:
    """The issue's case, by hand: one copy of a key gone from the volume mkv redirects to.
    The client that follows redirects still gets the bytes, one extra hop inside the
    volumes; with every copy gone it ends with a 404."""
    kw: dict = {"writers": ONLY_LOCALHOST, "secret": SECRET} if signed else {}
    vols = start_volumes(tmp_path / "vols", 3, **kw)
    try:
        extra = ["--redirect-secret", SECRET] if signed else []
        svc = make_service(vols, replicas=3, extra=extra)
        key = "/failover/key"
        assert put(svc, key, b"three copies").status_code == 201
        location, lost = lose_the_first_copy(svc, vols, key)
        assert len(location) < 300
        got = CLIENT.get(location, timeout=TIMEOUT)
        assert (got.status_code, got.content) == (200, b"three copies")
        assert [urlsplit(r.url).port for r in got.history] == [lost.port]
        assert CLIENT.head(location, timeout=TIMEOUT, allow_redirects=True).status_code == 200
        # through mkv, whichever replica each GET is sent to (the spread rotates them)
        hops = set()
        for _ in range(12):
            got = CLIENT.get(kurl(svc, key), timeout=TIMEOUT)
            assert (got.status_code, got.content) == (200, b"three copies")
            hops.add(len(got.history))
        assert hops == {1, 2}  # mkv's 302 alone, or one more from the volume that lost it
        record = index_record(svc, key)
        assert record is not None
        for vol in vols:
            path = vol.root / blob_rel(key, record.gen).lstrip("/")
            path.unlink(missing_ok=True)
        gone = CLIENT.get(kurl(svc, key), timeout=TIMEOUT)
        assert gone.status_code == 404
        assert len(gone.history) == 3  # mkv, then two volumes sent it on
    finally:
        for vol in vols:
            vol.stop()
