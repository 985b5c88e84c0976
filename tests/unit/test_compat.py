"""Our worker serving an upstream OmniRT 0.1 gateway: upstream config keys, path-valued keys under
--allow-path only, artifact files under --output-dir, the bounded RunSync queue (omnirt.workers.compat)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import grpc
from twisted.trial.unittest import SynchronousTestCase

from omnirt.contract import GenerateRequest, RequestInvalid
from omnirt.registry import resolve_request
from omnirt.workers import compat
from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2 as pb
from omnirt.workers.server import Refused

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


class _Core:
    """A stand-in WorkerCore of capacity 1: admit/_running as the real one keeps them."""

    class R:
        def __init__(self, future):
            self.future = future

    def __init__(self, loop):
        self.loop = loop
        self._running: dict[str, _Core.R] = {}

    def admit(self, job_id, model):
        if self._running:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", "busy")
        fut = self.loop.create_future()
        fut.add_done_callback(lambda _: self._running.pop(job_id, None))
        self._running[job_id] = self.R(fut)
        return fut


class SyncQueueTests(SynchronousTestCase):
    def run_loop(self, coro):
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(coro(loop))
        finally:
            loop.close()

    def test_waits_in_order_then_refuses_beyond_bound(self):
        """Beyond capacity a RunSync waits (FIFO) for a slot; past --max-queue it is refused as before."""
        async def scenario(loop):
            core = _Core(loop)
            queue = compat.SyncQueue(max_queue=2)
            first = await queue.admit(core, "a", "m")
            order = []

            async def later(job_id):
                slot = await queue.admit(core, job_id, "m")
                order.append(job_id)
                return slot

            b = asyncio.ensure_future(later("b"))
            c = asyncio.ensure_future(later("c"))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            self.assertEqual(queue.waiting, 2)
            with self.assertRaises(Refused):
                await queue.admit(core, "d", "m")
            first.set_result(None)
            (await b).set_result(None)
            await c
            self.assertEqual(order, ["b", "c"])
            self.assertEqual(queue.waiting, 0)

        self.run_loop(scenario)

    def test_zero_queue_refuses_at_once(self):
        """The default --max-queue 0 keeps the strict admission."""
        async def scenario(loop):
            core = _Core(loop)
            queue = compat.SyncQueue(0)
            await queue.admit(core, "a", "m")
            with self.assertRaises(Refused):
                await queue.admit(core, "b", "m")

        self.run_loop(scenario)
