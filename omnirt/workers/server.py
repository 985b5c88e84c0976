"""The worker side of the gRPC contract, by its historical name: the engine host and its gRPC face.

The code lives by concern in ``omnirt.workers.core`` (``WorkerCore``: admission, job threads,
cancel, health, drain; transport-free) and ``omnirt.workers.servicer`` (the grpc.aio ``Worker``
service that converts at its edge). The process around them is ``omnirt.workers.service``.
"""

from __future__ import annotations

from omnirt.workers.core import REFUSALS, JobRun, Refused, RunEnd, WorkerCore, WorkerMetrics, prepare
from omnirt.workers.servicer import (
    REFUSAL_KEY,
    SERVER_OPTIONS,
    WorkerServicer,
    build_server,
    final_update,
    health_json,
    refusal_code,
)

__all__ = [
    "REFUSALS",
    "REFUSAL_KEY",
    "SERVER_OPTIONS",
    "JobRun",
    "Refused",
    "RunEnd",
    "WorkerCore",
    "WorkerMetrics",
    "WorkerServicer",
    "build_server",
    "final_update",
    "health_json",
    "prepare",
    "refusal_code",
]
