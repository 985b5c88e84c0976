"""Content-addressed artifacts served at /v1/artifacts/{sha256}: files under ``--artifact-dir``
(one gateway), or bytes in Redis kept for the job retention (several gateways: any of them
serves any job's outputs, and no shared filesystem is assumed).

File reads and writes run on a thread pool (the reactor never does file I/O of unbounded size).

Files expire with the jobs that name them: the job store takes a ``reference`` when a job records
an output and ``discard``s it when the last job naming it is dropped; a put of the same bytes
after the reference was taken keeps the file (a newer job is about to name it). ``sweep`` removes
files no job names that are older than the retention (left by an earlier run, or put for a job
that never recorded them).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Collection, Iterable
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}
MIME_BY_EXT = {v: k for k, v in EXTENSIONS.items()}


class ArtifactStore:
    def __init__(self, directory: str | os.PathLike[str], reactor, threadpool: ThreadPool):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._reactor = reactor
        self._pool = threadpool
        #: sha256 -> how many times its bytes were put since a job last referenced them (guarded by
        #: ``_lock``, shared with the pool's threads): a discard only deletes a file that was not
        #: put again since its reference. ``reference`` takes the entry out, so this holds the
        #: bytes no job names yet, not one entry per file ever written
        self._generation: dict[str, int] = {}
        self._lock = threading.Lock()

    def _path(self, sha256: str, mime: str) -> Path:
        return self.directory / sha256[:2] / f"{sha256}{EXTENSIONS.get(mime, '.bin')}"

    def _write(self, blob: bytes, mime: str) -> tuple[str, str]:
        sha = hashlib.sha256(blob).hexdigest()
        path = self._path(sha, mime)
        with self._lock:  # a discard or sweep of this file either ran before, or leaves it alone
            self._generation[sha] = self._generation.get(sha, 0) + 1
            if path.exists():
                os.utime(path)  # fresh again: a sweep of old unreferenced files leaves it alone
                return sha, str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        with self._lock:
            os.replace(tmp, path)
        return sha, str(path)

    def put(self, blob: bytes, mime: str = "image/png"):
        """Deferred[(sha256, path)] once the bytes are on disk."""
        return deferToThreadPool(self._reactor, self._pool, self._write, blob, mime)

    # -- expiry (driven by the job store) ----------------------------------------------------

    def reference(self, sha256: str) -> int:
        """A token for a job that now names ``sha256`` (call after the put it records): the puts
        before it are forgotten; a put after it makes a later discard keep the file."""
        # one dict operation: atomic, no need to wait for a writer (a put racing it only leaves
        # an entry behind: the file is then kept, and swept once no job names it)
        return self._generation.pop(sha256, 0)

    def discard(self, refs: Iterable[tuple[str, int]]):
        """Deferred[int]: delete each ``(sha256, token)`` file no one put again since its
        token was taken; fires with how many files were deleted."""
        refs = list(refs)
        return deferToThreadPool(self._reactor, self._pool, self._discard, refs)

    def _discard(self, refs: list[tuple[str, int]]) -> int:
        deleted = 0
        for sha, _token in refs:
            with self._lock:
                if sha in self._generation:
                    continue  # put again since the reference: a newer job is about to name it
                found = self.find(sha)
                if found is not None:
                    found[0].unlink(missing_ok=True)
                    deleted += 1
        return deleted

    def sweep(self, referenced: Collection[str], older_than_s: float):
        """Deferred[int]: delete files that no sha256 in ``referenced`` names and that were not
        written or put again within ``older_than_s`` seconds; fires with how many were deleted."""
        return deferToThreadPool(self._reactor, self._pool, self._sweep, frozenset(referenced), older_than_s)

    def _sweep(self, referenced: frozenset[str], older_than_s: float) -> int:
        cutoff = time.time() - older_than_s  # file times are wall-clock times
        deleted = 0
        for folder in self.directory.iterdir() if self.directory.is_dir() else ():
            if not folder.is_dir() or len(folder.name) != 2:
                continue
            for path in folder.iterdir():
                sha = path.name.split(".", 1)[0]
                if not SHA256_RE.match(sha) or sha in referenced:
                    continue
                with self._lock:
                    try:
                        if path.stat().st_mtime >= cutoff:
                            continue
                        path.unlink()
                    except FileNotFoundError:
                        continue
                    self._generation.pop(sha, None)
                    deleted += 1
        return deleted

    def find(self, sha256: str) -> tuple[Path, str] | None:
        """(path, mime) of a stored artifact, or None. ``sha256`` must be 64 lowercase hex."""
        if not SHA256_RE.match(sha256):
            return None
        folder = self.directory / sha256[:2]
        for ext, mime in MIME_BY_EXT.items():
            path = folder / f"{sha256}{ext}"
            if path.exists():
                return path, mime
        bin_path = folder / f"{sha256}.bin"
        if bin_path.exists():
            return bin_path, "application/octet-stream"
        return None

    def get(self, sha256: str):
        """Deferred[(bytes, mime) | None]."""
        found = self.find(sha256)
        if found is None:
            return succeed(None)
        path, mime = found
        return deferToThreadPool(self._reactor, self._pool, lambda: (path.read_bytes(), mime))

    def read(self, sha256: str):
        """Deferred[bytes | None]."""
        return self.get(sha256).addCallback(lambda found: None if found is None else found[0])


class RedisArtifactStore:
    """Artifacts as Redis values next to the jobs (same retention), for several gateways."""

    def __init__(self, store):
        self._store = store

    @property
    def job_store(self):
        """The job store holding the bytes (its ``transition`` may put outputs with an outcome)."""
        return self._store

    def put(self, blob: bytes, mime: str = "image/png"):
        sha = hashlib.sha256(blob).hexdigest()

        async def put():
            await self._store.put_artifact(sha, mime, blob)
            return sha, ""

        return Deferred.fromCoroutine(put())

    def get(self, sha256: str):
        if not SHA256_RE.match(sha256):
            return succeed(None)
        return Deferred.fromCoroutine(self._store.get_artifact(sha256))

    def read(self, sha256: str):
        return self.get(sha256).addCallback(lambda found: None if found is None else found[0])
