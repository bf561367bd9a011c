"""The scrub's walk: every key of the index, in key order, a page at a time, each
mended with verification (Mender, md5 checked), so a copy whose bytes rotted is
replaced from a good one. Shared by mkv-scrub and the repair process's schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from mkv.index.reader import Reader
from mkv.repair.mender import Mender, Outcome, Result

PAGE = 200
BUSY_RETRIES = 5


def scrub(mender: Mender, reader: Reader, concurrency: int,
          on_result: Callable[[Result], None]) -> None:
    """Check every key (a key a client write holds is tried again a few times, then
    reported FAILED); stops early when the mender is interrupted."""
    busy: list[str] = []
    with ThreadPoolExecutor(concurrency, thread_name_prefix="scrub") as pool:
        for page in _pages(reader, mender):
            for result in pool.map(mender.mend, page):
                if result.outcome is Outcome.BUSY:
                    busy.append(result.key)
                elif result.outcome is not Outcome.STOPPED:
                    on_result(result)
    for attempt in range(BUSY_RETRIES):
        if not busy or mender.stopping.wait(0.2 * (attempt + 1)):
            return
        left = []
        for key in busy:
            result = mender.mend(key)
            if result.outcome is Outcome.BUSY:
                left.append(key)
            elif result.outcome is not Outcome.STOPPED:
                on_result(result)
        busy = left
    for key in busy:
        on_result(Result(key, Outcome.FAILED, "in use by a client write the whole time (locked)"))


def _pages(reader: Reader, mender: Mender) -> Iterator[list[str]]:
    after = ""
    while not mender.stopping.is_set():
        page = reader.scan(after, PAGE)
        if not page:
            return
        after = page[-1].key
        yield [r.key for r in page]
