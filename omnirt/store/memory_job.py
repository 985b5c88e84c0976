"""One job of the memory store: live (pydantic objects) or finished (ONE packed ``bytes``), and
the id -> job lookup over the live jobs' dict and the finished jobs' table (memory_finished)."""

from __future__ import annotations

import struct
import sys
import zlib

from pydantic import TypeAdapter

from omnirt.contract import JobEvent, JobRecord, JobState
from omnirt.store.memory_finished import FinishedJobs, FinishedRow

__all__ = ["MemoryJob", "MemoryJobs", "pack", "unpack_events", "unpack_record"]

_EVENTS = TypeAdapter(list[JobEvent])
_LEN = struct.Struct("<I")


def pack(record: JobRecord, events: list[JobEvent]) -> bytes:
    head = zlib.compress(record.model_dump_json(exclude={"events"}).encode(), 1)
    tail = zlib.compress(_EVENTS.dump_json(events), 1)
    return _LEN.pack(len(head)) + head + tail


def unpack_record(blob: bytes) -> JobRecord:
    (n,) = _LEN.unpack_from(blob)
    return JobRecord.model_validate_json(zlib.decompress(blob[4:4 + n]))


def unpack_events(blob: bytes) -> list[JobEvent]:
    (n,) = _LEN.unpack_from(blob)
    return _EVENTS.validate_json(zlib.decompress(blob[4 + n:]))


class MemoryJob:
    """One job: live (``record`` + ``events`` objects) or, once finished, ``packed`` bytes (read
    back from the finished jobs' table: ``stored``); the header (state, model, tenant) answers
    ``list`` filters without unpacking."""

    __slots__ = ("_record", "_events", "packed", "state", "model", "tenant", "idempotency_key", "marks",
                 "outputs", "created", "finished_at", "stored")

    def __init__(self, record: JobRecord, created: int = 0):
        self._record: JobRecord | None = record
        self._events: list[JobEvent] | None = []
        self.packed: bytes | None = None
        #: creation order (list's order)
        self.created = created
        #: when it became terminal (clock seconds), None while live
        self.finished_at: float | None = None
        #: True: read back from the finished jobs' table (a write goes back there)
        self.stored = False
        self.state = record.state
        self.model = sys.intern(record.request.model)  # one string per model, not per job
        self.tenant = sys.intern(record.tenant) if record.tenant else None
        self.idempotency_key = record.idempotency_key
        #: attempt -> the highest worker event index stored (append_worker_event)
        self.marks: dict[int, int] | None = None
        #: sha256 of the artifacts this job references in the artifact store (its outputs and the
        #: step previews its events announce): kept beside the packed bytes, so dropping a job
        #: releases them without unpacking it
        self.outputs: tuple[str, ...] = ()

    @classmethod
    def finished(cls, row: FinishedRow) -> MemoryJob:
        """A finished job as its row holds it (packed)."""
        job = cls.__new__(cls)
        job._record = job._events = job.marks = job.finished_at = None
        job.packed = row.packed
        job.state = JobState(row.state)
        job.model = row.model
        job.tenant = row.tenant
        job.idempotency_key = row.idempotency_key
        job.outputs = row.outputs
        job.created = row.created
        job.stored = True
        return job

    @property
    def record(self) -> JobRecord:
        if self._record is not None:
            return self._record
        assert self.packed is not None
        return unpack_record(self.packed)

    @record.setter
    def record(self, record: JobRecord) -> None:
        self.thaw()
        self._record = record
        self.state = record.state

    @property
    def events(self) -> list[JobEvent]:
        """The events (a fresh list when packed: read it, do not append to it)."""
        if self._events is not None:
            return self._events
        assert self.packed is not None
        return unpack_events(self.packed)

    def thaw(self) -> None:
        """Back to objects (before a write)."""
        if self.packed is not None:
            self._record = unpack_record(self.packed)
            self._events = unpack_events(self.packed)
            self.packed = None

    def freeze(self) -> int:
        """To packed bytes; returns their size."""
        if self.packed is None:
            assert self._record is not None and self._events is not None
            self.packed = pack(self._record, self._events)
            self._record = None
            self._events = None
            self.marks = None  # a finished job takes no more worker events
        return len(self.packed)


class MemoryJobs:
    """Job id -> MemoryJob: the live jobs in a dict (creation order), the finished ones read back from
    their table (a fresh packed MemoryJob per lookup)."""

    def __init__(self, finished: FinishedJobs):
        self.live: dict[str, MemoryJob] = {}
        self._finished = finished

    def get(self, job_id: str) -> MemoryJob | None:
        job = self.live.get(job_id)
        if job is not None:
            return job
        row = self._finished.get(job_id)
        return None if row is None else MemoryJob.finished(row)

    def __getitem__(self, job_id: str) -> MemoryJob:
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.live or job_id in self._finished

    def __len__(self) -> int:
        return len(self.live) + self._finished.count
