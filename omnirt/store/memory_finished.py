"""The memory store's finished jobs, out of the Python heap: one row each in a private SQLite table.

``sqlite3.connect("")`` opens a private temporary on-disk database: SQLite creates its file on
the first page it has to write out (in ``SQLITE_TMPDIR``, ``TMPDIR``, ``/var/tmp`` or ``/tmp``),
unlinks it at once (no other process can open it, and nothing is left behind even by a crash);
its space goes when the connection closes (``close``, or when the FinishedJobs is collected, or
the process ends). It is exactly as volatile as the memory store always was: no journal, no fsync; a crash or
a restart loses the finished jobs, as it always lost the memory store's jobs. A small page cache
(``CACHE_KIB``) bounds what SQLite keeps in RAM; the rest is the kernel's page cache, not the
gateway's heap. On disk the file takes about what the store's byte bound counts (``max_bytes``,
256 MiB by default): deleted rows' pages are reused, never vacuumed.

A row holds a finished job's packed bytes (omnirt.store.memory.pack) and the header fields the
store answers from without unpacking: state, model, tenant, idempotency key (and its
fingerprint), creation order (``list``'s order), finish order and time (retention, and the
oldest-first count and byte bounds), the artifact sha256s it references, its counted size. The
table is the index: nothing per finished job stays in Python. The ``refs`` table holds which jobs
reference which artifact (live and finished), so the last job naming a file releases it.

Every call is one or two statements by primary key or index (microseconds, on the reactor
thread); the only scan is ``referenced`` (the artifact sweep's distinct sha256s, at most once a
minute)."""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

__all__ = ["CACHE_KIB", "Dropped", "FinishedJobs", "FinishedRow"]

#: SQLite's page cache for the finished jobs (``PRAGMA cache_size``, KiB)
CACHE_KIB = 2048
#: rows the retention sweep deletes per statement
SWEEP_BATCH = 1000

_SCHEMA = """
CREATE TABLE jobs (
    fin INTEGER PRIMARY KEY,     -- finish order: the lowest is the oldest finished job
    id TEXT NOT NULL,
    created INTEGER NOT NULL,    -- creation order: list() answers newest created first
    finished_at REAL NOT NULL,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    tenant TEXT,
    idem TEXT,                   -- the idempotency key this job holds (NULL: none)
    idem_fp TEXT,
    outputs TEXT,                -- sha256s of the artifacts it references, space-separated
    size INTEGER NOT NULL,       -- what it counts towards max_bytes
    packed BLOB NOT NULL
);
CREATE UNIQUE INDEX jobs_id ON jobs (id);
CREATE INDEX jobs_created ON jobs (created);
CREATE INDEX jobs_state ON jobs (state, created);
CREATE INDEX jobs_model ON jobs (model, created);
CREATE INDEX jobs_tenant ON jobs (tenant, created);
CREATE INDEX jobs_finished_at ON jobs (finished_at);
CREATE INDEX jobs_idem ON jobs (idem) WHERE idem IS NOT NULL;
CREATE TABLE refs (
    sha256 TEXT NOT NULL,
    job_id TEXT NOT NULL,
    token INTEGER NOT NULL,      -- the artifact store's reference token
    PRIMARY KEY (sha256, job_id)
) WITHOUT ROWID;
"""


class FinishedRow(NamedTuple):
    """A finished job as read back: its header and its packed bytes."""

    id: str
    created: int
    state: str
    model: str
    tenant: str | None
    idempotency_key: str | None
    outputs: tuple[str, ...]
    size: int
    packed: bytes


class Dropped(NamedTuple):
    """A finished job deleted by a bound or the retention: what the store releases with it."""

    id: str
    outputs: tuple[str, ...]
    idempotency_key: str | None


def _outputs(text: str | None) -> tuple[str, ...]:
    return tuple(text.split()) if text else ()


