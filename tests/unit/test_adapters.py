"""LoRA adapter files and the adapter gate, without torch: folder rules, header checks, who runs with which set."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from omnirt.contract import AdapterRef
from omnirt.engine.adapters import (
    AdapterDirs,
    AdapterGate,
    AdapterRejected,
    ResolvedAdapter,
    read_safetensors_metadata,
)
from omnirt.engine.base import CancelToken, JobCancelled
from tests.unit.gateway_harness import body_for
from tests.unit.test_gateway import GatewayTestCase


def write_safetensors(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A valid safetensors file with one float32 tensor (no torch needed to write it)."""
    header: dict = {"unet.x.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00\x00\x80\x3f")
    return path


class AdapterDirsTests(SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp()).absolute()
        self.dir = self.root / "loras"
        self.dir.mkdir(parents=True)
        write_safetensors(self.dir / "style.safetensors", {"omnirt.model": "sdxl-base-1.0"})
        self.dirs = AdapterDirs([str(self.dir)])

    def rejected(self, model, refs) -> AdapterRejected:
        return self.assertRaises(AdapterRejected, self.dirs.resolve, model, [AdapterRef(**r) for r in refs])

    def test_name_resolves_inside_the_folder(self):
        """A name finds NAME.safetensors in an adapter folder; the label is the name, the key the file's identity."""
        (adapter,) = self.dirs.resolve("sdxl-base-1.0", [AdapterRef(name="style", scale=0.5)])
        self.assertEqual((adapter.path, adapter.scale, adapter.label, adapter.field),
                         (str(self.dir / "style.safetensors"), 0.5, "style", "name"))
        self.assertTrue(adapter.adapter_name.isidentifier())

    def test_key_changes_when_the_file_changes(self):
        """Rewriting an adapter file gives it a new key, so a cached copy of the old one is not reused."""
        (before,) = self.dirs.resolve("sdxl-base-1.0", [AdapterRef(name="style")])
        path = self.dir / "style.safetensors"
        write_safetensors(path, {"omnirt.model": "sdxl-base-1.0", "v": "2"})
        os.utime(path, ns=(1, 1))
        (after,) = self.dirs.resolve("sdxl-base-1.0", [AdapterRef(name="style")])
        self.assertNotEqual(before.key, after.key)

    def test_unknown_name_lists_known(self):
        """An unknown name is a 400 at adapters.N.name listing the names on offer."""
        exc = self.rejected("sdxl-base-1.0", [{"name": "style"}, {"name": "nope"}])
        self.assertEqual(exc.problems[0].loc, ("adapters", 1, "name"))
        self.assertIn("known: style", exc.problems[0].msg)

    def test_symlink_out_of_the_folder_is_refused(self):
        """A name that is a symlink leading out of the folder is not followed."""
        write_safetensors(self.root / "secret.safetensors")
        (self.dir / "link.safetensors").symlink_to(self.root / "secret.safetensors")
        exc = self.rejected("sdxl-base-1.0", [{"name": "link"}])
        self.assertIn("unknown adapter", exc.problems[0].msg)

    def test_path_outside_is_refused(self):
        """A path outside every adapter folder (also via ..) is refused, naming adapters.N.path."""
        write_safetensors(self.root / "outside.safetensors")
        for path in (self.root / "outside.safetensors", self.dir / ".." / "outside.safetensors"):
            exc = self.rejected("sdxl-base-1.0", [{"path": str(path)}])
            self.assertEqual(exc.problems[0].loc, ("adapters", 0, "path"))
            self.assertIn("outside", exc.problems[0].msg)

    def test_path_inside_is_accepted(self):
        """A path inside a folder (a sub-folder too) is accepted; its label is the path as given."""
        (self.dir / "sub").mkdir()
        path = write_safetensors(self.dir / "sub" / "deep.safetensors")
        (adapter,) = self.dirs.resolve("sdxl-base-1.0", [AdapterRef(path=str(path))])
        self.assertEqual((adapter.label, adapter.field), (str(path), "path"))

    def test_other_model_from_metadata(self):
        """Metadata naming another model (ours, or kohya's base-model name) is a 400 before any load."""
        write_safetensors(self.dir / "kohya.safetensors", {"ss_base_model_version": "sdxl_refiner_v1-0"})
        exc = self.rejected("sdxl-base-1.0", [{"name": "kohya"}])
        self.assertIn("made for 'sdxl-refiner-1.0'", exc.problems[0].msg)
        exc = self.rejected("sdxl-refiner-1.0", [{"name": "style"}])
        self.assertIn("made for 'sdxl-base-1.0'", exc.problems[0].msg)

    def test_not_safetensors(self):
        """Empty, short, absurd-header, non-JSON and tensor-less files are each refused as not safetensors."""
        bodies = [b"", b"\x01\x02", struct.pack("<Q", 2**40) + b"{}", struct.pack("<Q", 4) + b"nope",
                  struct.pack("<Q", 2) + b"{}"]
        for i, body in enumerate(bodies):
            (self.dir / f"bad{i}.safetensors").write_bytes(body)
            exc = self.rejected("sdxl-base-1.0", [{"name": f"bad{i}"}])
            self.assertIn("not a readable safetensors file", exc.problems[0].msg, body)

    def test_no_folders_means_unsupported(self):
        """Without --adapter-dir every request with adapters is refused; one without adapters is not."""
        exc = self.assertRaises(AdapterRejected, AdapterDirs(()).resolve, "sdxl-base-1.0", [AdapterRef(name="x")])
        self.assertIn("adapters are not supported by this server", exc.message)
        self.assertEqual(AdapterDirs(()).resolve("sdxl-base-1.0", None), [])

    def test_metadata_reader(self):
        """The reader returns the metadata of a well-formed file."""
        path = write_safetensors(self.dir / "m.safetensors", {"a": "b"})
        self.assertEqual(read_safetensors_metadata(str(path)), {"a": "b"})


