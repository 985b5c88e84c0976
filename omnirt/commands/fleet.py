"""``omnirt fleet``: render a fleet file to a supervisord.conf and drive that supervisord.

    omnirt fleet check   FILE                 validate only (every problem listed, exit 2)
    omnirt fleet render  FILE [-o DIR]        write DIR/supervisord.conf (DIR: [supervisord] dir)
    omnirt fleet up      FILE                 render, start or adopt supervisord, wait until all RUNNING
    omnirt fleet status  FILE [--json]        supervisor state and the worker's own health, side by side
    omnirt fleet restart FILE [ID ...]        TERM -> drain -> start -> ready, one worker at a time
    omnirt fleet logs    FILE ID [-n N] [-f]  the tail of a worker's log
    omnirt fleet down    FILE                 stop every worker (each drains) and supervisord

`status` exits 0 when every worker is RUNNING and answers ready, 1 otherwise, 3 when supervisord
is not running; validation problems exit 2 (one `error:` line each).
These are blocking commands (``xmlrpc.client`` over supervisor's own SupervisorTransport on its unix socket); the gateway talks
to the same supervisord without blocking (``omnirt.fleet.AsyncSupervisorClient``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import xmlrpc.client

from omnirt.cli import CliError


def register(sub) -> None:
    import argparse

    p = sub.add_parser("fleet", help="local worker fleet under supervisord (render, up, down, status, ...)",
                       description="Render a fleet file (TOML) to a supervisord.conf and drive that supervisord.\n\n"
                                   + __doc__.split("\n\n")[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    fsub.required = True

    def action(name, helptext, func, *, dir_flag=("--dir",)):
        a = fsub.add_parser(name, help=helptext, description=helptext)
        a.add_argument("file", metavar="FILE", help="fleet file (TOML)")
        a.add_argument(*dir_flag, dest="dir", default=None, metavar="DIR",
                       help="state folder (overrides [supervisord] dir): socket, pidfile, logs, supervisord.conf")
        a.set_defaults(func=func)
        return a

    action("check", "validate a fleet file (every problem listed)", _check)
    action("render", "write the supervisord.conf for a fleet file (-o DIR: the state folder; give the other "
                     "commands the same --dir)", _render, dir_flag=("-o", "--output-dir"))
    up = action("up", "render, start (or adopt) supervisord, wait until every worker is RUNNING", _up)
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for RUNNING (default 120)")
    down = action("down", "stop every worker (each drains) and supervisord; no process is left", _down)
    down.add_argument("--timeout", type=float, default=None, help="seconds before leftovers are killed "
                      "(default: the longest stopwaitsecs + 15)")
    st = action("status", "supervisor state and each worker's own gRPC health", _status)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    rs = action("restart", "restart workers one at a time: TERM -> drain -> start -> ready", _restart)
    rs.add_argument("ids", nargs="*", metavar="ID", help="worker ids (default: all, rolling)")
    rs.add_argument("--timeout", type=float, default=120.0, help="seconds each worker gets to be ready again")
    lg = action("logs", "print the tail of a worker's log", _logs)
    lg.add_argument("id", metavar="ID", help="worker id")
    lg.add_argument("-n", "--lines", type=int, default=50, help="lines to print (default 50)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")


def _load(args, *, strict: bool):
    from omnirt.fleet import FleetError, load_fleet

    try:
        return load_fleet(args.file, state_dir=args.dir, strict=strict)
    except FleetError as exc:
        raise _Problems(exc) from None


class _Problems(Exception):
    def __init__(self, exc):
        self.exc = exc


def _guard(func):
    """FleetError -> one ``error:`` line per problem and exit status 2 (omnirt.fleet, which loads
    supervisor's XML-RPC client, is imported when a fleet command runs, not for every command)."""

    def wrapper(args) -> int:
        from omnirt.fleet import FleetError

        try:
            return func(args)
        except _Problems as p:
            for line in p.exc.lines():
                print(f"error: {line}", file=sys.stderr)
            return 2
        except FleetError as exc:
            for line in exc.lines():
                print(f"error: {line}", file=sys.stderr)
            return 1
        except xmlrpc.client.Fault as exc:
            raise CliError(f"supervisord: {exc.faultString}") from None
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise CliError(f"supervisord is not reachable: {exc}") from None

    return wrapper


def _control(fleet):
    from omnirt.fleet import SupervisorControl

    return SupervisorControl(fleet, out=lambda line: print(line, flush=True))


def _need_running(control) -> None:
    if not control.running():
        raise CliError(f"supervisord is not running for {control.fleet.conf_path} (start it: omnirt fleet up FILE)")


@_guard
def _check(args) -> int:
    fleet = _load(args, strict=True)
    for w in fleet.workers:
        print(f"{w.id}\t{w.address}\t{w.backend}\t{','.join(w.models) or 'all models'}")
    print(f"ok: {len(fleet.workers)} workers; state in {fleet.dir}")
    return 0


@_guard
def _render(args) -> int:
    from omnirt.fleet import write_conf

    fleet = _load(args, strict=True)
    changed = write_conf(fleet)
    print(f"{fleet.conf_path}{'' if changed else ' (unchanged)'}")
    print(f"start it:  {sys.executable} -m supervisor.supervisord -c {fleet.conf_path}   (or: omnirt fleet up "
          f"{args.file})")
    return 0


@_guard
def _up(args) -> int:
    fleet = _load(args, strict=True)
    control = _control(fleet)
    how = control.ensure_started(start_stopped=True)
    print(f"supervisord {how}: {fleet.conf_path}", flush=True)
    started = time.monotonic()
    control.wait_running(timeout=args.timeout)
    _wait_ready(fleet, deadline=started + args.timeout)
    return _print_status(fleet, control, as_json=False)


def _wait_ready(fleet, deadline: float) -> None:
    """RUNNING in supervisor is not serving yet (imports, backend probe): wait, bounded, until
    every worker's own health says ready."""
    from omnirt.fleet import probe_health

    pending = list(fleet.workers)
    while pending and time.monotonic() < deadline:
        pending = [w for w in pending
                   if not ((h := probe_health(w.address, 1.0)[0]) is not None and h.ok and h.state == "ready")]
        if pending:
            time.sleep(0.2)


@_guard
def _down(args) -> int:
    fleet = _load(args, strict=False)
    control = _control(fleet)
    if not control.running():
        print(f"supervisord is not running for {fleet.conf_path}")
        return 0
    pids = control.shutdown(args.timeout)
    print(f"stopped: {len(pids)} processes ({', '.join(str(p) for p in pids)})")
    return 0


@_guard
def _status(args) -> int:
    fleet = _load(args, strict=False)
    control = _control(fleet)
    if not control.running():
        print(f"supervisord is not running for {fleet.conf_path}", file=sys.stderr)
        return 3
    return _print_status(fleet, control, as_json=args.json)


def _print_status(fleet, control, *, as_json: bool) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from omnirt.fleet import describe_state, probe_health

    infos = control.infos()
    with ThreadPoolExecutor(max_workers=min(8, len(fleet.workers) or 1)) as pool:
        healths = list(pool.map(lambda w: probe_health(w.address, 1.0), fleet.workers))
    rows = []
    all_good = True
    for w, (health, error) in zip(fleet.workers, healths, strict=True):
        info = infos.get(w.id, {})
        sup = info.get("statename", "MISSING")
        if health is not None:
            hstate = health.state if health.ok else f"{health.state} (not ok)"
            detail = f"{health.inflight}/{health.capacity} {health.backend}"
        else:
            hstate, detail = f"unreachable ({error})", ""
        good = sup == "RUNNING" and health is not None and health.ok and health.state == "ready"
        all_good = all_good and good
        rows.append({
            "id": w.id, "address": w.address, "supervisor": sup, "pid": info.get("pid", 0),
            "supervisor_detail": (info.get("description") or describe_state(info)) if info else "no such program",
            "health": hstate, "inflight": health.inflight if health else None,
            "capacity": health.capacity if health else None, "backend": health.backend if health else "",
            "loaded_models": list(health.loaded_models) if health else [], "ok": good, "_detail": detail,
        })
    if as_json:
        print(json.dumps({"conf": str(fleet.conf_path), "workers": [{k: v for k, v in r.items() if k[0] != "_"}
                                                                      for r in rows]}, indent=2))
    else:
        header = ("ID", "ADDRESS", "SUPERVISOR", "PID", "HEALTH", "LOAD", "DETAIL")
        table = [header] + [
            (r["id"], r["address"], r["supervisor"], str(r["pid"] or "-"), r["health"], r["_detail"] or "-",
             r["supervisor_detail"] or "-")
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        for row in table:
            print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:-1])) + "  " + row[-1])
    return 0 if all_good else 1


