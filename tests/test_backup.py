"""`mkv backup DEST`: an online copy of the index through SQLite's backup API.

Against a live `mkv serve` under a write load (a thread PUTting keys all the time): the
copy passes `PRAGMA integrity_check`, holds every key answered 201 before the backup
began, and its printed key count is the copy's. A backup paused between two steps shows
the copy is one snapshot while the service's writer goes on committing. Then the ways it
refuses: an existing DEST without --force (MKV_FORCE and a config file's `force` do not
count), a missing directory, the index itself, no index; and an interrupted backup
leaves nothing behind.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest
import requests

from mkv.model import State
from mkv.tools import backup as backup_mod
from mkv.tools.progress import Progress
from tests.helpers import REPO, TIMEOUT, kurl, wait_until
from tests.service import MkvService

SUMMARY = re.compile(r"^mkv backup: (?P<dest>\S+): (?P<keys>\d+) keys \((?P<live>\d+) live, "
                     r"(?P<unlinked>\d+) unlinked, (?P<deleting>\d+) deleting\), "
                     r"(?P<bytes>\d+) bytes of values .*; file (?P<file>\d+) bytes ", re.M)


def run_backup(*args: str, env: dict[str, str] | None = None,
               cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """`mkv backup` as an operator runs it, without the caller's MKV_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MKV_")}
    return subprocess.run([sys.executable, "-m", "mkv", "backup", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env={**base, **(env or {})})


def copy_rows(path: Path) -> dict[str, tuple[int, int]]:
    """key -> (state, size) of every row of a backup's `keys` table."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {k: (s, n) for k, s, n in conn.execute("SELECT key, state, size FROM keys")}
    finally:
        conn.close()


def integrity(path: Path) -> list[str]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".backup-" in p.name)


class WriteLoad:
    """A thread PUTting new keys to the service until stopped, recording each answer."""

    def __init__(self, svc: MkvService, prefix: str) -> None:
        self.svc = svc
        self.prefix = prefix
        self.sent: list[str] = []  # keys whose PUT has been started, in order
        self.acked: list[str] = []  # keys answered 201, in order
        self.failures: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="write-load", daemon=True)

    def _run(self) -> None:
        with requests.Session() as http:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                key = f"{self.prefix}/{i:06d}"
                self.sent.append(key)
                r = http.put(kurl(self.svc, key), data=key.encode() * 4, timeout=TIMEOUT)
                if r.status_code == 201:
                    self.acked.append(key)
                else:
                    self.failures.append((key, r.status_code))

    def __enter__(self) -> WriteLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)


@pytest.fixture
def load(shared_service: MkvService, request: pytest.FixtureRequest) -> Iterator[WriteLoad]:
    with WriteLoad(shared_service, f"/backup/{request.node.name}") as running:
        wait_until(lambda: len(running.acked) >= 30, TIMEOUT, "30 PUTs answered 201")
        yield running


# --- a live service under writes -------------------------------------------------------------


def test_backup_during_writes_holds_every_key_answered_before(
        shared_service: MkvService, load: WriteLoad, tmp_path: Path) -> None:
    conf = tmp_path / "mkv.conf"  # the same configuration file as the service's
    conf.write_text(f"db = {shared_service.db}\nvolumes = {','.join(shared_service.volumes)}\n")
    dest = tmp_path / "index-backup.db"
    before = list(load.acked)
    proc = run_backup("--config", str(conf), "--step-pages", "2", str(dest))
    during = len(load.acked) - len(before)
    assert proc.returncode == 0, proc.stderr

    copied = copy_rows(dest)
    assert integrity(dest) == ["ok"]
    missing = [k for k in before if k not in copied]
    assert not missing, f"{len(missing)} keys answered 201 before the backup are not in it"
    assert all(copied[k] == (int(State.LIVE), len(k) * 4) for k in before)
    printed = SUMMARY.search(proc.stdout)
    assert printed, proc.stdout
    assert printed["dest"] == str(dest)
    assert int(printed["keys"]) == len(copied)
    assert int(printed["bytes"]) == sum(size for _, size in copied.values())
    assert int(printed["file"]) == dest.stat().st_size
    assert not load.failures, load.failures[:5]
    assert leftovers(tmp_path) == []
    print(f"backup of {len(copied)} keys; {during} PUTs answered while `mkv backup` ran")


def test_the_copy_is_one_snapshot_while_the_writer_commits(
        shared_service: MkvService, load: WriteLoad, tmp_path: Path) -> None:
    """Paused after its first step until the service has answered 20 PUTs sent after that
    step: those are not in the copy, everything answered before the backup is, and the
    writer never waited. (Sent, not answered: a PUT answered mid-backup may have been
    committed before the snapshot.)"""
    before: list[str] = []
    during: list[str] = []

    def answered_since(mark: int) -> list[str]:
        acked = set(load.acked)
        return [k for k in load.sent[mark:] if k in acked]

    class PauseOnce(Progress):
        def show(self, line: str, force: bool = False) -> None:
            if not during:
                mark = len(load.sent)
                wait_until(lambda: len(answered_since(mark)) >= 20, TIMEOUT,
                           "20 PUTs sent and answered mid-backup")
                during.extend(answered_since(mark))

    before.extend(load.acked)
    dest = tmp_path / "snapshot.db"
    result = backup_mod.backup(Path(shared_service.db), dest, step_pages=1,
                               show=PauseOnce(sys.stderr, enabled=False))
    copied = copy_rows(dest)
    assert result.pages > 1  # so there was a step boundary to pause at
    assert [k for k in before if k not in copied] == []
    assert [k for k in during if k in copied] == []
    assert result.counts.keys == len(copied)
    assert integrity(dest) == ["ok"]
    assert not load.failures, load.failures[:5]


# --- what it refuses --------------------------------------------------------------------------


@pytest.fixture
def index(tmp_path: Path) -> Path:
    """A small index file, made by the schema code the service uses."""
    from mkv.index import schema

    path = tmp_path / "index.db"
    conn = schema.open_index(str(path))
    with conn:
        conn.executemany("INSERT INTO keys VALUES(?,?,?,?,?,?,?)",
                         ((f"/k{i}", int(State.LIVE), "127.0.0.1:1", i, "", 0.0, "")
                          for i in range(500)))
    conn.close()
    return path


def test_an_existing_dest_is_replaced_only_with_force(index: Path, tmp_path: Path) -> None:
    dest = tmp_path / "old.db"
    dest.write_bytes(b"yesterday's backup")
    refused = run_backup("--db", str(index), str(dest))
    assert refused.returncode == 2
    assert f"{dest} exists; pass --force to replace it" in refused.stderr
    assert dest.read_bytes() == b"yesterday's backup"

    forced = run_backup("--db", str(index), "--force", str(dest))
    assert forced.returncode == 0, forced.stderr
    assert len(copy_rows(dest)) == 500
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["environment", "config file"])
def test_force_from_the_environment_or_a_config_file_is_refused(
        index: Path, tmp_path: Path, where: str) -> None:
    dest = tmp_path / "old.db"
    dest.write_bytes(b"keep me")
    if where == "environment":
        proc = run_backup("--db", str(index), str(dest), env={"MKV_FORCE": "yes"})
        named = "MKV_FORCE"
    else:
        conf = tmp_path / "mkv.conf"
        conf.write_text(f"db = {index}\nforce = true\n")
        proc = run_backup("--config", str(conf), str(dest))
        named = "force"
    assert proc.returncode == 2
    assert "force: only on the command line (--force)" in proc.stderr and named in proc.stderr
    assert dest.read_bytes() == b"keep me"


def test_a_dest_in_a_missing_directory_is_a_clear_error(index: Path, tmp_path: Path) -> None:
    dest = tmp_path / "no" / "such" / "dir" / "backup.db"
    proc = run_backup("--db", str(index), str(dest))
    assert proc.returncode == 2
    assert f"directory {dest.parent} does not exist" in proc.stderr
    assert not (tmp_path / "no").exists()


def test_the_index_itself_is_never_a_dest(index: Path) -> None:
    before = copy_rows(index)
    proc = run_backup("--db", str(index), "--force", str(index))
    assert proc.returncode == 2
    assert "is the index itself" in proc.stderr
    assert copy_rows(index) == before


@pytest.mark.parametrize("content", [None, b"not sqlite at all, " * 100])
def test_no_index_at_db_is_a_usage_error(tmp_path: Path, content: bytes | None) -> None:
    db = tmp_path / "index.db"
    if content is not None:
        db.write_bytes(content)
    proc = run_backup("--db", str(db), str(tmp_path / "backup.db"))
    assert proc.returncode == 2
    assert str(db) in proc.stderr
    assert not (tmp_path / "backup.db").exists()
    assert leftovers(tmp_path) == []


def test_bad_step_pages_and_no_dest_are_usage_errors(index: Path, tmp_path: Path) -> None:
    assert run_backup("--db", str(index), "--step-pages", "0", str(tmp_path / "b.db")).returncode == 2
    missing = run_backup("--db", str(index))
    assert missing.returncode == 2
    assert "DEST" in missing.stderr


def test_an_interrupted_backup_leaves_no_half_file(index: Path, tmp_path: Path) -> None:
    class Interrupt(Progress):
        def show(self, line: str, force: bool = False) -> None:
            raise KeyboardInterrupt

    dest = tmp_path / "backup.db"
    with pytest.raises(KeyboardInterrupt):
        backup_mod.backup(index, dest, step_pages=1, show=Interrupt(sys.stderr, enabled=False))
    assert not dest.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: checks the files a root backup leaves")
def test_a_backup_run_by_root_leaves_the_index_files_to_their_owner(index: Path,
                                                                     tmp_path: Path) -> None:
    """Reading a WAL index creates its -wal and -shm when missing (service stopped)."""
    nobody = pwd.getpwnam("nobody")
    for path in (index, index.parent / "index.db-wal", index.parent / "index.db-shm"):
        if path.exists():
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    proc = run_backup("--db", str(index), str(tmp_path / "backup.db"))
    assert proc.returncode == 0, proc.stderr
    beside = [p for p in index.parent.iterdir() if p.name.startswith("index.db")]
    assert {p.name for p in beside} >= {"index.db-wal", "index.db-shm"}
    assert {p.name: p.stat().st_uid for p in beside} == {p.name: nobody.pw_uid for p in beside}
