"""How job records and events are written to and read from Redis hashes, streams and Lua replies."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import to_jsonable_python

from omnirt.contract import JobEvent, JobRecord, JobState
from omnirt.store.base import NewEvent

_RECORD_FIELDS = frozenset(name for name in JobRecord.model_fields if name != "events")
STATE_NAMES = tuple(s.value for s in JobState)


@cache
def _adapter(field: str) -> TypeAdapter:
    return TypeAdapter(JobRecord.model_fields[field].annotation)


def encode_fields(fields: dict[str, Any] | None) -> list[str]:
    """``[name, json, ...]`` for a partial update; each value validated against JobRecord."""
    out: list[str] = []
    for name, value in (fields or {}).items():
        if name not in _RECORD_FIELDS or name in ("id", "state"):
            raise ValueError(f"cannot set job field {name!r}")
        adapter = _adapter(name)
        out += [name, adapter.dump_json(adapter.validate_python(value)).decode()]
    return out


def arr(value: Any) -> list:
    """A Lua array from cjson (an empty one arrives as ``{}``)."""
    return value if isinstance(value, list) else []


def unpack(reply: Any) -> Any:
    return None if reply is None else json.loads(reply)


def _pairs(flat: list) -> dict[str, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def decode_record(flat: list) -> JobRecord:
    h = _pairs(flat)
    data: dict[str, Any] = {k: json.loads(v) for k, v in h.items() if k in _RECORD_FIELDS and k != "state"}
    data["state"] = h["state"]
    return JobRecord.model_validate(data)


def encode_event(event: NewEvent, timestamp_ms: int) -> str:
    return json.dumps(
        {"event": event.event, "stage": event.stage, "timestamp_ms": timestamp_ms, "data": event.data},
        separators=(",", ":"), default=to_jsonable_python,
    )


def decode_entry(entry: list) -> list[JobEvent]:
    """The events of one stream entry, in order: an ``e`` field per event, the entry's id the
    seq of the last one (a burst of a job's events is one entry)."""
    entry_id, fields = entry[0], arr(entry[1])
    bodies = [json.loads(value) for name, value in zip(fields[::2], fields[1::2], strict=True) if name == "e"]
    last = int(str(entry_id).split("-", 1)[0])
    first = last - len(bodies) + 1
    return [JobEvent(seq=first + i, **body) for i, body in enumerate(bodies)]


def csv(values) -> str:
    """``,a,b,`` — the form the Lua scripts search with ``string.find(list, ',' .. x .. ',')``."""
    return "," + ",".join(values) + ","
