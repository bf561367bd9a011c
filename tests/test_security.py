"""Write tokens, public volume URLs and signed redirects on a live service."""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests

from mkv.signing import signature
from tests.cluster import NginxVolume, free_port
from tests.conftest import start_volumes
from tests.helpers import CLIENT, TIMEOUT, get, put, wait_for
from tests.service import FileService, MkvService

TOKEN = "writers-token-0123456789"
OTHER = "another-token-9876543210"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_write_tokens_on_every_write_method_and_never_in_the_log(
        volumes: list[NginxVolume], file_service: Callable[..., FileService],
        tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    svc = file_service(volumes, conf={"api-tokens-file": str(tokens)})
    url = svc.url + "/tok/k"
    for method in ("PUT", "DELETE", "UNLINK"):
        body = b"v" if method == "PUT" else None
        r = requests.request(method, url, data=body, timeout=TIMEOUT)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", method
        r = requests.request(method, url, data=body, headers=bearer(OTHER), timeout=TIMEOUT)
        assert r.status_code == 403 and r.json()["error"] == "forbidden", method
    assert requests.get(url, allow_redirects=False, timeout=TIMEOUT).status_code == 404
    assert requests.put(url, data=b"v", headers=bearer(TOKEN), timeout=TIMEOUT).status_code == 201
    assert requests.get(url, timeout=TIMEOUT).content == b"v"  # reads stay open
    assert requests.request("UNLINK", url, headers=bearer(TOKEN), timeout=TIMEOUT).status_code == 204
    assert requests.delete(url, headers=bearer(TOKEN), timeout=TIMEOUT).status_code == 204

    # SIGHUP reads the file again: the new token works, the old one no longer does
    tokens.write_text(f"{OTHER}\n")
    svc.hup()
    wait_for(lambda: requests.put(svc.url + "/tok/new", data=b"v", headers=bearer(OTHER),
                                  timeout=TIMEOUT).status_code == 201, 20, "the new token")
    r = requests.put(svc.url + "/tok/old", data=b"v", headers=bearer(TOKEN), timeout=TIMEOUT)
    assert r.status_code == 403
    time.sleep(0.3)  # the access lines of the last requests
    log = svc.output()
    assert "PUT /tok/old 403" in log  # the access log saw the requests ...
    assert TOKEN not in log and OTHER not in log  # ... and no token


def test_auth_reads_closes_reads_and_listings(
        volumes: list[NginxVolume], make_service: Callable[..., MkvService], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    svc = make_service(volumes, extra=["--api-tokens-file", str(tokens), "--auth-reads", "true"])
    assert requests.put(svc.url + "/r/k", data=b"v", headers=bearer(TOKEN),
                        timeout=TIMEOUT).status_code == 201
    for path in ("/r/k", "/r/?list", "/r/?unlinked"):
        assert requests.get(svc.url + path, allow_redirects=False, timeout=TIMEOUT).status_code == 401
        assert requests.head(svc.url + path, timeout=TIMEOUT).status_code == 401
        assert requests.get(svc.url + path, headers=bearer(OTHER), allow_redirects=False,
                            timeout=TIMEOUT).status_code == 403
    r = requests.get(svc.url + "/r/k", headers=bearer(TOKEN), allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 302
    assert requests.get(svc.url + "/-/health", timeout=TIMEOUT).status_code == 200


def test_a_bad_tokens_file_is_refused_at_start(volumes: list[NginxVolume], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    svc = MkvService(tmp_path / "svc", [v.address for v in volumes],
                     extra=["--api-tokens-file", str(empty)])
    svc.port = free_port()
    proc = subprocess.run(svc.args(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "api-tokens-file" in proc.stderr and "no token" in proc.stderr


def test_redirects_name_the_public_url_while_mkv_uses_the_address(
        volumes: list[NginxVolume], make_service: Callable[..., MkvService]) -> None:
    public = {v.address: f"https://vol{i}.example.com" for i, v in enumerate(volumes)}
    entries = [f"{v.address}={public[v.address]}" for v in volumes]
    svc = make_service(entries, replicas=2)
    assert requests.put(svc.url + "/pub/k", data=b"public", timeout=TIMEOUT).status_code == 201
    r = requests.get(svc.url + "/pub/k", allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 302
    location = urlsplit(r.headers["Location"])
    served_by = [a for a, u in public.items() if u == f"{location.scheme}://{location.netloc}"]
    assert len(served_by) == 1 and served_by[0] in r.headers["Key-Volumes"].split(",")
    # the bytes are where mkv wrote them, by the address (what a proxy for the URL would reach)
    assert requests.get(f"http://{served_by[0]}{location.path}", timeout=TIMEOUT).content == b"public"
    assert [v["volume"] for v in requests.get(svc.url + "/-/health", timeout=TIMEOUT)
            .json()["volumes"]] == [v.address for v in volumes]


def test_a_signed_redirect_carries_expiry_and_signature(
        volumes: list[NginxVolume], make_service: Callable[..., MkvService]) -> None:
    secret = "a-redirect-secret-of-some-length"
    svc = make_service(volumes, extra=["--redirect-secret", secret, "--redirect-ttl", "120"])
    assert requests.put(svc.url + "/sig/k", data=b"signed", timeout=TIMEOUT).status_code == 201
    before = int(time.time())
    r = requests.get(svc.url + "/sig/k", allow_redirects=False, timeout=TIMEOUT)
    location = urlsplit(r.headers["Location"])
    query = parse_qs(location.query)
    expires = int(query["expires"][0])
    assert before + 120 <= expires <= int(time.time()) + 120
    # the signature covers the failover hops too (docs/design.md, "Read failover")
    hops = location.query.partition("&next=")[2]
    assert hops and hops == query["next"][0]
    assert query["md5"] == [signature(f"{location.path}?{hops}", expires, secret)]
    assert secret not in svc.output()


def test_signed_redirects_end_to_end_unsigned_changed_and_expired_links_get_403(
        tmp_path: Path, make_service: Callable[..., MkvService]) -> None:
    """Volumes that sign their reads (writers: 127.0.0.1, which mkv uses) and a service
    that signs its redirects: a client from 127.0.0.2 gets the bytes with the fresh
    Location, and 403 for the same link unsigned, with one byte of the signature changed,
    or once redirect-ttl has passed. mkv's own requests need no signature."""
    secret = "end-to-end-redirect-secret"
    vols = start_volumes(tmp_path / "vols", 3, writers=[ipaddress.ip_network("127.0.0.1/32")],
                         secret=secret)
    try:
        svc = make_service(vols, extra=["--redirect-secret", secret, "--redirect-ttl", "2"])
        assert put(svc, "/e2e/k", b"signed bytes").status_code == 201  # mkv writes unsigned
        location = get(svc, "/e2e/k").headers["Location"]
        assert CLIENT.get(location, timeout=TIMEOUT).content == b"signed bytes"
        parts = urlsplit(location)
        assert CLIENT.get(location.split("?")[0], timeout=TIMEOUT).status_code == 403
        query = parse_qs(parts.query)
        sig = query["md5"][0]
        changed = sig[:5] + ("A" if sig[5] != "A" else "B") + sig[6:]
        tampered = f"{location.split('?')[0]}?md5={changed}&expires={query['expires'][0]}"
        assert CLIENT.get(tampered, timeout=TIMEOUT).status_code == 403
        wait_for(lambda: time.time() > int(query["expires"][0]) + 1, 10, "the link expires")
        assert CLIENT.get(location, timeout=TIMEOUT).status_code == 403
        # a fresh redirect serves again; DELETE (mkv's own volume requests) works
        assert CLIENT.get(svc.url + "/e2e/k", timeout=TIMEOUT).content == b"signed bytes"
        assert requests.delete(svc.url + "/e2e/k", timeout=TIMEOUT).status_code == 204
    finally:
        for vol in vols:
            vol.stop()
