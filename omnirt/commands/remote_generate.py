"""``omnirt generate --server URL``: submit async, follow the SSE stream with progress (queue
position kept up to date, step/total, ETA), download the PNGs; Ctrl-C (or SIGTERM) cancels the job
on the server and exits 130 (143) with one line."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from omnirt.cli import CliError, install_reactor
from omnirt.contract import GenerateRequest

#: while the job waits, its record is read this often to keep the queue position current
QUEUE_POLL_S = 1.0
#: after Ctrl-C, how long to wait for a running job to reach ``cancelled``
CANCEL_WAIT_S = 10.0
SERVER_URL_HELP = "a server URL looks like http://127.0.0.1:8000 (http:// or https://, host, optional port)"


def server_base(url: str) -> str:
    """The base URL with one trailing slash, or a one-line CliError saying what it must look like."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--server {url!r} is not a server URL: {SERVER_URL_HELP}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise CliError(f"--server {url!r} has a bad port: {SERVER_URL_HELP}") from None
    if parts.query or parts.fragment:
        raise CliError(f"--server {url!r} must not have a query or fragment: {SERVER_URL_HELP}")
    return url.strip().rstrip("/") + "/"


def not_found_hint(base: str) -> str:
    parts = urlsplit(base)
    if parts.path.strip("/"):
        return (f" (--server takes the server's base URL, e.g. {parts.scheme}://{parts.netloc}, "
                f"not {base.rstrip('/')})")
    return " (is this an omnirt server?)"


class _SSEParser:
    """Incremental text/event-stream parser: feed bytes, get (id, event, data) frames."""

    def __init__(self):
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[dict[str, str]]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        frames = []
        while b"\n\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n\n", 1)
            frame: dict[str, str] = {}
            for line in raw.decode("utf-8", "replace").split("\n"):
                if not line or line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "data" and "data" in frame:
                    value = frame["data"] + "\n" + value
                frame[name] = value
            if frame:
                frames.append(frame)
        return frames


