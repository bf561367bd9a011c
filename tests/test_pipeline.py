"""Pipelined requests to real nginx volumes: answers in order, stale connections, failures."""

import socket
import threading
import time

import pytest
import requests

from mkv.volumes.errors import ShortWrite, VolumeStatus, VolumeTimeout, VolumeUnreachable
from mkv.volumes.pool import Pool
from mkv.volumes.wire import Request
from tests.cluster import NginxVolume, free_port


def test_blob_then_sidecar_in_one_write_to_each_volume(volumes):
    pool = Pool(timeout=5)
    work = {v.address: [Request("PUT", "/ab/cd/blob", b"B" * 3000),
                        Request("PUT", "/ab/cd/blob.key", b'{"k": 1}\n')] for v in volumes}
    assert pool.exchange(work) == {}
    for v in volumes:
        assert (v.root / "ab/cd/blob").read_bytes() == b"B" * 3000
        assert (v.root / "ab/cd/blob.key").read_bytes() == b'{"k": 1}\n'
    # overwrite (204) on the same, now pooled, connections
    assert pool.exchange(work) == {}


def test_a_connection_nginx_closed_while_idle_is_replaced(tmp_path):
    vol = NginxVolume.start(tmp_path / "v")
    try:
        pool = Pool(timeout=5)
        assert pool.exchange({vol.address: [Request("PUT", "/ab/cd/x", b"1")]}) == {}
        vol.stop()
        vol = NginxVolume.start(tmp_path / "v", port=vol.port)  # the pooled socket is now dead
        assert pool.exchange({vol.address: [Request("PUT", "/ab/cd/x", b"2")]}) == {}
        assert requests.get(vol.url + "/ab/cd/x").content == b"2"
    finally:
        vol.stop()


def test_error_status_refused_and_silent_volumes(volumes):
    pool = Pool(timeout=0.5)
    refused = f"127.0.0.1:{free_port()}"
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never answers
    quiet = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        started = time.monotonic()
        errors = pool.exchange({
            volumes[0].address: [Request("PUT", "/ab/", b"x")],  # a directory: 405
            refused: [Request("PUT", "/ab/cd/y", b"y")],
            quiet: [Request("PUT", "/ab/cd/y", b"y")],
            volumes[1].address: [Request("PUT", "/ab/cd/y", b"y")],
        })
        assert time.monotonic() - started < 3
    finally:
        silent.close()
    assert isinstance(errors[volumes[0].address], VolumeStatus)
    assert errors[volumes[0].address].status == 405
    assert isinstance(errors[refused], VolumeUnreachable)
    assert isinstance(errors[quiet], VolumeTimeout)
    assert volumes[1].address not in errors


def test_threads_share_a_pool(volumes):
    pool = Pool(timeout=5)
    failures = []

    def work(t):
        for i in range(30):
            errs = pool.exchange({v.address: [Request("PUT", f"/t{t}/{i}", b"z" * i)]
                                  for v in volumes})
            failures.extend(errs.values())

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all((v.root / "t7" / "29").read_bytes() == b"z" * 29 for v in volumes)


def test_volume_prefix_is_part_of_the_path(tmp_path):
    prefix = "disk1"
    vol = NginxVolume.start(tmp_path / "v")
    try:
        assert Pool(5).exchange({f"{vol.address}/{prefix}": [Request("PUT", "/ab/cd/p", b"p")]}) == {}
        assert (vol.root / prefix / "ab/cd/p").read_bytes() == b"p"
    finally:
        vol.stop()


def test_heads_answer_length_without_a_body_and_404_for_missing(volumes):
    pool = Pool(timeout=5)
    vol = volumes[0]
    assert pool.exchange({vol.address: [Request("PUT", "/ab/cd/h", b"H" * 1234)]}) == {}
    heads = [Request("HEAD", "/ab/cd/h"), Request("HEAD", "/ab/cd/none"),
             Request("GET", "/ab/cd/h")]  # a GET after the HEADs: the stream stays in step
    out = pool.ask({vol.address: heads}, ok=(200, 404))[vol.address]
    assert (out[0].status, out[0].length, out[0].body) == (200, 1234, b"")
    assert (out[1].status, out[1].body) == (404, b"")  # its length is nginx's error page's
    assert out[2].status == 200 and out[2].body == b"H" * 1234
    # a status outside `ok` is that volume's error
    assert isinstance(pool.ask({vol.address: heads[1:2]}, ok=(200,))[vol.address], VolumeStatus)


def test_streamed_put_then_sidecar_pipelined_behind_it(volumes):
    pool = Pool(timeout=5)
    vol = volumes[0]
    chunks = [b"a" * 100_000, b"b" * 100_000, b"c" * 50]
    pool.put_stream(vol.address, "/ab/cd/s", iter(chunks), 200_050,
                    then=[Request("PUT", "/ab/cd/s.key", b"side")])
    assert (vol.root / "ab/cd/s").read_bytes() == b"".join(chunks)
    assert (vol.root / "ab/cd/s.key").read_bytes() == b"side"


def test_streamed_put_torn_by_its_source_or_short_leaves_no_file(volumes):
    pool = Pool(timeout=5)
    vol = volumes[0]

    class Broke(Exception):
        pass

    def torn():
        yield b"x" * 100_000
        raise Broke()

    with pytest.raises(Broke):
        pool.put_stream(vol.address, "/ab/cd/t", torn(), 200_000,
                        then=[Request("PUT", "/ab/cd/t.key", b"side")])
    with pytest.raises(ShortWrite):
        pool.put_stream(vol.address, "/ab/cd/u", iter([b"y" * 10]), 200_000,
                        then=[Request("PUT", "/ab/cd/u.key", b"side")])
    time.sleep(0.2)  # nginx notices the closed connection
    for name in ("t", "t.key", "u", "u.key"):
        assert not (vol.root / "ab/cd" / name).exists(), name
    # a refused volume is a VolumeError, not an OSError
    with pytest.raises(VolumeUnreachable):
        pool.put_stream(f"127.0.0.1:{free_port()}", "/ab/cd/v", iter([b"z"]), 1)


def test_streamed_puts_do_not_pile_up_idle_connections(volumes):
    pool = Pool(timeout=5, max_idle=3)
    vol = volumes[0]
    for i in range(10):
        pool.put_stream(vol.address, f"/ab/cd/p{i}", iter([b"p" * 10]), 10)
    assert pool.idle(vol.address) == 3
    assert (vol.root / "ab/cd/p9").read_bytes() == b"p" * 10
