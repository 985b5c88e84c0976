"""``omnirt generate --server URL``: submit async, follow the SSE stream with progress (queue
position, step/total, ETA), download the PNGs; Ctrl-C cancels the job on the server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from omnirt.cli import CliError, install_reactor
from omnirt.contract import GenerateRequest


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
    install_reactor()
    from twisted.internet import reactor
    from twisted.internet.task import react

    state: dict[str, Any] = {"code": 0}

    def main(_reactor):
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(_follow(args, request, state, reactor))

    try:
        react(main)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return int(exc.code) if isinstance(exc.code, int) else 1
    return state["code"]


async def _follow(args, request: GenerateRequest, state: dict[str, Any], reactor) -> None:
    import treq
    from twisted.web.client import HTTPConnectionPool

    from omnirt.commands.generate import Progress

    base = args.server.rstrip("/") + "/"
    headers = {"Content-Type": ["application/json"]}
    if args.api_key:
        headers["Authorization"] = [f"Bearer {args.api_key}"]
    pool = HTTPConnectionPool(reactor, persistent=True)
    progress = Progress(sys.stderr)
    job_id: str | None = None
    finished = False

    def cancel_on_exit():
        if job_id is None or finished:
            return None
        progress.note(f"cancelling job {job_id} ...")
        d = treq.delete(urljoin(base, f"v1/jobs/{job_id}"), headers=headers, pool=pool, timeout=5)
        d.addErrback(lambda _f: None)
        return d

    reactor.addSystemEventTrigger("before", "shutdown", cancel_on_exit)
    try:
        body = request.model_dump(mode="json", exclude={"async_run"})
        body["async_run"] = True
        try:
            resp = await treq.post(urljoin(base, "v1/jobs"), json.dumps(body).encode(), headers=headers, pool=pool,
                                   timeout=30)
        except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeout
            raise CliError(f"cannot reach {args.server}: {exc}") from None
        payload = await resp.json() if resp.code < 500 or resp.headers.hasHeader("content-type") else {}
        if resp.code not in (200, 202):
            detail = payload.get("detail") if isinstance(payload, dict) else payload
            if isinstance(detail, list):
                detail = "; ".join(f"{'.'.join(map(str, p.get('loc', [])))}: {p.get('msg')}" for p in detail)
            raise CliError(f"server refused the job ({resp.code}): {detail}")
        job_id = payload["id"]
        if payload.get("queue_position"):
            progress.note(f"job {job_id} queued at position {payload['queue_position']}")
        else:
            progress.note(f"job {job_id} submitted")

        parser = _SSEParser()
        terminal: dict[str, Any] = {}

        def on_chunk(chunk: bytes) -> None:
            for frame in parser.feed(chunk):
                event = json.loads(frame.get("data", "{}"))
                name = event.get("event")
                data = event.get("data", {})
                if name == "job_enqueued" and data.get("queue_position"):
                    progress.note(f"queue position {data['queue_position']}")
                elif name == "job_started":
                    progress.note(f"running on worker {data.get('worker_id')} ({data.get('backend', '?')})")
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
        finished = True
        if terminal.get("event") == "job_cancelled":
            print("error: cancelled", file=sys.stderr)
            state["code"] = 130
            return
        if terminal.get("event") != "job_finished":
            error = terminal.get("data", {}).get("error", "stream ended without a terminal event")
            print(f"error: job {job_id} failed: {error}", file=sys.stderr)
            state["code"] = 1
            return
        record = await (await treq.get(urljoin(base, f"v1/jobs/{job_id}"), headers=headers, pool=pool)).json()
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
    except CliError as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        state["code"] = 2
    finally:
        await pool.closeCachedConnections()
