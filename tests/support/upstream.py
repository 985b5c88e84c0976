"""Upstream OmniRT 0.1.0 (the registry release) for interop tests: its venv, an offline Hugging
Face cache of the tiny weights, and its gateway/worker processes on free loopback ports.

The venv (``<repo>/.venv-upstream``, or ``$OMNIRT_UPSTREAM_VENV``) is created once from the
package registry (``torch==2.13.0`` first, then ``omnirt[server]==0.1.0`` and its SDXL runtime)
and reused; ``python -m tests.support.upstream`` creates it (scripts/test does). When the
registry cannot be reached the tests that need it skip, saying so.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SkipTest

from tests.support.procs import REPO_ROOT, Proc, free_port, port_open

UPSTREAM_VERSION = "0.1.0"
#: what the venv gets (torch pinned first: an unpinned one pulls a multi-GB CUDA build)
TORCH = "torch==2.13.0"
PACKAGES = (f"omnirt[server]=={UPSTREAM_VERSION}", "diffusers", "transformers", "safetensors",
            "huggingface_hub", "accelerate")
#: the hub repo ids upstream 0.1 loads SDXL from (omnirt/models/sdxl/components.py)
UPSTREAM_REPO_IDS = {
    "sdxl-base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-refiner-1.0": "stabilityai/stable-diffusion-xl-refiner-1.0",
}


def venv_dir() -> Path:
    return Path(os.environ.get("OMNIRT_UPSTREAM_VENV") or REPO_ROOT / ".venv-upstream")


def _stamp(venv: Path) -> Path:
    digest = hashlib.sha256(json.dumps([TORCH, *PACKAGES]).encode()).hexdigest()[:12]
    return venv / f".omnirt-upstream-{UPSTREAM_VERSION}-{digest}"


def _pip(venv: Path, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout)


def ensure_venv() -> Path:
    """The upstream venv, created when missing; ``SkipTest`` when the registry is unreachable.

    Any other install failure is an error (with pip's last lines), not a skip.
    """
    venv = venv_dir()
    if _stamp(venv).exists():
        return venv
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    probe = _pip(venv, "download", "--no-deps", "-d", str(venv / ".probe"), f"omnirt=={UPSTREAM_VERSION}",
                 timeout=300)
    if probe.returncode != 0:
        raise SkipTest(f"the package registry is unreachable (pip download omnirt=={UPSTREAM_VERSION}: "
                       f"{(probe.stderr.strip().splitlines() or ['no output'])[-1]})")
    for step in ((TORCH,), PACKAGES):
        done = _pip(venv, "install", *step)
        if done.returncode != 0:
            raise RuntimeError(f"installing {' '.join(step)} into {venv} failed:\n{done.stderr[-3000:]}")
    _stamp(venv).touch()
    return venv


@functools.cache
def venv_or_skip() -> Path:
    return ensure_venv()


def upstream_argv(*args: str) -> list[str]:
    return [str(venv_or_skip() / "bin" / "omnirt"), *args]


def hf_cache(tiny: dict[str, str], root: Path) -> Path:
    """An offline Hugging Face cache (``HF_HOME``) holding the tiny weights under upstream's repo ids.

    Laid out as the hub client writes it: ``hub/models--ORG--NAME/{refs/main, snapshots/REV/...}``.
    """
    hub = root / "hub"
    for model, repo_id in UPSTREAM_REPO_IDS.items():
        source = Path(tiny[model])
        revision = hashlib.sha1(f"{repo_id}:{source}".encode()).hexdigest()
        repo = hub / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / revision
        if not snapshot.exists():
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            tmp = snapshot.with_name(revision + ".part")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            os.replace(tmp, snapshot)
            (repo / "refs" / "main").write_text(revision)
    return root


def offline_env(hf_home: Path) -> dict[str, str]:
    """Environment of an upstream process: the offline cache, no network, quiet, 2 threads."""
    return {
        "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "PYTHONUNBUFFERED": "1", "NO_PROXY": "*",
    }


def start_upstream(testcase, args: list[str], port: int, hf_home: Path, *, cwd: Path | None = None,
                   name: str = "upstream", timeout: float = 120.0) -> Proc:
    """Start ``omnirt ARGS`` of the upstream venv, wait until it listens; killed at cleanup."""
    log_dir = Path(testcase.mktemp())
    log_dir.mkdir(parents=True, exist_ok=True)
    # upstream writes ./outputs relative to its cwd: run it in a folder of the test by default
    proc = _proc_in(upstream_argv(*args), log_dir / f"{name}.log", offline_env(hf_home), cwd or log_dir)
    testcase.addCleanup(proc.stop)
    proc.wait_until(lambda: port_open(port), timeout=timeout, what=f"listening on {port}")
    return proc


def _proc_in(argv: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> Proc:
    """A ``Proc`` started in ``cwd`` (``Proc`` itself always starts in the repo root)."""
    proc = Proc.__new__(Proc)
    proc.argv = argv
    proc.log_path = log_path
    proc._log = open(log_path, "wb")
    proc.popen = subprocess.Popen(argv, stdout=proc._log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                  cwd=str(cwd), start_new_session=True)
    return proc


def start_upstream_worker(testcase, hf_home: Path, *, worker_id: str = "up", cwd: Path | None = None) -> tuple[Proc, int]:
    port = free_port()
    proc = start_upstream(testcase, ["worker", "--host", "127.0.0.1", "--port", str(port), "--worker-id", worker_id],
                          port, hf_home, cwd=cwd, name=f"upstream-worker-{worker_id}")
    return proc, port


def start_upstream_gateway(testcase, hf_home: Path, remote_workers: list[str], *, extra: list[str] = (),
                           cwd: Path | None = None) -> tuple[Proc, int]:
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), *extra]
    for spec in remote_workers:
        args += ["--remote-worker", spec]
    proc = start_upstream(testcase, args, port, hf_home, cwd=cwd, name="upstream-gateway")
    return proc, port


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 120.0) -> tuple[int, dict]:
    """One blocking JSON request (upstream's side is uvicorn: plain urllib keeps the test simple)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"{}")
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


if __name__ == "__main__":  # scripts/test: create the venv when missing
    try:
        print(f"upstream OmniRT {UPSTREAM_VERSION} venv: {ensure_venv()}")
    except SkipTest as exc:
        print(f"upstream OmniRT venv not created: {exc}")