def run_remote(args, request: GenerateRequest) -> int:
    base = server_base(args.server)
    install_reactor()
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    state: dict[str, Any] = {"code": 0, "interrupted": False}

    def interrupted(signum, _frame) -> None:
        if state["interrupted"]:  # a second Ctrl-C: stop waiting for the cancel
            reactor.callFromThread(reactor.stop)
            return
        state["interrupted"] = True
        state["signal"] = signum
        reactor.callFromThread(lambda: state["follow"].cancel())

    def begin() -> None:
        # replace the reactor's own handlers (they stop it at once, leaving the job running)
        signal.signal(signal.SIGINT, interrupted)
        signal.signal(signal.SIGTERM, interrupted)
        state["follow"] = d = Deferred.fromCoroutine(_follow(args, base, request, state, reactor))

        def failed(f) -> None:
            if not f.check(KeyboardInterrupt):
                print(f"error: {f.getErrorMessage() or f.type.__name__}", file=sys.stderr)
            state["code"] = state["code"] or 1

        d.addErrback(failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(begin)
    reactor.run()
    if state["interrupted"]:  # 130 for Ctrl-C, 143 for SIGTERM
        state["code"] = 128 + int(state.get("signal", signal.SIGINT))
    return state["code"]


async def _follow(args, base: str, request: GenerateRequest, state: dict[str, Any], reactor) -> None:
    import treq
    from twisted.internet.defer import CancelledError
    from twisted.internet.task import LoopingCall
    from twisted.web.client import HTTPConnectionPool

    from omnirt.commands.generate import Progress

    headers = {"Content-Type": ["application/json"]}
    if args.api_key:
        headers["Authorization"] = [f"Bearer {args.api_key}"]
    pool = HTTPConnectionPool(reactor, persistent=True)
    progress = Progress(sys.stderr)
    job_id: str | None = None
    watch: LoopingCall | None = None
    try:
        body = request.model_dump(mode="json", exclude={"async_run"})
        body["async_run"] = True
        try:
            resp = await treq.post(urljoin(base, "v1/jobs"), json.dumps(body).encode(), headers=headers, pool=pool,
                                   timeout=30)
        except CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeout
            raise CliError(f"cannot reach {args.server}: {exc.__class__.__name__}: {exc}") from None
        payload = await _json_or_none(resp)
        if resp.code == 404:
            raise CliError(f"{urljoin(base, 'v1/jobs')} answered 404{not_found_hint(base)}")
        if resp.code not in (200, 202):
            detail = payload.get("detail") if isinstance(payload, dict) else payload
            if isinstance(detail, list):
                detail = "; ".join(f"{'.'.join(map(str, p.get('loc', [])))}: {p.get('msg')}" for p in detail)
            raise CliError(f"server refused the job ({resp.code}): {detail}")
        if not isinstance(payload, dict) or "id" not in payload:
            raise CliError(f"{args.server} answered {resp.code} without a job record (is this an omnirt server?)")
        job_id = payload["id"]
        position = {"last": payload.get("queue_position"), "started": False}
        if position["last"]:
            progress.note(f"job {job_id} queued at position {position['last']}")
        else:
            progress.note(f"job {job_id} submitted")

        async def poll_position() -> None:
            rec = await (await treq.get(urljoin(base, f"v1/jobs/{job_id}?events=false"), headers=headers,
                                        pool=pool, timeout=10)).json()
            pos = rec.get("queue_position") if rec.get("state") == "queued" else None
            if pos and pos != position["last"] and not position["started"]:
                position["last"] = pos
                progress.note(f"queue position {pos}")

        def poll() -> None:
            from twisted.internet.defer import Deferred

            Deferred.fromCoroutine(poll_position()).addErrback(lambda _f: None)

        watch = LoopingCall(poll)
        watch.clock = reactor
        if position["last"]:
            watch.start(QUEUE_POLL_S, now=False)

        parser = _SSEParser()
        terminal: dict[str, Any] = {}

        def on_chunk(chunk: bytes) -> None:
            if state["interrupted"]:
                return
            for frame in parser.feed(chunk):
                event = json.loads(frame.get("data", "{}"))
                name = event.get("event")
                data = event.get("data", {})
                if name in ("job_dispatched", "job_started") and watch is not None and watch.running:
                    watch.stop()
                if name == "job_started":
                    position["started"] = True
                    progress.note(f"running on worker {data.get('worker_id')}")
                elif name == "job_retried":
                    progress.note(f"retrying after {data.get('reason')} on {data.get('previous_worker_id')}")
                elif name in ("job_finished", "job_failed", "job_cancelled"):
                    terminal.update(event)
                elif name and name.startswith("stage_"):
                    progress.emit(name, event.get("stage", ""), data)

        events = await treq.get(urljoin(base, f"v1/jobs/{job_id}/events"), headers=headers, pool=pool)
        if events.code != 200:
            raise CliError(f"cannot follow job {job_id} ({events.code})")
        await treq.collect(events, on_chunk)
        progress.close()
        if terminal.get("event") == "job_cancelled":
            print(f"error: job {job_id} was cancelled", file=sys.stderr)
            state["code"] = 130
            return
        if terminal.get("event") != "job_finished":
            error = terminal.get("data", {}).get("error", "stream ended without a terminal event")
            print(f"error: job {job_id} failed: {error}", file=sys.stderr)
            state["code"] = 1
            return
        record = await (await treq.get(urljoin(base, f"v1/jobs/{job_id}?events=false"), headers=headers,
                                       pool=pool)).json()
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, artifact in enumerate(record["result"]["outputs"]):
            blob = await treq.content(await treq.get(urljoin(base, artifact["url"].lstrip("/")), headers=headers,
                                                     pool=pool))
            path = output_dir / f"{job_id}-{i}.png"
            path.write_bytes(blob)
            paths.append(str(path))
        if getattr(args, "json", False):
            print(json.dumps(record["result"], indent=2))
        else:
            for path in paths:
                print(path)
    except CancelledError:  # Ctrl-C (run_remote cancels this coroutine)
        progress.close()
        state["code"] = 130
        if job_id is None:
            print("error: interrupted (no job was submitted)", file=sys.stderr)
        else:
            print(f"error: interrupted: {await _cancel(treq, base, job_id, headers, pool)}", file=sys.stderr)
    except CliError as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        state["code"] = 2
    finally:
        if watch is not None and watch.running:
            watch.stop()
        await pool.closeCachedConnections()


async def _wait_terminal(treq, base: str, job_id: str, headers, pool, timeout_s: float) -> str | None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(int(timeout_s / 0.1)):
        try:
            resp = await treq.get(urljoin(base, f"v1/jobs/{job_id}?events=false"), headers=headers, pool=pool,
                                  timeout=5)
            body = await _json_or_none(resp)
        except Exception:  # noqa: BLE001 - the server went away: stop asking
            return None
        if isinstance(body, dict) and body.get("state") in ("succeeded", "failed", "cancelled"):
            return body["state"]
        await deferLater(reactor, 0.1, lambda: None)
    return None


async def _json_or_none(resp) -> Any:
    try:
        return json.loads(await resp.content())
    except ValueError:
        return None


async def _cancel(treq, base: str, job_id: str, headers, pool) -> str:
    """DELETE the job; what happened, in a few words."""
    try:
        resp = await treq.delete(urljoin(base, f"v1/jobs/{job_id}"), headers=headers, pool=pool, timeout=10)
        body = await _json_or_none(resp)
    except Exception as exc:  # noqa: BLE001 - the server went away: say so, still exit 130
        return f"could not cancel job {job_id} on the server ({exc.__class__.__name__})"
    if resp.code == 200 and isinstance(body, dict):
        state = body.get("state", "cancelled")
        if state == "cancelling":  # the worker stops at its next step: wait for it (bounded)
            state = await _wait_terminal(treq, base, job_id, headers, pool, CANCEL_WAIT_S) or state
        return f"job {job_id} {state} on the server"
    if resp.code == 409:
        return f"job {job_id} had already finished"
    return f"cancel of job {job_id} answered {resp.code}"
