"""Volume identity (mkv.identity), the replaced state in the pure core, and the pieces of
the repair process that are pure: unit tests, no volumes."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mkv import cli, core, identity
from mkv.config import Config
from mkv.core import Health
from mkv.identity import Identity
from mkv.model import HealthRow, Record, State
from mkv.repair.process import RETRY_CAP, retry_after
from mkv.repair.settings import from_settings, settings


def test_a_marker_is_made_once_and_never_rewritten(tmp_path):
    vid = identity.ensure_marker(tmp_path)
    assert identity.ensure_marker(tmp_path) == vid
    assert identity.parse_marker((tmp_path / identity.MARKER).read_bytes()) == vid
    assert [p.name for p in tmp_path.iterdir()] == [identity.MARKER]  # no temporary left


def test_an_unreadable_marker_is_an_error_not_replaced(tmp_path):
    (tmp_path / identity.MARKER).write_bytes(b"not json")
    with pytest.raises(identity.BadMarker):
        identity.ensure_marker(tmp_path)
    assert (tmp_path / identity.MARKER).read_bytes() == b"not json"
    with pytest.raises(identity.BadMarker):
        identity.parse_marker(b'{"mkv_volume_id": ""}')


def test_mkv_volume_marks_every_disk_before_nginx_starts(tmp_path):
    disks = [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]
    assert cli.mark_disks(argparse.Namespace(root=None, disk=disks)) is None
    ids = {identity.ensure_marker(tmp_path / n) for n in "ab"}
    assert len(ids) == 2  # one identity per disk
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / identity.MARKER).write_bytes(b"garbage")
    problem = cli.mark_disks(argparse.Namespace(root=str(tmp_path / "c"), disk=[]))
    assert problem is not None and "volume id" in problem


@pytest.mark.parametrize(("expected", "found", "verdict"), [
    (None, None, Identity.CREATE),
    (None, "x", Identity.ADOPT),
    ("x", "x", Identity.SAME),
    ("x", None, Identity.REPLACED),
    ("x", "y", Identity.REPLACED),
])
def test_what_a_marker_means(expected, found, verdict):
    assert identity.identity(expected, found) is verdict


def row(vol, up=True, replaced=False, checked=100.0):
    return HealthRow(vol, up, checked, 0.0, 1.0, None, replaced)


def test_a_replaced_volume_takes_writes_but_no_reads():
    health = core.health_status({"a:1": row("a:1", replaced=True), "b:2": row("b:2"),
                                 "c:3": row("c:3", up=False, replaced=True)}, 100.0, 5.0)
    assert health == {"a:1": Health.REPLACED, "b:2": Health.UP, "c:3": Health.DOWN}
    assert core.usable("a:1", health) and not core.readable("a:1", health)
    rec = Record("/k", State.LIVE, ("a:1", "b:2"), 1, "m", 1.0)
    for spread in range(4):
        target = core.read_target("/k", rec, health, spread=spread)
        assert isinstance(target, core.Redirect) and target.volume == "b:2"
    # only replaced copies: nothing to read from, though the volume answers
    only = dataclasses.replace(rec, volumes=("a:1",))
    assert isinstance(core.read_target("/k", only, health), core.Unavailable)
    # and a stale row says nothing: unknown, as before
    assert core.health_status({"a:1": row("a:1", replaced=True, checked=0.0)}, 100.0, 5.0) == {
        "a:1": Health.UNKNOWN}


def test_failed_repairs_wait_longer_each_time_up_to_a_cap():
    waits = [retry_after(n) for n in range(12)]
    assert waits == sorted(waits) and waits[0] > 0 and waits[-1] == RETRY_CAP


def test_the_repair_process_gets_the_configuration_without_secrets():
    cfg = Config(volumes=("a:1", "b:2"), replicas=2, db="/x/i.db", weights=(("a:1", 2.0),),
                 domains=(("a:1", "z1", "h1"), ("b:2", "z2", "h2")), redirect_secret="s" * 32,
                 api_tokens_file="/etc/tokens", repair_rate=5.0, scrub_interval=60.0)
    text = settings(cfg)
    assert "s" * 32 not in text and "/etc/tokens" not in text
    back = from_settings(text)
    assert back == dataclasses.replace(cfg, redirect_secret="", api_tokens_file="")
    assert back.ring().place("/k", 2) == cfg.ring().place("/k", 2)
