"""Batching and accelerator flags of `omnirt worker` and `omnirt serve`: parsed, refused on cpu, reported (no torch)."""

from __future__ import annotations

from twisted.trial import unittest

from omnirt.cli import build_parser
from omnirt.config.serve import ConfigError as ServeConfigError
from omnirt.config.serve import GatewayConfig
from omnirt.config.worker import ConfigError as WorkerConfigError
from omnirt.config.worker import WorkerConfig
from omnirt.engine.efficiency import report
from omnirt.engine.options import EngineOptions


def worker(*argv: str) -> WorkerConfig:
    return WorkerConfig.from_args(build_parser().parse_args(["worker", *argv]))


def serve(*argv: str) -> GatewayConfig:
    return GatewayConfig.from_args(build_parser().parse_args(["serve", *argv]))


class EngineFlagTests(unittest.TestCase):
    def test_flags_land_in_both_configs(self):
        """Each flag lands in engine_options of the worker and of the gateway's in-process engine;
        admission holds max concurrency x max batch size jobs when batching is on."""
        argv = ("--batch-window-ms", "20", "--max-batch-size", "4", "--max-concurrency", "2", "--compile",
                "--channels-last", "--tf32", "--dtype", "bf16", "--attention", "default", "--vae-fp16", "fp16-fix")
        for config in (worker(*argv), serve(*argv)):
            options = config.engine_options
            self.assertEqual(options, EngineOptions(batch_window_ms=20.0, max_batch_size=4, dtype="bf16",
                                                    compile=True, channels_last=True, tf32=True,
                                                    attention="default", vae_fp16="fp16-fix"))
            self.assertEqual(config.job_capacity, 8)

    def test_batching_is_off_by_default(self):
        """Without --batch-window-ms nothing batches and capacity is --max-concurrency."""
        for config in (worker("--max-concurrency", "3"), serve("--max-concurrency", "3")):
            self.assertFalse(config.engine_options.batching)
            self.assertEqual(config.job_capacity, 3)

    def test_bad_values_are_one_line_errors(self):
        """A negative window, a batch size under 2 or without a window, or an accelerator flag with an explicit cpu
        backend is refused with one line naming the flag, on both commands."""
        cases = (
            (("--batch-window-ms", "-1"), "--batch-window-ms must not be negative"),
            (("--batch-window-ms", "5", "--max-batch-size", "0"), "--max-batch-size must be at least 1"),
            (("--max-batch-size", "8"), "--max-batch-size needs --batch-window-ms (batching is off without a window)"),
            (("--batch-window-ms", "5", "--max-batch-size", "1"),
             "--batch-window-ms with --max-batch-size 1 would only delay jobs: give a size of 2 or more"),
            (("--backend", "cpu", "--compile", "--tf32"),
             "--compile, --tf32: accelerator options, not applicable to --backend cpu"),
            (("--backend", "cpu-stub", "--dtype", "fp16"),
             "--dtype fp16: accelerator options, not applicable to --backend cpu-stub"),
        )
        for argv, message in cases:
            for parse, error in ((worker, WorkerConfigError), (serve, ServeConfigError)):
                with self.assertRaises(error) as caught:
                    parse(*argv)
                self.assertEqual(str(caught.exception), message)

    def test_report_says_what_applies_on_each_backend(self):
        """On cuda every option is reported as set; on cpu (auto resolved there) the accelerator
        options that are on read "not applicable on cpu", and those that are off stay False."""
        options = EngineOptions(batch_window_ms=20, max_batch_size=4, compile=True, channels_last=True,
                                tf32=True, dtype="fp16")
        cuda = report(options, "cuda")
        self.assertEqual((cuda["compile"], cuda["channels_last"], cuda["tf32"], cuda["dtype"], cuda["attention"]),
                         (True, True, True, "fp16", "sdpa"))
        self.assertEqual((cuda["batch_window_ms"], cuda["max_batch_size"], cuda["vae_fp16"]), (20, 4, "upcast"))
        cpu = report(options, "cpu")
        for name in ("compile", "channels_last", "tf32", "vae_fp16"):
            self.assertEqual(cpu[name], "not applicable on cpu", name)
        self.assertEqual(cpu["dtype"], "fp16: not applicable on cpu (fp32)")
        self.assertEqual(report(options, "ascend")["tf32"], "not applicable on ascend")
        plain = report(EngineOptions(), "cpu")
        self.assertEqual((plain["compile"], plain["channels_last"], plain["tf32"], plain["max_batch_size"]),
                         (False, False, False, 1))