class FinishedJobs:
    """The finished jobs' table (and the artifact references), with running totals."""

    def __init__(self, cache_kib: int = CACHE_KIB):
        self._db = sqlite3.connect("", isolation_level=None)  # autocommit: each statement stands alone
        for pragma in (f"cache_size=-{int(cache_kib)}", "journal_mode=OFF", "synchronous=OFF", "temp_store=FILE"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_SCHEMA)
        #: rows held
        self.count = 0
        #: the rows' sizes, summed
        self.bytes = 0
        #: rows that hold an idempotency key
        self.keys = 0

    # -- jobs ---------------------------------------------------------------------------------

    def add(self, job_id: str, *, created: int, finished_at: float, state: str, model: str, tenant: str | None,
            idempotency: tuple[str, str] | None, outputs: tuple[str, ...], size: int, packed: bytes) -> None:
        key, fingerprint = idempotency if idempotency is not None else (None, None)
        self._db.execute(
            "INSERT INTO jobs (id, created, finished_at, state, model, tenant, idem, idem_fp, outputs, size, packed)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, created, finished_at, state, model, tenant, key, fingerprint, " ".join(outputs) or None, size,
             packed))
        self.count += 1
        self.bytes += size
        self.keys += key is not None

    def rewrite(self, job_id: str, *, state: str, outputs: tuple[str, ...], size: int, packed: bytes) -> bool:
        """A finished job written to again; False when it is no longer here."""
        row = self._db.execute("SELECT size FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return False
        self._db.execute("UPDATE jobs SET state = ?, outputs = ?, size = ?, packed = ? WHERE id = ?",
                         (state, " ".join(outputs) or None, size, packed, job_id))
        self.bytes += size - row[0]
        return True

    def get(self, job_id: str) -> FinishedRow | None:
        row = self._db.execute("SELECT id, created, state, model, tenant, idem, outputs, size, packed FROM jobs"
                               " WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job_id, created, state, model, tenant, idem, outputs, size, packed = row
        return FinishedRow(job_id, created, state, model, tenant, idem, _outputs(outputs), size, packed)

    def __contains__(self, job_id: object) -> bool:
        return self._db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None

    def idempotency(self, key: str) -> tuple[str, str] | None:
        """(job id, fingerprint) of the finished job holding ``key``, or None."""
        row = self._db.execute("SELECT id, idem_fp FROM jobs WHERE idem = ? LIMIT 1", (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    def newest(self, *, state: str | None, model: str | None, tenant: str | None,
               limit: int) -> list[tuple[int, bytes]]:
        """(creation order, packed bytes) of up to ``limit`` matching jobs, newest created first."""
        where, args = [], []
        for column, value in (("state", state), ("model", model), ("tenant", tenant)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "SELECT created, packed FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._db.execute(sql + " ORDER BY created DESC LIMIT ?", (*args, max(0, limit))).fetchall()

    def _deleted(self, rows: list) -> list[Dropped]:
        out = []
        for job_id, outputs, idem, size in rows:
            self.count -= 1
            self.bytes -= size
            self.keys -= idem is not None
            out.append(Dropped(job_id, _outputs(outputs), idem))
        return out

    def pop_oldest(self) -> Dropped | None:
        """Delete the job that finished first (the count and byte bounds)."""
        rows = self._db.execute("DELETE FROM jobs WHERE fin = (SELECT MIN(fin) FROM jobs)"
                                " RETURNING id, outputs, idem, size").fetchall()
        return self._deleted(rows)[0] if rows else None

    def pop_expired(self, cutoff: float) -> list[Dropped]:
        """Delete every job that finished at or before ``cutoff``, oldest first."""
        out: list[Dropped] = []
        while True:
            rows = self._db.execute(
                "DELETE FROM jobs WHERE fin IN (SELECT fin FROM jobs WHERE finished_at <= ? ORDER BY fin LIMIT ?)"
                " RETURNING fin, id, outputs, idem, size", (cutoff, SWEEP_BATCH)).fetchall()
            rows.sort()
            out.extend(self._deleted([row[1:] for row in rows]))
            if len(rows) < SWEEP_BATCH:
                return out

    # -- artifact references ------------------------------------------------------------------

    def reference(self, sha256: str, job_id: str, token: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO refs (sha256, job_id, token) VALUES (?, ?, ?)",
                         (sha256, job_id, token))

    def release(self, sha256: str, job_id: str) -> int | None:
        """Drop ``job_id``'s reference to ``sha256``: its token when it was the last job naming
        it (the file may go), else None."""
        row = self._db.execute("DELETE FROM refs WHERE sha256 = ? AND job_id = ? RETURNING token",
                               (sha256, job_id)).fetchone()
        if row is None:
            return None
        others = self._db.execute("SELECT 1 FROM refs WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
        return None if others is not None else row[0]

    def referenced(self) -> set[str]:
        """Every sha256 some job references (the artifact sweep's keep-list: a scan)."""
        return {sha for (sha,) in self._db.execute("SELECT DISTINCT sha256 FROM refs")}

    def close(self) -> None:
        """Close the database: SQLite deletes its file."""
        self._db.close()
