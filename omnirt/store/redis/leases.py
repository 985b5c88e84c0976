"""The Redis store's gateway leases, adoption and artifacts (scripts ``lua/lease.lua``,
``live.lua``, ``orphans.lua``, ``adopt.lua``, ``identity.lua``).

The keys (``lease:*``, ``store:id``, ``artifact:{sha256}``) are in the package docstring.
"""

from __future__ import annotations

import base64
import uuid

from twisted.python import log

from omnirt.contract import JobState
from omnirt.store.redis.codec import arr, csv, unpack

__all__ = ["RedisLeases", "artifact_payload"]


class RedisLeases:
    """Mixed into RedisJobStore (uses its ``_eval``, ``_call``, ``_prefix``, ``_job_key``,
    ``_retention_ms``, ``_count``, ``address``; sets the attributes below, declared here)."""

    #: the store's identity (``P store:id``); a different or missing one means Redis came back empty
    identity: str | None
    #: how often, and the last time why, the store was found emptied
    resets: int
    last_reset: str | None

    async def refresh_lease(self, gateway_id: str, ttl_s: float) -> bool:
        """Also checks the store's identity: a Redis that came back empty (restarted without
        persistence, a replica that lost its data) is detected, logged, counted
        (``store_resets``) and reported by ``status()``. True when this refresh found that no
        lease holder could refresh for a while (the store was away) and set the fence."""
        reply = await self._eval("lease", [], [self._prefix, gateway_id, max(1, int(ttl_s * 1000)), self.identity or ""])
        if int(reply[0]) == 0 and self.identity:
            await self._store_reset()
        return bool(int(reply[1]))

    async def _store_reset(self) -> None:
        old = self.identity
        self.identity = str(await self._eval("identity", [], [self._prefix, uuid.uuid4().hex]))
        self.resets += 1
        self.last_reset = (f"the store at {self.address} came back without its data (identity {old} is gone): "
                           f"jobs accepted before may be lost")
        self._count("store_resets")
        log.msg(f"ALERT: {self.last_reset}")

    async def live_gateways(self) -> set[str]:
        return set(arr(unpack(await self._eval("live", [], [self._prefix]))))

    async def orphans(self, live, limit: int = 500) -> list[tuple[str, str, JobState]]:
        reply = arr(unpack(await self._eval("orphans", [], [self._prefix, int(limit), csv(live)])))
        return [(job_id, owner, JobState(state)) for job_id, owner, state in reply]

    async def adopt(self, job_id: str, from_owner: str, to_owner: str) -> bool:
        return int(await self._eval("adopt", [self._job_key(job_id)], [from_owner, to_owner])) == 1

    # -- artifacts (bytes shared by every gateway, kept for the retention) --------------------

    def _artifact_key(self, sha256: str) -> str:
        return f"{self._prefix}artifact:{sha256}"

    #: ``transition`` takes ``artifacts``: outputs stored in the same round trip as the outcome
    inline_artifacts = True

    async def put_artifact(self, sha256: str, mime: str, blob: bytes) -> None:
        await self._call("SET", self._artifact_key(sha256), artifact_payload(mime, blob), "PX", self._retention_ms)

    async def get_artifact(self, sha256: str) -> tuple[bytes, str] | None:
        payload = await self._call("GET", self._artifact_key(sha256))
        if not payload:
            return None
        mime, _, data = str(payload).partition("\n")
        return base64.b64decode(data), mime


def artifact_payload(mime: str, blob: bytes) -> str:
    """An artifact as stored: ``mime``, a newline, the bytes in base64."""
    return mime + "\n" + base64.b64encode(blob).decode()
