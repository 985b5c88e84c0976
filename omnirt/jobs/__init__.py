"""The job service (state machine, admission, idempotency), the dispatcher, retention."""