@_guard
def _restart(args) -> int:
    fleet = _load(args, strict=False)
    control = _control(fleet)
    _need_running(control)
    known = [w.id for w in fleet.workers]
    unknown = [i for i in args.ids if i not in known]
    if unknown:
        raise CliError(f"unknown worker id(s) {', '.join(unknown)} (fleet: {', '.join(known)})")
    for wid in args.ids or known:
        started = time.monotonic()
        print(f"{wid}: stopping (TERM, drain up to {fleet.worker(wid).drain_grace_s:g}s)", flush=True)
        info = control.restart(wid, health_timeout=args.timeout)
        print(f"{wid}: ready again, pid {info['pid']} ({time.monotonic() - started:.1f}s)", flush=True)
    return 0


@_guard
def _logs(args) -> int:
    from omnirt.fleet import tail_file

    fleet = _load(args, strict=False)
    try:
        worker = fleet.worker(args.id)
    except KeyError:
        raise CliError(f"unknown worker id {args.id!r} (fleet: {', '.join(w.id for w in fleet.workers)})") from None
    path = fleet.worker_log(worker)
    if not path.exists():
        raise CliError(f"no log yet at {path}")
    for line in tail_file(path, args.lines):
        print(line)
    if not args.follow:
        return 0
    sys.stdout.flush()
    f = open(path, "rb")  # noqa: SIM115 - reopened when supervisord rotates the log
    f.seek(0, 2)
    try:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
                continue
            time.sleep(0.5)
            try:
                rotated = path.stat().st_ino != os.fstat(f.fileno()).st_ino
            except OSError:
                rotated = False
            if rotated:
                f.close()
                f = open(path, "rb")  # noqa: SIM115
    finally:
        f.close()
