"""The freeze reproduction: how many keys keep a copy on some volume after DELETE.

    python -m bench.orphans

Four volumes, R=2; one volume is frozen (SIGSTOP) past volume-timeout while six keys
that the ring places on it are PUT by four clients, so each PUT re-places that replica.
The frozen nginx finishes the uploads it had taken in once it resumes (SIGCONT). Then
every key is DELETEd, and the volumes' disks are searched for any copy left. Before
intents and pending operations, most keys kept a copy that a rebuild brought back.
"""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import requests

from bench.localcluster import local_cluster
from mkv.config import Config
from tests.helpers import FAST_HEALTH, body_for, disk_files, put, volume_status, wait_until


def main() -> None:
    with local_cluster(4, replicas=2, extra=FAST_HEALTH) as (vols, svc):
        frozen = vols[0]
        ring = Config(volumes=tuple(v.address for v in vols)).ring()
        keys = [k for k in (f"/freeze/{i}" for i in range(10000)) if frozen.address in ring.place(k, 2)][:6]
        os.killpg(frozen.proc.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(lambda k: put(svc, k, body_for(k)).status_code, keys))
        finally:
            os.killpg(frozen.proc.pid, signal.SIGCONT)
        wait_until(lambda: volume_status(svc, frozen.address) == "up", 15, "up")
        time.sleep(5)
        for k in keys:
            requests.delete(svc.url + quote(k), timeout=10)
        time.sleep(3)
        left = [k for k in keys if disk_files(vols, k)]
        print(f"codes {codes}; keys with copies left after DELETE: {len(left)} of {len(keys)}")


if __name__ == "__main__":
    main()
