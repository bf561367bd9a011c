"""Volume identity: the marker file at the root of every disk of a volume, and the pure
decision of what a marker found there means (docs/design.md, "Self-healing").

The marker is `mkv-volume.json` beside the two-hex-char blob directories, so the
volume's nginx serves it by GET like a blob (any non-dot file under a disk root) and
mkv-rebuild, which reads only the blob directories, never takes it for one. Its id is
random: a disk holds the blobs of the index whose expected id it carries, and an empty
disk put in its place (a replaced one) has no marker or another id.
"""

from __future__ import annotations

import enum
import json
import os
import uuid
from pathlib import Path

MARKER = "mkv-volume.json"
MARKER_PATH = "/" + MARKER


class BadMarker(ValueError):
    """The marker's bytes are not a marker: handled as a marker of an unknown disk."""


def new_id() -> str:
    return uuid.uuid4().hex


def marker_body(vid: str) -> bytes:
    return json.dumps({"mkv_volume_id": vid}).encode() + b"\n"


def parse_marker(body: bytes) -> str:
    try:
        vid = json.loads(body)["mkv_volume_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BadMarker(f"not a volume marker: {body[:80]!r}") from exc
    if not isinstance(vid, str) or not vid:
        raise BadMarker(f"not a volume marker: {body[:80]!r}")
    return vid


def ensure_marker(root: str | os.PathLike) -> str:
    """The id in `root`'s marker, made first if there is none (`mkv volume` on start).
    An existing marker is never rewritten; one that cannot be read is an error."""
    path = Path(root) / MARKER
    try:
        return parse_marker(path.read_bytes())
    except FileNotFoundError:
        pass
    vid = new_id()
    tmp = path.with_name(f".{MARKER}.tmp")
    tmp.write_bytes(marker_body(vid))
    try:
        os.link(tmp, path)  # fails if another start made one meanwhile: that one stands
    except FileExistsError:
        return parse_marker(path.read_bytes())
    finally:
        tmp.unlink()
    return vid


class Identity(enum.Enum):
    SAME = "same"          # the disk the index knows
    ADOPT = "adopt"        # the index knows no id for it yet: record the one found
    CREATE = "create"      # no id known and no marker: mkv makes one, then records it
    REPLACED = "replaced"  # missing or another id: reads stop, its keys are repaired


def identity(expected: str | None, found: str | None) -> Identity:
    """What the marker found on a volume (None: none there) means, given the id the
    index expects (None: never recorded)."""
    if expected is None:
        return Identity.CREATE if found is None else Identity.ADOPT
    return Identity.SAME if found == expected else Identity.REPLACED
