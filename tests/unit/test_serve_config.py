"""``omnirt serve``'s flags parsed once into a GatewayConfig: values carried, bad ones refused."""

from __future__ import annotations

import os

from twisted.trial import unittest

from omnirt.cli import build_parser
from omnirt.config.serve import ConfigError, GatewayConfig


def parse(*argv: str) -> GatewayConfig:
    return GatewayConfig.from_args(build_parser().parse_args(["serve", *argv]))


class GatewayConfigTests(unittest.TestCase):
    def test_flags_become_typed_fields(self):
        """Each flag lands in its field; no remote worker means an in-process engine."""
        folder = self.mktemp()
        os.makedirs(folder)
        config = parse("--port", "0", "--max-queue", "7", "--model-tier", "core", "--lease-ttl-s", "3",
                       "--model-path", f"sdxl-base-1.0={folder}", "--gateway-id", "g1")
        self.assertEqual((config.port, config.max_queue, config.allowed_tiers, config.lease_ttl_s, config.id),
                         (0, 7, ("core",), 3.0, "g1"))
        self.assertTrue(config.local_worker)
        self.assertEqual(config.model_paths, {"sdxl-base-1.0": os.path.realpath(folder)})

    def test_missing_model_folder_is_refused(self):
        """--model-path MODEL=DIR with no such folder is a one-line error, as for omnirt worker."""
        with self.assertRaises(ConfigError) as caught:
            parse("--model-path", "sdxl-base-1.0=/nonexistent/weights")
        self.assertEqual(str(caught.exception),
                         "--model-path sdxl-base-1.0=/nonexistent/weights: /nonexistent/weights is not a directory")

    def test_bad_numbers_are_refused(self):
        """Counts below 1 and ports out of range are one-line errors naming the flag."""
        for argv, words in [(["--max-concurrency", "0"], "--max-concurrency must be at least 1"),
                            (["--port", "70000"], "--port must be 0..65535"),
                            (["--rate-limit", "0"], "--rate-limit must be positive"),
                            (["--fleet-stop-on-exit"], "--fleet-stop-on-exit needs --fleet FILE")]:
            with self.assertRaises(ConfigError) as caught:
                parse(*argv)
            self.assertIn(words, str(caught.exception))

    def test_webhook_flags_become_settings(self):
        """The --webhook-* flags land in ``config.webhooks``; a bad one is a ConfigError (one line)
        naming the flag."""
        config = parse("--webhook-allow-private", "--webhook-max-attempts", "3", "--webhook-timeout-s", "2.5",
                       "--webhook-progress-interval-ms", "250", "--webhook-host-concurrency", "9")
        w = config.webhooks
        self.assertEqual((w.allow_private, w.max_attempts, w.timeout_s, w.progress_interval_ms, w.per_host, w.secrets),
                         (True, 3, 2.5, 250, 9, ()))
        self.assertFalse(parse().webhooks.allow_private)
        for argv, words in [(["--webhook-max-attempts", "0"], "--webhook-max-attempts must be at least 1"),
                            (["--webhook-secret-file", "/nonexistent/secret"], "--webhook-secret-file")]:
            with self.assertRaises(ConfigError) as caught:
                parse(*argv)
            self.assertIn(words, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_adapter_dirs(self):
        """--adapter-dir folders land resolved in the gateway's and the worker's config; one that is
        not a folder is a one-line error naming the flag, on both commands."""
        from omnirt.config.worker import ConfigError as WorkerConfigError
        from omnirt.config.worker import WorkerConfig

        folder = self.mktemp()
        os.makedirs(folder)
        self.assertEqual(parse("--adapter-dir", folder).adapter_dirs, (os.path.realpath(folder),))
        worker = WorkerConfig.from_args(build_parser().parse_args(["worker", "--adapter-dir", folder]))
        self.assertEqual(worker.adapter_dirs, (os.path.realpath(folder),))
        with self.assertRaises(ConfigError) as caught:
            parse("--adapter-dir", "/nonexistent/loras")
        self.assertEqual(str(caught.exception), "--adapter-dir '/nonexistent/loras' is not a folder")
        with self.assertRaises(WorkerConfigError):
            WorkerConfig.from_args(build_parser().parse_args(["worker", "--adapter-dir", "/nonexistent/loras"]))

    def test_adapter_dir_without_local_engine_is_reported(self):
        """--adapter-dir on a gateway with only remote workers is not silently ignored: a warning says so."""
        folder = self.mktemp()
        os.makedirs(folder)
        config = parse("--adapter-dir", folder, "--remote-worker", "w1=127.0.0.1:50061")
        self.assertFalse(config.local_worker)
        self.assertTrue(any("--adapter-dir is ignored" in w for w in config.warnings), config.warnings)
        config = parse("--adapter-dir", folder, "--remote-worker", "w1=127.0.0.1:50061", "--local-worker")
        self.assertFalse(any("--adapter-dir" in w for w in config.warnings), config.warnings)

    def test_high_availability_flags_reach_both_configs(self):
        """--redis-sentinel/--redis-master-name fold into a redis+sentinel:// URL, and
        --redis-min-replicas/--redis-wait-timeout-s land in the serve and the worker config alike;
        bad combinations are a ConfigError (one line) naming the flag, on both commands."""
        from omnirt.config.worker import ConfigError as WorkerConfigError
        from omnirt.config.worker import WorkerConfig

        argv = ["--redis-sentinel", "127.0.0.1:26379", "--redis-sentinel", "127.0.0.1:26380",
                "--redis-master-name", "omnirt", "--redis-min-replicas", "1", "--redis-wait-timeout-s", "0.5"]
        worker = WorkerConfig.from_args(build_parser().parse_args(["worker", *argv]))
        for config in (parse(*argv), worker):
            self.assertEqual((config.redis_url, config.redis_min_replicas, config.redis_wait_timeout_s),
                             ("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/omnirt", 1, 0.5))
        plain = parse("--redis-url", "redis://127.0.0.1:6379/0")
        self.assertEqual((plain.redis_url, plain.redis_min_replicas, plain.redis_wait_timeout_s),
                         ("redis://127.0.0.1:6379/0", 0, 1.0))
        self.assertIsNone(parse().redis_url)
        for bad, words in [(["--redis-min-replicas", "1"], "--redis-min-replicas needs a Redis store"),
                           (["--redis-sentinel", "127.0.0.1:26379"], "--redis-sentinel needs --redis-master-name"),
                           (["--redis-url", "redis://h/0", "--redis-wait-timeout-s", "0"],
                            "--redis-wait-timeout-s must be > 0")]:
            with self.assertRaises(ConfigError) as caught:
                parse(*bad)
            self.assertIn(words, str(caught.exception))
            with self.assertRaises(WorkerConfigError) as caught:
                WorkerConfig.from_args(build_parser().parse_args(["worker", *bad]))
            self.assertIn(words, str(caught.exception))


class SwitchIntervalTests(unittest.TestCase):
    def test_shorter_only_beside_an_in_process_engine_that_computes(self):
        """A single process with a real engine serves with the 1 ms switch interval; a gateway in
        front of remote workers, or the cpu-stub engine, keeps the interpreter's default."""
        from omnirt.commands.serve import ENGINE_SWITCH_INTERVAL_S, switch_interval_for

        self.assertEqual(switch_interval_for(parse("--backend", "cpu")), ENGINE_SWITCH_INTERVAL_S)
        self.assertEqual(switch_interval_for(parse()), ENGINE_SWITCH_INTERVAL_S)  # auto: cpu here, cuda elsewhere
        self.assertIsNone(switch_interval_for(parse("--backend", "cpu-stub")))
        self.assertIsNone(switch_interval_for(parse("--remote-worker", "w1=127.0.0.1:50051")))
