"""What a webhook deliverer is configured with (pure: ``omnirt.config.serve`` holds one in the
gateway's config without importing the delivery machinery)."""

from __future__ import annotations

import dataclasses

__all__ = ["WebhookSettings"]


@dataclasses.dataclass(frozen=True)
class WebhookSettings:
    """How deliveries are signed, retried, bounded and polled (from the ``--webhook-*`` flags)."""

    secrets: tuple[bytes, ...] = ()
    allow_private: bool = False
    max_attempts: int = 8
    max_age_s: float = 6 * 3600.0
    timeout_s: float = 10.0
    progress_interval_ms: int = 1000
    per_host: int = 4
    concurrency: int = 128
    retry_base_s: float = 1.0
    retry_max_s: float = 600.0
    poll_interval_s: float = 0.1
    max_response_bytes: int = 4096

    @property
    def lease_s(self) -> float:
        """How long a claim holds an entry: past one attempt's deadline with room to settle."""
        return self.timeout_s * 2 + 5.0
