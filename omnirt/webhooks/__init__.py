"""Webhooks of jobs: what triggers them (model), how they are signed (signing), the delivery
service that drains the store's outbox (deliverer), its HTTP side (http), metrics and CLI options.

The outbox itself lives in the job store (``JobStore.claim_webhooks`` and friends): an entry is
written by the same store call that appends the event triggering it, so none is lost between
"job finished" and "webhook sent".
"""
