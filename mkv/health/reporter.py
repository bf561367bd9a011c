"""Failure reports from workers to the health process: fire-and-forget datagrams on a
socket beside the index, so a volume that fails mid-request counts as a failed probe at
once, not only at the next probe."""

from __future__ import annotations

import socket


def health_socket_path(db: str) -> str:
    """Datagram socket for failure reports, beside the index like the writer's."""
    return db + ".health.sock"


class FailureReporter:
    """Used by workers: fire-and-forget 'this volume just failed' datagrams."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def report(self, volume: str) -> None:
        try:
            self._sock.sendto(volume.encode(), self.path)
        except OSError:
            pass  # no health process listening: the next probe will tell
