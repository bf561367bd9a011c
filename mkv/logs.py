"""One log format for every mkv process: the service (gunicorn's master and workers,
its access log), the writer, the health process.

`setup(level, fmt, process)` gives the root logger one handler on stderr, so every
process started by `mkv serve` writes the same lines into the same stream:

- text: `2025-01-02T03:04:05.678Z [pid] [process/logger] LEVEL message rid=<id>`, the
  `rid=` only on lines about a client request;
- json: one object per line, `{"time", "level", "pid", "process", "logger", "message"}`,
  plus `request_id` on lines about a client request, the fields of a structured record
  (the access log's), and `exc` with the traceback when there is one.

Times are UTC. The request id comes from mkv.context, read by a logging.Filter on each
handler when the line is logged, in the thread that logs it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import threading
import time
from types import TracebackType
from typing import Any, TextIO

from mkv import context

FORMATS = ("text", "json")

#: What this process is, in every line: serve, worker, writer, health...
_process = {"name": "mkv"}


def set_process_name(name: str) -> None:
    """Name the process in the lines it logs from now on (a worker, once forked)."""
    _process["name"] = name


#: (second, its text): the last second formatted, shared by the threads (a tuple is
#: replaced whole, never changed), since strftime costs more than the rest of a line.
_second: tuple[int, str] = (-1, "")


def utc_time(created: float) -> str:
    """ISO 8601 in UTC with milliseconds: sorts as text, reads the same on every host."""
    global _second
    whole, millis = divmod(round(created * 1000), 1000)  # to the nearest: 0.678 is 0.67799..
    second, text = _second
    if second != whole:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{millis:03d}Z"


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` to the current client request's id (None outside one),
    so every formatter, mkv's or one an operator configures, can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = context.current_id()
        return True


class TextFormatter(logging.Formatter):
    """One human-readable line; a traceback, if any, on the lines below it."""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{utc_time(record.created)} [{record.process}] [{_process['name']}/{record.name}] "
                f"{record.levelname} {record.getMessage()}")
        request_id = getattr(record, "request_id", None)
        if request_id:
            line += f" rid={request_id}"
        trace = self.trace(record)
        return f"{line}\n{trace}" if trace else line

    def trace(self, record: logging.LogRecord) -> str:
        parts = []
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(record.exc_text)
        if record.stack_info:
            parts.append(self.formatStack(record.stack_info))
        return "\n".join(parts)


class JsonFormatter(TextFormatter):
    """One JSON object per line, whatever the message holds (newlines are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": utc_time(record.created),
            "level": record.levelname,
            "pid": record.process,
            "process": _process["name"],
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            out["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update((k, v) for k, v in fields.items() if k not in out)
        trace = self.trace(record)
        if trace:
            out["exc"] = trace
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def handler(target: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler in mkv's format: `-` is stderr (or `stream`), anything else a file
    reopened when logrotate moves it away (WatchedFileHandler)."""
    out: logging.Handler
    if target == "-":
        out = logging.StreamHandler(stream or sys.stderr)
    else:
        out = logging.handlers.WatchedFileHandler(target, encoding="utf-8")
    out.setFormatter(formatter(fmt))
    out.addFilter(RequestIdFilter())
    out._mkv = True  # type: ignore[attr-defined] # so a second setup replaces it
    return out


def replace_handlers(logger: logging.Logger, new: logging.Handler | None) -> None:
    """Remove (and close) the handlers mkv put on `logger` before, then add `new`."""
    for old in list(logger.handlers):
        if getattr(old, "_mkv", False):
            logger.removeHandler(old)
            old.close()
    if new is not None:
        logger.addHandler(new)


def setup(level: str, fmt: str, process: str, stream: TextIO | None = None) -> None:
    """This process logs at `level` in format `fmt` to stderr (or `stream`), naming
    itself `process`. Safe to call again (gunicorn's reload does): it replaces its own
    handler and leaves other handlers alone. Warnings and uncaught exceptions go
    through logging too, so in json every line the process writes is JSON."""
    set_process_name(process)
    root = logging.getLogger()
    replace_handlers(root, handler("-", fmt, stream))
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught


def _log_uncaught(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("mkv").critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("mkv").error("uncaught exception in thread %s", name,
                                   exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