class RecordingOps:
    """A pipeline stand-in that records what the gate did to it, and which set each job saw."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple] = []
        self.loaded: set[str] = set()
        self.active: tuple = ()
        self.fail_on = fail_on

    def load_adapter(self, adapter):
        self.calls.append(("load", adapter.label))
        if adapter.label == self.fail_on:
            raise AdapterRejected([])
        self.loaded.add(adapter.adapter_name)

    def delete_adapter(self, name):
        self.calls.append(("delete", name))
        self.loaded.discard(name)

    def activate_adapters(self, names, scales):
        self.active = tuple(zip(names, scales, strict=True))

    def deactivate_adapters(self):
        self.active = ()


def lora(label: str, scale: float = 1.0, index: int = 0) -> ResolvedAdapter:
    return ResolvedAdapter(index=index, path=f"/l/{label}", scale=scale, key=label * 8, label=label)


class AdapterGateTests(SynchronousTestCase):
    def test_switch_only_when_the_set_changes(self):
        """The same set twice is one switch; another scale of the same adapter switches without reloading."""
        ops = RecordingOps()
        gate = AdapterGate(ops)
        for adapters, switched in (([lora("a")], True), ([lora("a")], False), ([lora("a", 0.5)], True), ([], True)):
            with gate.use(adapters) as held:
                self.assertEqual(held["switched"], switched)
                self.assertEqual(ops.active, tuple((a.adapter_name, a.scale) for a in adapters))
        self.assertEqual(ops.calls, [("load", "a")])

    def test_lru_eviction(self):
        """Beyond capacity the least recently used adapter is deleted; the ones a job needs never are."""
        ops = RecordingOps()
        gate = AdapterGate(ops, capacity=2)
        for label in ("a", "b", "a", "c"):
            with gate.use([lora(label)]):
                pass
        self.assertEqual(gate.loaded_labels(), ["a", "c"])
        self.assertIn(("delete", lora("b").adapter_name), ops.calls)
        with gate.use([lora("a"), lora("d", index=1)]):
            self.assertEqual(sorted(gate.loaded_labels()), ["a", "d"])

    def test_failed_load_leaves_state_unknown_then_recovers(self):
        """A load failure propagates; the next job switches again from scratch (nothing stale stays active)."""
        ops = RecordingOps(fail_on="bad")
        gate = AdapterGate(ops)
        with gate.use([lora("a")]):
            pass
        with self.assertRaises(AdapterRejected):
            with gate.use([lora("a"), lora("bad", index=1)]):
                self.fail("must not run")
        with gate.use([lora("a")]) as held:
            self.assertTrue(held["switched"])
            self.assertEqual(ops.active, ((lora("a").adapter_name, 1.0),))
        self.assertEqual(gate.loaded_labels(), ["a"])

    def test_different_sets_never_overlap(self):
        """Threads with different sets are never inside at once; threads with the same set may share."""
        ops = RecordingOps()
        gate = AdapterGate(ops)
        inside: list[tuple] = []
        seen_mixed = []
        lock = threading.Lock()
        start = threading.Barrier(6)

        def job(adapters):
            start.wait(10)
            for _ in range(20):
                with gate.use(adapters):
                    with lock:
                        inside.append(ops.active)
                        if len(set(inside)) > 1:
                            seen_mixed.append(list(inside))
                        if ops.active != tuple((a.adapter_name, a.scale) for a in adapters):
                            seen_mixed.append(("wrong set", ops.active))
                    with lock:
                        inside.remove(ops.active)

        sets = [[], [lora("a")], [lora("a", 0.5)], [], [lora("a")], [lora("b")]]
        threads = [threading.Thread(target=job, args=(s,)) for s in sets]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertFalse(any(t.is_alive() for t in threads))
        self.assertEqual(seen_mixed, [])

    def test_cancel_while_waiting(self):
        """A job waiting for the pipeline to switch stops with JobCancelled when its token fires."""
        gate = AdapterGate(RecordingOps())
        token = CancelToken()
        token.cancel("client left")
        with gate.use([lora("a")]):
            with self.assertRaises(JobCancelled):
                with gate.use([lora("b")], token):
                    self.fail("must not run")
        with gate.use([lora("b")]) as held:  # the queue is clean afterwards
            self.assertTrue(held["switched"])


class GatewayAdapterTests(GatewayTestCase):
    @inlineCallbacks
    def test_adapters_refused_without_adapter_dir(self):
        """A server whose only worker has no --adapter-dir answers a request with adapters 400, naming the field."""
        self.h.service.adapter_check = AdapterDirs(())
        body = body_for()
        body["adapters"] = [{"kind": "lora", "name": "style", "scale": 0.8}]
        resp, content = yield self.h.request("POST", "/v1/jobs", body)
        self.assertEqual(resp.code, 400)
        detail = json.loads(content)["detail"]
        self.assertEqual(detail[0]["loc"], ["adapters"])
        self.assertIn("adapters are not supported by this server", detail[0]["msg"])

    @inlineCallbacks
    def test_bad_scale_is_400(self):
        """A scale out of range is a 400 at adapters.0.scale, whatever the server's folders."""
        body = body_for()
        body["adapters"] = [{"name": "style", "scale": 9}]
        resp, content = yield self.h.request("POST", "/v1/generate", body)
        self.assertEqual(resp.code, 400)
        self.assertEqual(json.loads(content)["detail"][0]["loc"], ["adapters", 0, "scale"])


