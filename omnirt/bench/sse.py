"""An incremental server-sent-events parser (pure): bytes in, complete messages out."""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import re
from typing import Any

TERMINAL_EVENTS = frozenset({"job_finished", "job_failed", "job_cancelled"})

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclasses.dataclass(frozen=True)
class Message:
    """One SSE message: ``id``, ``event`` (default "message") and the joined ``data`` lines."""

    id: str | None
    event: str
    data: str

    @functools.cached_property
    def payload(self) -> dict[str, Any] | None:
        """``data`` as a JSON object (parsed once, on first use), or None when it is not one."""
        try:
            value = json.loads(self.data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @functools.cached_property
    def seq(self) -> int | None:
        """The job event's ``seq``: the SSE id, else the payload's ``seq``."""
        if self.id is not None:
            try:
                return int(self.id)
            except ValueError:
                pass
        value = (self.payload or {}).get("seq")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


class Parser:
    """Feed it chunks as they arrive; it returns the messages each chunk completed.

    Follows the HTML SSE rules that matter here: lines end in LF, CRLF or CR (also split across
    chunks, as are UTF-8 sequences); ``:`` starts a comment (``comments`` counts them); one space
    after the colon is dropped; a blank line dispatches; a message without data lines is dropped;
    the last ``id`` persists across messages.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._skip_lf = False
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []
        self.comments = 0

    def feed(self, chunk: bytes) -> list[Message]:
        text = self._decoder.decode(chunk)
        if self._skip_lf and text:
            if text.startswith("\n"):
                text = text[1:]
            self._skip_lf = False
        buffer = self._buffer + text
        out: list[Message] = []
        start = 0
        for match in _LINE_END.finditer(buffer):
            if match.group() == "\r" and match.end() == len(buffer):
                self._skip_lf = True  # maybe a CRLF cut in two: drop a leading LF next time
            message = self._line(buffer[start:match.start()])
            start = match.end()
            if message is not None:
                out.append(message)
        self._buffer = buffer[start:]
        return out

    def _line(self, line: str) -> Message | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            message = Message(self._id, self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return message
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def parse_events(body: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of every complete message of a whole SSE body, in order (a message whose
    data is not a JSON object is left out)."""
    return [m.payload for m in Parser().feed(body) if m.payload is not None]
