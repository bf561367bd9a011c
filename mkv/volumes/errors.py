"""Every way a volume request can fail, as a few exception classes: callers decide by
type (and charge the volume's health) instead of parsing messages. The one translation
from socket and HTTP failures to these lives in mkv.volumes.pool."""

from __future__ import annotations


class VolumeError(Exception):
    """A volume request failed. `volume` is the one to blame."""

    def __init__(self, volume: str, detail: str) -> None:
        super().__init__(f"{volume}: {detail}")
        self.volume = volume
        self.detail = detail


class VolumeUnreachable(VolumeError):
    """Connection refused or reset: the volume is not there."""


class VolumeTimeout(VolumeError):
    """The volume accepted but did not answer in time."""


class VolumeStatus(VolumeError):
    """The volume answered with a status the operation does not allow."""

    def __init__(self, volume: str, status: int, method: str, path: str) -> None:
        super().__init__(volume, f"{method} {path} answered {status}")
        self.status = status


class ShortWrite(VolumeError):
    """The body source ended before the announced length (a torn upload)."""


class UploadAborted(Exception):
    """The caller gave up on a streamed upload (client gone, another replica failed)."""
