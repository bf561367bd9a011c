"""`make run`: a local cluster in the foreground — three volumes and the service.

Each part is started with the operator's own commands (`mkv volume`, `mkv serve`),
so the local cluster exercises exactly what a deployment runs. Ctrl-C stops all.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mkv-devcluster", description=__doc__)
    p.add_argument("--dir", default="var", help="where volumes and the index live")
    p.add_argument("--port", type=int, default=3000, help="service port; volumes use the next ones")
    p.add_argument("--volumes", type=int, default=3, help="number of volumes")
    p.add_argument("--replicas", type=int, default=3)
    args = p.parse_args(argv)
    base = Path(args.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    mkv = [sys.executable, "-m", "mkv"]
    procs: list[subprocess.Popen] = []
    addresses = []
    try:
        for i in range(1, args.volumes + 1):
            port = args.port + i
            addresses.append(f"localhost:{port}")
            procs.append(subprocess.Popen(
                [*mkv, "volume", "--root", str(base / f"vol{i}"), "--port", str(port),
                 "--bind", "127.0.0.1"]))
        time.sleep(0.3)
        for proc in procs:
            if proc.poll() is not None:
                print("mkv-devcluster: a volume failed to start", file=sys.stderr)
                return 1
        serve = subprocess.Popen(
            [*mkv, "serve", "--volumes", ",".join(addresses), "--db", str(base / "index.db"),
             "--bind", "127.0.0.1", "--port", str(args.port),
             "--replicas", str(min(args.replicas, args.volumes)), "--workers", "2"])
        procs.append(serve)
        print(f"mkv: service on http://localhost:{args.port}, volumes {', '.join(addresses)}, "
              f"data in {base} (Ctrl-C stops)", file=sys.stderr)
        signal.signal(signal.SIGTERM, lambda *_: serve.send_signal(signal.SIGTERM))
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
        return 0 if serve.poll() == 0 else 1
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
