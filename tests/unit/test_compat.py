"""Our worker serving an upstream OmniRT 0.1 gateway: upstream config keys, path-valued keys under
--allow-path only, artifact files under --output-dir (omnirt.workers.compat), the bounded RunSync queue
(omnirt.workers.core.SyncQueue)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from omnirt.contract import GenerateRequest, RequestInvalid
from omnirt.registry import resolve_request
from omnirt.workers import compat
from omnirt.workers.base import WorkerJob
from omnirt.workers.core import Refused, SyncQueue, WorkerCore
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
from tests.unit.test_worker_core import FakeEngine, SteppedThreadPool, ThreadedClock
from tests.unit.test_worker_core import request as core_request

PNG = b"\x89PNG\r\n\x1a\n" + b"\x02" * 40


def request(config=None, inputs=None, task="text2image") -> GenerateRequest:
    return GenerateRequest(task=task, model="sdxl-base-1.0", inputs=inputs or {"prompt": "fox"},
                           config={"width": 64, "height": 64, **(config or {})})


class KeyTests(SynchronousTestCase):
    def test_ignored_keys_reported_not_refused(self):
        """Upstream keys without a meaning here are taken out before the registry and reported with a reason."""
        keys = {"use_result_cache": True, "device_map": "balanced", "devices": "cuda:0,cuda:1", "cache": "tea_cache",
                "ascend_dit_cache": True, "quantization": "int8", "enable_layerwise_casting": True}
        adapted = compat.Compat().adapt(request(keys))
        self.assertEqual(set(adapted.ignored), set(keys))
        resolve_request(adapted.request)  # the registry accepts what is left
        result = pb.GenerateResult(metadata=pb.RunReport(config_resolved=pb.JsonMap(json='{"width":64}')))
        compat.Compat().finish(result, adapted, "j")
        resolved = json.loads(result.metadata.config_resolved.json)
        self.assertEqual(set(resolved["ignored_config"]), set(keys))
        self.assertEqual(resolved["width"], 64)

    def test_unknown_keys_still_refused(self):
        """A key neither side knows goes on to the registry, which refuses it."""
        adapted = compat.Compat().adapt(request({"bogus": 1}))
        with self.assertRaises(RequestInvalid):
            resolve_request(adapted.request)

    def test_plain_request_untouched(self):
        """A request of ours passes unchanged (same object)."""
        req = request()
        self.assertIs(compat.Compat().adapt(req).request, req)


class PathTests(SynchronousTestCase):
    def setUp(self):
        self.allowed = Path(self.mktemp()).resolve()
        (self.allowed / "weights").mkdir(parents=True)
        (self.allowed / "in.png").write_bytes(PNG)
        self.outside = Path(self.mktemp()).resolve()
        self.outside.mkdir()
        (self.outside / "secret.png").write_bytes(PNG)
        self.compat = compat.Compat([str(self.allowed)])

    def assertRefused(self, comp, req, where):
        with self.assertRaises(RequestInvalid) as caught:
            comp.adapt(req)
        self.assertIn(compat.ALLOW_PATH_FLAG, caught.exception.message)
        self.assertIn(where, caught.exception.message)

    def test_without_flag_every_path_refused(self):
        """With no --allow-path, model_path, output_dir and a path image are a 400 naming the flag."""
        none = compat.Compat()
        self.assertRefused(none, request({"model_path": str(self.allowed / "weights")}), "model_path")
        self.assertRefused(none, request({"output_dir": str(self.allowed)}), "output_dir")
        self.assertRefused(none, request(inputs={"prompt": "x", "image": str(self.allowed / "in.png")},
                                         task="image2image"), "image")

    def test_inside_allowed(self):
        """Paths under an allowed folder are applied: weights folder, output folder, image bytes."""
        adapted = self.compat.adapt(request({"model_path": str(self.allowed / "weights"),
                                             "output_dir": str(self.allowed / "out")},
                                            inputs={"prompt": "x", "image": str(self.allowed / "in.png")},
                                            task="image2image"))
        self.assertEqual(adapted.model_path, str(self.allowed / "weights"))
        self.assertEqual(adapted.output_dir, str(self.allowed / "out"))
        self.assertEqual(base64.b64decode(adapted.request.inputs["image"]), PNG)
        self.assertNotIn("model_path", adapted.request.config)

    def test_absolute_outside(self):
        """An absolute path outside the allowed folders is refused."""
        self.assertRefused(self.compat, request(inputs={"prompt": "x", "image": str(self.outside / "secret.png")},
                                                task="image2image"), "image")
        self.assertRefused(self.compat, request({"output_dir": "/etc"}), "output_dir")

    def test_dotdot_escape(self):
        """``..`` out of an allowed folder is resolved before the check, and refused."""
        up = os.path.relpath(self.outside, self.allowed)  # ../../xyz/temp
        self.assertTrue(up.startswith(".."))
        escape = f"{self.allowed}/{up}/secret.png"
        self.assertRefused(self.compat, request(inputs={"prompt": "x", "image": escape}, task="image2image"), "image")
        self.assertRefused(self.compat, request({"output_dir": f"{self.allowed}/{up}"}), "output_dir")

    def test_symlink_escape(self):
        """A symlink inside an allowed folder that points outside it is refused (file and folder)."""
        (self.allowed / "link.png").symlink_to(self.outside / "secret.png")
        (self.allowed / "linkdir").symlink_to(self.outside)
        self.assertRefused(self.compat, request(inputs={"prompt": "x", "image": str(self.allowed / "link.png")},
                                                task="image2image"), "image")
        self.assertRefused(self.compat, request({"model_path": str(self.allowed / "linkdir")}), "model_path")

    def test_prefix_is_not_a_folder(self):
        """``/allowed-evil`` is not under ``/allowed``."""
        evil = Path(str(self.allowed) + "-evil")
        evil.mkdir()
        self.assertRefused(self.compat, request({"output_dir": str(evil)}), "output_dir")

    def test_base64_image_is_not_a_path(self):
        """Our own base64 or data URL images are left alone."""
        b64 = base64.b64encode(PNG).decode()
        for value in (b64, f"data:image/png;base64,{b64}"):
            adapted = compat.Compat().adapt(request(inputs={"prompt": "x", "image": value}, task="image2image"))
            self.assertEqual(adapted.request.inputs["image"], value)

    def test_output_files(self):
        """--output-dir: every artifact is written there and Artifact.path names the file."""
        out = self.allowed / "outputs"
        result = pb.GenerateResult(outputs=[pb.Artifact(mime="image/png", data=PNG)])
        compat.Compat(output_dir=str(out)).finish(result, None, "job1")
        self.assertEqual(result.outputs[0].path, str(out / "job1-0.png"))
        self.assertEqual(Path(result.outputs[0].path).read_bytes(), PNG)
        self.assertEqual(result.outputs[0].data, PNG)
        self.assertEqual([p for p in os.listdir(out) if p.endswith(".part")], [])


class SyncQueueTests(SynchronousTestCase):
    """The bounded RunSync queue on a real WorkerCore (capacity 1) with a stepped thread pool."""

    def setUp(self):
        self.pool = SteppedThreadPool()
        self.clock = ThreadedClock(self.pool)
        self.core = WorkerCore(FakeEngine(), self.clock, worker_id="w", capacity=1, threadpool=self.pool,
                               max_queue=2)
        Deferred.fromCoroutine(self.core.startup())
        self.pool.run_next()  # the backend resolution

    def submit(self, job_id: str, order: list) -> Deferred:
        d = Deferred.fromCoroutine(self.core.sync_queue.run(self.core, WorkerJob(job_id, core_request()),
                                                            lambda _u: None))
        return d.addCallback(lambda running: (order.append(job_id), running)[1])

    def test_waits_in_order_then_refuses_beyond_bound(self):
        """Beyond capacity a RunSync waits (FIFO) for a slot, health counts the waiting calls, and
        past --max-queue it is refused (busy) as before."""
        order: list = []
        self.submit("a", order)
        b, c = self.submit("b", order), self.submit("c", order)
        self.assertEqual((order, self.core.sync_queue.waiting, self.core.health().queue_depth), (["a"], 2, 2))
        refused = self.submit("d", order)
        self.assertEqual(self.failureResultOf(refused, Refused).value.reason, "busy")
        self.pool.run_next()  # a ends: b takes its slot, c still waits
        self.assertEqual((order, self.core.sync_queue.waiting), (["a", "b"], 1))
        self.successResultOf(b)
        self.pool.run_next()
        self.successResultOf(c)
        self.assertEqual((order, self.core.sync_queue.waiting), (["a", "b", "c"], 0))

    def test_cancelled_waiter_leaves_the_line(self):
        """A call given up while it waits leaves the line; the one behind it moves up."""
        order: list = []
        self.submit("a", order)
        b, c = self.submit("b", order), self.submit("c", order)
        b.cancel()
        self.failureResultOf(b)
        self.assertEqual(self.core.sync_queue.waiting, 1)
        self.pool.run_next()
        self.successResultOf(c)
        self.assertEqual(order, ["a", "c"])

    def test_drain_refuses_the_waiting_calls(self):
        """When the worker starts draining, queued calls are refused (draining) rather than left waiting."""
        order: list = []
        self.submit("a", order)
        b = self.submit("b", order)
        self.core.stop_admitting()
        self.assertEqual(self.failureResultOf(b, Refused).value.reason, "draining")
        self.assertEqual(self.core.sync_queue.waiting, 0)

    def test_zero_queue_refuses_at_once(self):
        """The default --max-queue 0 keeps the strict admission."""
        self.core.sync_queue = SyncQueue(0)
        order: list = []
        self.submit("a", order)
        self.assertEqual(self.failureResultOf(self.submit("b", order), Refused).value.reason, "busy")
