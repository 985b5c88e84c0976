"""Local worker fleets: a TOML fleet file -> a supervisord config, and supervisord control over XML-RPC.

A fleet file lists the ``omnirt worker`` processes of one host (see ``fleet/*.toml``)::

    [supervisord]
    dir = "/var/lib/omnirt/fleet"     # socket, pidfile, logs and the rendered conf live here
    [defaults]                        # any worker key but id/port/count/metrics_port
    backend = "cuda"
    [[worker]]
    id = "sdxl-{n}"                   # with count: one worker per device, n = 0..count-1
    count = 2                         # port/metrics_port are bases (+n); CUDA_VISIBLE_DEVICES=n
    port = 50061
    model_path = { "sdxl-base-1.0" = "/models/sdxl-base" }

Relative paths (``dir``, ``socket``, ``model_path`` values) are resolved against the folder of the
fleet file, never the current directory, so a fleet file means the same wherever it is used from.
``env`` and ``model_path`` tables merge key-wise over ``[defaults]``.

Transport: supervisord listens on a unix socket only (``[unix_http_server]``, chmod 0700, optional
``socket_owner`` -> chown): no TCP port and no credentials, file permissions are the access
control. The ``omnirt fleet`` CLI talks to it with blocking ``xmlrpc.client`` over supervisor's
own ``SupervisorTransport`` (``SupervisorControl``); the gateway uses ``AsyncSupervisorClient`` (a
Twisted ``Agent`` over a UNIX endpoint, payloads encoded by ``xmlrpc.client.dumps``/``loads``), so
the reactor never blocks. The few blocking steps at gateway startup (writing the conf, spawning
supervisord) run on the reactor's thread pool.

Modules: ``model`` (the validated fleet), ``schema`` + ``parse`` (fleet file -> model, every problem at once),
``render`` (supervisord.conf), ``control`` (blocking control, the CLI's), ``client`` (non-blocking
XML-RPC, the gateway's), ``watcher`` (the gateway's fleet: supervisor states -> the worker pool).
"""

from omnirt.fleet.client import AsyncSupervisorClient
from omnirt.fleet.control import (
    SupervisorControl,
    describe_state,
    pid_alive,
    probe_health,
    read_pidfile,
    supervisor_transport,
    tail_file,
)
from omnirt.fleet.model import (
    CONF_NAME,
    DOWN_STATES,
    MAX_SOCKET_PATH,
    PROGRAM_PREFIX,
    SOCKET_NAME,
    Fleet,
    FleetError,
    WorkerDef,
)
from omnirt.fleet.parse import (
    default_state_dir,
    invoking_user,
    load_fleet,
    parse_fleet,
    port_problem,
    port_problems,
)
from omnirt.fleet.render import render_conf, write_conf
from omnirt.fleet.watcher import FleetWatcher, GatewayFleet

__all__ = [
    "CONF_NAME",
    "DOWN_STATES",
    "MAX_SOCKET_PATH",
    "PROGRAM_PREFIX",
    "SOCKET_NAME",
    "AsyncSupervisorClient",
    "Fleet",
    "FleetError",
    "FleetWatcher",
    "GatewayFleet",
    "SupervisorControl",
    "WorkerDef",
    "default_state_dir",
    "describe_state",
    "invoking_user",
    "load_fleet",
    "parse_fleet",
    "pid_alive",
    "port_problem",
    "port_problems",
    "probe_health",
    "read_pidfile",
    "render_conf",
    "supervisor_transport",
    "tail_file",
    "write_conf",
]
