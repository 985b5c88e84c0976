"""Content-addressed artifacts served at /v1/artifacts/{sha256}: files under ``--artifact-dir``
(one gateway), or bytes in Redis kept for the job retention (several gateways: any of them
serves any job's outputs, and no shared filesystem is assumed).

File reads and writes run on a thread pool (the reactor never does file I/O of unbounded size).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
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

    def _path(self, sha256: str, mime: str) -> Path:
        return self.directory / sha256[:2] / f"{sha256}{EXTENSIONS.get(mime, '.bin')}"

    def _write(self, blob: bytes, mime: str) -> tuple[str, str]:
        sha = hashlib.sha256(blob).hexdigest()
        path = self._path(sha, mime)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        return sha, str(path)

    def put(self, blob: bytes, mime: str = "image/png"):
        """Deferred[(sha256, path)] once the bytes are on disk."""
        return deferToThreadPool(self._reactor, self._pool, self._write, blob, mime)

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
