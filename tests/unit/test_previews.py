"""Step previews without torch: sizing, the gateway turning preview bytes into artifacts, stub previews."""

from __future__ import annotations

import base64
import io

from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from omnirt.contract import GenerateRequest
from omnirt.engine.base import CancelToken, EngineJob
from omnirt.engine.engine import Engine
from omnirt.engine.previews import MAX_PREVIEW_SIDE, preview_size
from omnirt.registry import resolve_request
from omnirt.store.artifacts import ArtifactStore
from omnirt.store.previews import store_preview
from tests.unit.test_stub import Recorder


def stub_job(steps=10, **config) -> EngineJob:
    body = {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub", "inputs": {"prompt": "a boat"},
            "config": {"width": 640, "height": 320, "num_inference_steps": steps, "seed": 1, **config}}
    return EngineJob("j", resolve_request(GenerateRequest.model_validate(body)))


class PreviewSizeTests(TestCase):
    def test_long_side_bounded_aspect_kept(self):
        """Previews keep the output's aspect, are never above 256 px, and never larger than the output."""
        self.assertEqual(preview_size(1024, 512), (256, 128))
        self.assertEqual(preview_size(512, 2048), (64, 256))
        self.assertEqual(preview_size(64, 64), (64, 64))
        self.assertLessEqual(max(preview_size(2048, 8)), MAX_PREVIEW_SIDE)


class StubPreviewTests(TestCase):
    def test_every_n_steps(self):
        """The stub engine puts a JPEG preview in the progress events of steps N, 2N...; preview_every 0 gives none."""
        engine = Engine(backend="cpu-stub")
        self.addCleanup(engine.close)
        rec = Recorder()
        outcome = engine.run(stub_job(10, preview_every=3), rec, CancelToken())
        progress = [d for e, _s, d in rec.events if e == "stage_progress"]
        with_preview = [d["step"] for d in progress if "preview_b64" in d]
        self.assertEqual(with_preview, [3, 6, 9])
        picture = Image.open(io.BytesIO(base64.b64decode(progress[2]["preview_b64"])))
        self.assertEqual((picture.format, picture.size), ("JPEG", (256, 128)))
        self.assertEqual(outcome.result.metadata.engine["previews"], 3)
        self.assertIn("preview_ms", outcome.result.metadata.timings)
        rec = Recorder()
        engine.run(stub_job(10, preview_every=0), rec, CancelToken())
        self.assertFalse(any("preview_b64" in d for e, _s, d in rec.events))

    def test_default_gives_six_previews_at_30_steps(self):
        """Without preview_every a 30-step job gets 6 previews."""
        engine = Engine(backend="cpu-stub")
        self.addCleanup(engine.close)
        rec = Recorder()
        engine.run(stub_job(30), rec, CancelToken())
        self.assertEqual(sum("preview_b64" in d for e, _s, d in rec.events), 6)


class StorePreviewTests(TestCase):
    def setUp(self):
        self.artifacts = ArtifactStore(self.mktemp(), reactor, reactor.getThreadPool())

    @inlineCallbacks
    def test_bytes_become_an_artifact(self):
        """Preview bytes are stored content-addressed; the event keeps its fields plus preview_url and preview_sha256."""
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
        data = {"step": 5, "total": 10, "preview_b64": base64.b64encode(buf.getvalue()).decode(),
                "preview_mime": "image/jpeg"}
        out = yield ensureDeferred(store_preview(self.artifacts, data))
        self.assertEqual(set(out), {"step", "total", "preview_url", "preview_sha256"})
        self.assertEqual(out["preview_url"], f"/v1/artifacts/{out['preview_sha256']}")
        stored = yield self.artifacts.get(out["preview_sha256"])
        self.assertEqual(stored, (buf.getvalue(), "image/jpeg"))
        self.assertIn("preview_b64", data)  # the caller's dict is not changed

    @inlineCallbacks
    def test_malformed_preview_is_dropped_not_fatal(self):
        """Bad base64, an unknown mime type or an oversized preview is dropped; the step event itself stays."""
        for extra in ({"preview_b64": "***", "preview_mime": "image/jpeg"},
                      {"preview_b64": "aGk=", "preview_mime": "text/html"},
                      {"preview_b64": "A" * (2 * 1024 * 1024), "preview_mime": "image/jpeg"}):
            out = yield ensureDeferred(store_preview(self.artifacts, {"step": 1, **extra}))
            self.assertEqual(out, {"step": 1})

    @inlineCallbacks
    def test_events_without_preview_untouched(self):
        """An event without preview bytes passes through as it is."""
        data = {"step": 1, "total": 2}
        out = yield ensureDeferred(store_preview(self.artifacts, data))
        self.assertIs(out, data)