def _png(size) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class GatewayInpaintTests(GatewayTestCase):
    @inlineCallbacks
    def test_mask_size_checked_at_submission(self):
        """An inpaint mask of another size than its image is a 400 at inputs.mask, before any worker sees it."""
        body = {"task": "inpaint", "model": "sdxl-base-1.0",
                "inputs": {"prompt": "a door", "image": _png((64, 64)), "mask": _png((64, 32))},
                "config": {"width": 64, "height": 64, "num_inference_steps": 2}}
        resp, content = yield self.h.request("POST", "/v1/jobs", body)
        self.assertEqual(resp.code, 400, content)
        detail = json.loads(content)["detail"]
        self.assertEqual(detail[0]["loc"], ["inputs", "mask"])
        self.assertIn("64x32 but the image is 64x64", detail[0]["msg"])
        body["inputs"]["mask"] = "bm90IGFuIGltYWdl"
        resp, content = yield self.h.request("POST", "/v1/jobs", body)
        self.assertEqual((resp.code, json.loads(content)["detail"][0]["loc"]), (400, ["inputs", "mask"]))


class AdapterRoutingTests(SynchronousTestCase):
    """Routing by warm adapters, on the real gateway (dispatcher, pool) with fake workers."""

    @inlineCallbacks
    def _dispatched(self, workers, adapters):
        from tests.unit.gateway_harness import Harness

        h = Harness(self, workers)
        yield h.start()
        body = body_for()
        if adapters:
            body["adapters"] = adapters
        code, job, _ = yield h.json("POST", "/v1/jobs", body)
        self.assertEqual(code, 202, job)
        record = yield h.record(job["id"])
        return next(e.data for e in record.events if e.event == "job_dispatched")

    def _workers(self):
        from tests.support.fakes import ControlledWorker

        idle, warm = ControlledWorker("idle"), ControlledWorker("warm")
        warm.loaded = idle.loaded = ("sdxl-base-1.0",)
        warm.loaded_adapters = ("sdxl-base-1.0:style",)
        return [idle, warm]

    def test_warm_adapter_first(self):
        """A job with an adapter goes to the worker that has it loaded, and job_dispatched says why."""
        data = self.successResultOf(self._dispatched(self._workers(), [{"name": "style"}]))
        self.assertEqual((data["worker_id"], data["reason"]), ("warm", "warm adapter"))

    @inlineCallbacks
    def _readiness(self, workers):
        from tests.unit.gateway_harness import Harness

        h = Harness(self, workers)
        yield h.start()
        code, body, _ = yield h.json("GET", "/readyz")
        return code, body

    def test_readyz_lists_loaded_adapters(self):
        """/readyz shows each worker's loaded adapters as its health reported them."""
        code, body = self.successResultOf(self._readiness(self._workers()))
        self.assertEqual(code, 200, body)
        adapters = {w["worker_id"]: w["loaded_adapters"] for w in body["workers"]}
        self.assertEqual(adapters, {"idle": [], "warm": ["sdxl-base-1.0:style"]})

    def test_without_adapters_warm_model(self):
        """A job without adapters is routed as before (warm model, least loaded), the reason says so."""
        data = self.successResultOf(self._dispatched(self._workers(), None))
        self.assertEqual(data["reason"], "warm model")


class RefinerAdmissionTests(GatewayTestCase):
    @inlineCallbacks
    def test_refiner_no_worker_serves(self):
        """A base + refiner job where no configured worker serves the refiner is a 503 at submit, not a queued job."""
        from tests.support.fakes import ControlledWorker
        from tests.unit.gateway_harness import Harness

        h = Harness(self, [ControlledWorker("w1", models=("sdxl-base-1.0",))])
        yield h.start()
        code, out, _ = yield h.json("POST", "/v1/jobs", body_for(refiner={"model": "sdxl-refiner-1.0", "switch_at": 0.7}))
        self.assertEqual(code, 503, out)
        self.assertIn("refiner", out["detail"])
        code, out, _ = yield self.h.json("POST", "/v1/jobs", body_for(refiner={"model": "sdxl-refiner-1.0",
                                                                              "switch_at": 1.5}))
        self.assertEqual((code, out["detail"][0]["loc"]), (400, ["config", "refiner", "switch_at"]))
