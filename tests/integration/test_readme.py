"""Every command of README.md runs as written: the shell blocks that need no root, no downloads and
no long-running foreground process are run with bash (the quick-start requests against a real
``omnirt serve`` on the tiny cpu weights), and every ``omnirt`` line of every block is parsed by
the real argument parser."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support.procs import REPO_ROOT, free_port, start_omnirt
from tests.support.tiny import model_path_args

README = REPO_ROOT / "README.md"
#: a block with any of these is not run (it installs, needs root/systemd/GPU/network, or starts a
#: process that never ends); its omnirt lines are still parsed
NOT_RUN = re.compile(r"&\s*$|scripts/(quickstart|test|bootstrap)\b|systemctl|useradd|huggingface-cli|"
                     r"redis-server|bin/omnirt (serve|worker)\b|bin/omnirt fleet up\b|^cp etc/", re.M)
NEEDS_SERVER = re.compile(r"(localhost|127\.0\.0\.1):8000")


def shell_blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.S | re.M)


def omnirt_commands(block: str) -> list[list[str]]:
    """The argv (after ``omnirt``) of each omnirt invocation in a block."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue  # a line inside a multi-line quoted JSON body
        for i, tok in enumerate(tokens):
            if tok.endswith("bin/omnirt"):
                argv = []
                for t in tokens[i + 1:]:
                    if t in ("&", "&&", "|", ";", "||", ">", "2>"):
                        break
                    argv.append(t)
                out.append(argv)
    return out


class ReadmeTests(SynchronousTestCase):
    def run_block(self, block: str, cwd: Path, port: int | None = None) -> subprocess.CompletedProcess:
        script = block.replace(".venv/bin/omnirt", f"{shlex.quote(sys.executable)} -m omnirt")
        if port is not None:
            script = NEEDS_SERVER.sub(f"127.0.0.1:{port}", script)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        return subprocess.run(["bash", "-e", "-c", script], cwd=str(cwd), capture_output=True, text=True,
                              timeout=300, env=env)

    def test_every_omnirt_line_parses(self):
        """Each ``omnirt ...`` line of the README is accepted by the CLI's own parser (flags and
        subcommands exist, values have the right types)."""
        from omnirt.cli import build_parser, parse_args

        commands = [argv for block in shell_blocks() for argv in omnirt_commands(block)]
        self.assertGreaterEqual(len(commands), 15)
        for argv in commands:
            try:
                parse_args(build_parser(), argv)
            except SystemExit as exc:
                self.fail(f"README line 'omnirt {' '.join(argv)}' does not parse (exit {exc.code})")

    def test_runnable_blocks_run_as_written(self):
        """The quick-start requests (sync, async + SSE, record, light record, cancel), the CLI
        client and the serverless commands all exit 0 as written, against a real server."""
        port = free_port()
        tmp = Path(self.mktemp()).resolve()
        tmp.mkdir(parents=True)
        start_omnirt(self, ["serve", "--port", str(port), "--backend", "cpu", "--artifact-dir", str(tmp / "art"),
                            *model_path_args()], port, name="serve", timeout=120)
        ran = []
        for block in shell_blocks():
            if NOT_RUN.search(block):
                continue
            proc = self.run_block(block, tmp, port if NEEDS_SERVER.search(block) else None)
            self.assertEqual(proc.returncode, 0, f"README block failed:\n{block}\nstdout:\n{proc.stdout[-2000:]}"
                                                 f"\nstderr:\n{proc.stderr[-3000:]}")
            self.assertNotIn("Traceback", proc.stderr)
            ran.append((block, proc))
        self.assertEqual(len(ran), 3, [b.splitlines()[0] for b, _ in ran])
        quick, client, serverless = (p for _, p in ran)
        self.assertIn("event: job_finished", quick.stdout)
        self.assertIn('"url": "/v1/artifacts/', quick.stdout)  # within the record's first 30 lines
        self.assertIn("job_dispatched", quick.stdout)
        self.assertEqual(len(list((tmp / "out").glob("*.png"))), 1, client.stderr)
        self.assertIn("ok: the request is valid", serverless.stderr)
