"""The ``--webhook-*`` flags of ``omnirt serve`` and the settings they make."""

from __future__ import annotations

from omnirt.webhooks.settings import WebhookSettings
from omnirt.webhooks.signing import SecretsError, load_secrets

__all__ = ["add_cli_args", "cli_settings"]


def add_cli_args(p) -> None:
    g = p.add_argument_group("webhooks")
    g.add_argument("--webhook-secret-file", default=None, metavar="FILE",
                   help="Standard Webhooks signing secrets, one per line (whsec_<base64>); every one signs "
                        "each delivery, so keys can be rotated. Without it deliveries are unsigned")
    g.add_argument("--webhook-allow-private", action="store_true",
                   help="allow webhook URLs on loopback, private and link-local addresses")
    g.add_argument("--webhook-max-attempts", type=int, default=8, help="attempts per delivery before dead-letter")
    g.add_argument("--webhook-max-age-s", type=float, default=6 * 3600.0,
                   help="a delivery still failing this long after its event is dead-lettered")
    g.add_argument("--webhook-timeout-s", type=float, default=10.0, help="deadline of one webhook attempt")
    g.add_argument("--webhook-progress-interval-ms", type=int, default=1000,
                   help="at most one progress webhook per job per interval (the latest progress wins)")
    g.add_argument("--webhook-host-concurrency", type=int, default=4, help="attempts in flight per receiver host")
    g.add_argument("--webhook-retry-base-s", type=float, default=1.0,
                   help="first retry delay; doubles per attempt (with jitter) up to --webhook-retry-max-s")
    g.add_argument("--webhook-retry-max-s", type=float, default=600.0)


def cli_settings(args) -> WebhookSettings:
    """Settings from parsed flags; ValueError with a one-line reason."""
    for name in ("webhook_max_attempts", "webhook_host_concurrency"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("webhook_max_age_s", "webhook_timeout_s", "webhook_retry_base_s", "webhook_retry_max_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.webhook_progress_interval_ms < 0:
        raise ValueError("--webhook-progress-interval-ms must be 0 or more")
    secrets: tuple[bytes, ...] = ()
    if args.webhook_secret_file:
        try:
            secrets = tuple(load_secrets(args.webhook_secret_file))
        except SecretsError as exc:
            raise ValueError(str(exc)) from None
    return WebhookSettings(
        secrets=secrets, allow_private=args.webhook_allow_private, max_attempts=args.webhook_max_attempts,
        max_age_s=args.webhook_max_age_s, timeout_s=args.webhook_timeout_s,
        progress_interval_ms=args.webhook_progress_interval_ms, per_host=args.webhook_host_concurrency,
        retry_base_s=args.webhook_retry_base_s, retry_max_s=args.webhook_retry_max_s)
