"""Errors the job service raises; ``gateway.errors`` maps each to one HTTP status."""

from __future__ import annotations

from omnirt.contract import ContractError


class QueueFull(ContractError):
    status = 429

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoWorkerForModel(ContractError):
    status = 503


class ServiceUnavailable(ContractError):
    status = 503


class JobNotFoundError(ContractError):
    status = 404


class JobConflict(ContractError):
    status = 409
