"""Process logs of ``serve`` and ``worker``: text (default) or one JSON object per line (``--log-format json``).

Both Twisted's log events (``twisted.logger``, legacy ``twisted.python.log`` included) and the
standard ``logging`` module go to one stream in one format. A JSON line carries ``timestamp``
(UTC, ISO 8601), ``level``, ``logger``, ``message`` and, where known, ``job_id`` and ``trace_id``:
from the event's own keys (``log.info("...", job_id=...)`` / ``extra={"job_id": ...}``), else from a
job id named in the message (``job <32 hex digits>``), with the trace id looked up by job id.
Twisted's "Starting factory" / "Stopping factory" chatter is dropped in both formats.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import implementer

__all__ = ["FORMATS", "MAX_MESSAGE_CHARS", "JsonLogObserver", "JsonFormatter", "cap_log_messages", "cap_text",
           "install_logging", "quiet_factories"]

#: longest log message written; the rest is replaced by a note of how much was cut (a 20,000-word
#: prompt echoed by a library warning must not become a 200 KB log line)
MAX_MESSAGE_CHARS = 2000

FORMATS = ("text", "json")
TraceLookup = Callable[[str], "str | None"]

_JOB_IN_TEXT = re.compile(r"\bjob[ _:=]+([0-9a-f]{32})\b")
_NOISY = ("Starting factory", "Stopping factory")
_EXTRA_KEYS = ("job_id", "trace_id", "worker_id", "gateway_id", "attempt", "state")


def quiet_factories(event: dict[str, Any]) -> PredicateResult:
    """Drop Twisted's per-connection "Starting factory ..." / "Stopping factory ..." lines."""
    fmt = event.get("log_format")
    if isinstance(fmt, str) and fmt.startswith(_NOISY):
        return PredicateResult.no
    message = event.get("message")
    if message and isinstance(message, tuple) and isinstance(message[0], str) and message[0].startswith(_NOISY):
        return PredicateResult.no
    return PredicateResult.maybe


def cap_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters not logged]"


_capped_factory_installed = False


def cap_log_messages(limit: int = MAX_MESSAGE_CHARS) -> None:
    """Cap every stdlib log record's message at ``limit`` characters, whichever handler writes it
    (diffusers and transformers keep handlers of their own), by wrapping the record factory; once
    per process."""
    global _capped_factory_installed
    if _capped_factory_installed:
        return
    _capped_factory_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string stays the logging module's business
            return record
        if len(message) > limit:
            record.msg, record.args = cap_text(message, limit), None
        return record

    logging.setLogRecordFactory(factory)


def _capped(observer: ILogObserver, limit: int = MAX_MESSAGE_CHARS) -> Callable[[dict[str, Any]], None]:
    """A twisted.logger observer that hands ``observer`` events whose text is capped."""

    def observe(event: dict[str, Any]) -> None:
        try:
            text = formatEvent(event) or ""
        except Exception:  # noqa: BLE001
            text = ""
        if len(text) > limit:
            event = {k: v for k, v in event.items() if k not in ("format", "message")}
            event["log_format"] = "{capped_text}"
            event["capped_text"] = cap_text(text, limit)
        observer(event)

    return observe


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ids(message: str, given: dict[str, Any], trace_lookup: TraceLookup | None) -> dict[str, str]:
    out: dict[str, str] = {}
    job_id = given.get("job_id")
    if not job_id:
        match = _JOB_IN_TEXT.search(message)
        job_id = match.group(1) if match else None
    if job_id:
        out["job_id"] = str(job_id)
    trace_id = given.get("trace_id")
    if not trace_id and job_id and trace_lookup is not None:
        try:
            trace_id = trace_lookup(str(job_id))
        except Exception:  # noqa: BLE001 - a log line never fails
            trace_id = None
    if trace_id:
        out["trace_id"] = str(trace_id)
    return out


def _namespace(event: dict[str, Any]) -> str:
    namespace = event.get("log_namespace") or "-"
    if namespace == "log_legacy":  # twisted.python.log.msg/err: say where from, if it says
        system = event.get("log_system") or event.get("system")
        return f"legacy:{system}" if system and system != "-" else "legacy"
    return namespace


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), default=str, ensure_ascii=False)


@implementer(ILogObserver)
class JsonLogObserver:
    """A twisted.logger observer writing one JSON object per event."""

    def __init__(self, stream: IO[str], trace_lookup: TraceLookup | None = None, lock: threading.Lock | None = None):
        self.stream = stream
        self.trace_lookup = trace_lookup
        self._lock = lock or threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        message = formatEvent(event) or ""
        level = event.get("log_level", LogLevel.info)
        if event.get("isError") and level == LogLevel.info:
            level = LogLevel.error
        record: dict[str, Any] = {
            "timestamp": _iso(event.get("log_time") or 0.0),
            "level": getattr(level, "name", str(level)),
            "logger": _namespace(event),
            "message": message,
        }
        given = {k: event[k] for k in _EXTRA_KEYS if event.get(k) is not None}
        record.update(given)
        record.update(_ids(message, given, self.trace_lookup))
        failure = event.get("log_failure") or event.get("failure")
        if failure is not None:
            try:
                record["exception"] = failure.getTraceback()
            except Exception:  # noqa: BLE001
                record["exception"] = repr(failure)
        line = _json_line(record) + "\n"
        with self._lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass


class JsonFormatter(logging.Formatter):
    """The stdlib side of the JSON format (same keys as ``JsonLogObserver``)."""

    def __init__(self, trace_lookup: TraceLookup | None = None):
        super().__init__()
        self.trace_lookup = trace_lookup

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "timestamp": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        given = {k: getattr(record, k) for k in _EXTRA_KEYS if getattr(record, k, None) is not None}
        out.update(given)
        out.update(_ids(message, given, self.trace_lookup))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _json_line(out)


class _TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def install_logging(fmt: str = "text", *, stream: IO[str] | None = None, trace_lookup: TraceLookup | None = None,
                    level: int = logging.INFO) -> None:
    """Send Twisted's and the stdlib's log events to ``stream`` (stderr) in ``fmt``; call once,
    early, from the command that owns the process."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (one of: {', '.join(FORMATS)})")
    stream = stream or sys.stderr
    lock = threading.Lock()
    if fmt == "json":
        observer = JsonLogObserver(stream, trace_lookup, lock)
        formatter: logging.Formatter = JsonFormatter(trace_lookup)
    else:
        observer = textFileLogObserver(stream)
        formatter = _TextFormatter()
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(_capped(observer), [quiet_factories])],
                                     redirectStandardIO=False, discardBuffer=False)
    cap_log_messages()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
