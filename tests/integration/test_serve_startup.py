"""``omnirt serve`` refuses to start on configuration a worker would refuse (real process)."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from tests.support.procs import Proc, free_port, omnirt_argv, port_open


class ServeRefusesTests(unittest.TestCase):
    def test_missing_model_path_refuses_to_start(self):
        """--model-path MODEL=/nonexistent: exit status 2 and one error line, like omnirt worker."""
        proc = Proc(omnirt_argv("serve", "--port", str(free_port()), "--backend", "cpu-stub",
                                "--model-path", "sdxl-base-1.0=/nonexistent"), Path(self.mktemp()))
        self.addCleanup(proc.stop)
        self.assertEqual(proc.wait(30), 2)
        lines = [line for line in proc.log().splitlines() if line.strip()]
        self.assertEqual(lines, ["error: --model-path sdxl-base-1.0=/nonexistent: /nonexistent is not a directory"])


def _mapped_libraries(pid: int) -> set[str]:
    """The file names of the shared objects mapped into process ``pid`` (Linux /proc)."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if ".so" in path:
            names.add(Path(path).name)
    return names


class GatewayFootprintTests(unittest.TestCase):
    def test_a_gateway_without_remote_workers_loads_no_grpc_or_supervisor(self):
        """A single-process ``omnirt serve`` that has served a job has not loaded grpc's core or
        protobuf's (only remote workers need them: ~11 MB of RSS), nor supervisor's XML-RPC client;
        a gateway with a remote worker does load grpc."""
        from tests.support.upstream import http_json

        port = free_port()
        proc = Proc(omnirt_argv("serve", "--port", str(port), "--backend", "cpu-stub",
                                "--artifact-dir", str(Path(self.mktemp()).resolve())), Path(self.mktemp()))
        self.addCleanup(proc.stop)
        proc.wait_until(lambda: http_json("GET", f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200
                        if port_open(port) else False, 60, "serving")
        status, result = http_json("POST", f"http://127.0.0.1:{port}/v1/generate", {
            "task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub", "inputs": {"prompt": "a lamp"},
            "config": {"width": 8, "height": 8, "num_inference_steps": 2}}, timeout=30)
        self.assertEqual(status, 200, result)
        loaded = _mapped_libraries(proc.pid)
        self.assertFalse({n for n in loaded if "cygrpc" in n or "_message" in n or "upb" in n}, sorted(loaded))
        modules = Path(f"/proc/{proc.pid}/maps").read_text()
        self.assertNotIn("/supervisor/", modules)
        self.assertIn("libc", " ".join(loaded))  # the check reads real mappings

        worker_port = free_port()
        worker = Proc(omnirt_argv("worker", "--port", str(worker_port), "--backend", "cpu-stub",
                                  "--worker-id", "w1"), Path(self.mktemp()))
        self.addCleanup(worker.stop)
        worker.wait_until(lambda: port_open(worker_port), 60, "listening")
        gw_port = free_port()
        gateway = Proc(omnirt_argv("serve", "--port", str(gw_port), "--remote-worker", f"w1=127.0.0.1:{worker_port}",
                                   "--artifact-dir", str(Path(self.mktemp()).resolve())), Path(self.mktemp()))
        self.addCleanup(gateway.stop)
        gateway.wait_until(lambda: port_open(gw_port), 60, "serving")
        self.assertTrue({n for n in _mapped_libraries(gateway.pid) if "cygrpc" in n}, "grpc not loaded")
