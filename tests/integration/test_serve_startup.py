"""``omnirt serve`` refuses to start on configuration a worker would refuse (real process)."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from tests.support.procs import Proc, free_port, omnirt_argv


class ServeRefusesTests(unittest.TestCase):
    def test_missing_model_path_refuses_to_start(self):
        """--model-path MODEL=/nonexistent: exit status 2 and one error line, like omnirt worker."""
        proc = Proc(omnirt_argv("serve", "--port", str(free_port()), "--backend", "cpu-stub",
                                "--model-path", "sdxl-base-1.0=/nonexistent"), Path(self.mktemp()))
        self.addCleanup(proc.stop)
        self.assertEqual(proc.wait(30), 2)
        lines = [line for line in proc.log().splitlines() if line.strip()]
        self.assertEqual(lines, ["error: --model-path sdxl-base-1.0=/nonexistent: /nonexistent is not a directory"])
