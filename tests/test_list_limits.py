"""List limits on a live service: pages capped at max-list-limit, one token bucket for
every worker's ?list and ?unlinked, and key requests never limited."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.cluster import NginxVolume
from tests.helpers import get, put, url
from tests.service import MkvService


def test_a_list_without_limit_is_one_capped_page_and_next_goes_on(
        volumes: list[NginxVolume], make_service: Callable[..., MkvService]) -> None:
    svc = make_service(volumes, extra=["--max-list-limit", "4", "--list-rate", "0"])
    keys = [f"/cap/{i:02d}" for i in range(10)]
    for key in keys:
        assert put(svc, key, b"v").status_code == 201
    first = requests.get(url(svc, "/cap/?list"), timeout=10).json()
    assert first == {"next": "/cap/04", "keys": keys[:4]}
    seen, start = [], ""
    while True:
        q = "/cap/?list&limit=1000" + (f"&start={start}" if start else "")
        doc = requests.get(url(svc, q), timeout=10).json()
        assert len(doc["keys"]) <= 4
        seen += doc["keys"]
        start = doc["next"]
        if not start:
            break
    assert seen == keys


def test_a_burst_of_listings_gets_429_while_keys_are_served(
        volumes: list[NginxVolume], make_service: Callable[..., MkvService]) -> None:
    """100 listings at once against list-rate 5, list-burst 10 over three workers: the
    bucket is the service's, so about 10 + 5 per second get through, the rest 429 with
    Retry-After; every GET and PUT of a key in the same burst is served."""
    svc = make_service(volumes, workers=3, extra=["--list-rate", "5", "--list-burst", "10"])
    for i in range(20):
        assert put(svc, f"/burst/{i}", b"v").status_code == 201

    def listing(i: int) -> requests.Response:
        return requests.get(url(svc, "/burst/?list" if i % 2 else "/burst/?unlinked"), timeout=10)

    def key_request(i: int) -> int:
        if i % 2:
            return get(svc, f"/burst/{i % 20}").status_code
        return put(svc, f"/burst/new-{i}", b"x").status_code

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        lists = pool.map(listing, range(100))
        keys = pool.map(key_request, range(40))
        lists, keys = list(lists), list(keys)
    elapsed = time.monotonic() - started
    ok = [r for r in lists if r.status_code == 200]
    limited = [r for r in lists if r.status_code == 429]
    assert len(ok) + len(limited) == 100
    assert 10 <= len(ok) <= 10 + 5 * elapsed + 1
    assert limited, "no listing was limited"
    for r in limited:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"] == "rate_limited"
    assert keys == [201 if i % 2 == 0 else 302 for i in range(40)]
