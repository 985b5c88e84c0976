"""Dynamic batching on real diffusers (tiny offline SDXL, CPU): bitwise-equal members, own events, cancel."""

from __future__ import annotations

import functools
import threading

from twisted.trial.unittest import SynchronousTestCase

from omnirt.engine.base import CancelToken, JobCancelled
from omnirt.engine.engine import Engine
from omnirt.engine.options import EngineOptions
from tests.integration.test_engine_sdxl import sdxl_job, tiny_paths

#: a window no test may wait out: a job that did wait for it would time the test out
FOREVER_MS = 600_000.0
PROMPTS = ("a watercolor lighthouse", "a red fox in the snow", "x", "an old map of a harbour town, ink")


@functools.cache
def solo_engine() -> Engine:
    return Engine(backend="cpu", model_paths=tiny_paths())


def batching_engine(window_ms: float = 200.0, size: int = 4) -> Engine:
    return Engine(backend="cpu", model_paths=tiny_paths(),
                  options=EngineOptions(batch_window_ms=window_ms, max_batch_size=size))


class Member:
    """One job's own view: its events (job_started first, from on_started) and its outcome."""

    def __init__(self, index: int, steps: int = 2, **config):
        self.job = sdxl_job(f"job-{index}", inputs={"prompt": PROMPTS[index % len(PROMPTS)]},
                            seed=100 + index, num_inference_steps=steps, **config)
        self.job.on_started = lambda data: self.events.append(("job_started", "job", data))
        self.events: list[tuple[str, str, dict]] = []
        self.cancel = CancelToken()
        self.outcome = None
        self.error: BaseException | None = None
        self.on_event = None

    def emit(self, event: str, stage: str, data: dict) -> None:
        self.events.append((event, stage, data))
        if self.on_event is not None:
            self.on_event(self, event, data)

    def run(self, engine: Engine) -> None:
        try:
            self.outcome = engine.run(self.job, self.emit, self.cancel)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc

    def progress_steps(self) -> list[int]:
        return [d["step"] for e, _s, d in self.events if e == "stage_progress"]


def run_together(engine: Engine, members: list[Member]) -> None:
    threads = [threading.Thread(target=m.run, args=(engine,)) for m in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def solo_blobs(member_index: int, steps: int = 2, **config) -> list[bytes]:
    solo = Member(member_index, steps, **config)
    solo.run(solo_engine())
    assert solo.outcome is not None, solo.error
    return solo.outcome.blobs


class BatchingTests(SynchronousTestCase):
    def test_members_equal_their_solo_images_bit_for_bit(self):
        """Four compatible jobs (own prompts and seeds) share one call, and each member's PNG bytes
        equal those it gets alone; with two images each and with a noise-drawing scheduler too."""
        for config in ({}, {"num_images_per_prompt": 2}, {"scheduler": "euler-ancestral"}):
            engine = batching_engine(window_ms=FOREVER_MS, size=4)  # the 4th job closes the group
            members = [Member(i, **config) for i in range(4)]
            run_together(engine, members)
            groups = set()
            for i, member in enumerate(members):
                self.assertIsNone(member.error, (config, i))
                report = member.outcome.result.metadata
                groups.add(report.batch_group_id)
                self.assertEqual(report.batch_size, 4 * int(config.get("num_images_per_prompt", 1)))
                self.assertEqual(member.outcome.blobs, solo_blobs(i, **config), (config, i))
            self.assertEqual(len(groups), 1)
            self.assertNotIn("", groups)
            engine.close()

    def test_each_member_gets_its_own_events(self):
        """Every member sees job_started (with batch_group_id and batch_size) first, then every
        denoise step once, its own decode and export; its report says the batch too."""
        engine = batching_engine(window_ms=FOREVER_MS, size=3)
        members = [Member(i, steps=3, preview_every=2 if i == 0 else 0) for i in range(3)]
        run_together(engine, members)
        group_ids = set()
        for member in members:
            self.assertIsNone(member.error)
            first = member.events[0]
            self.assertEqual(first[0], "job_started")
            self.assertEqual(first[2]["batch_size"], 3)
            group_ids.add(first[2]["batch_group_id"])
            self.assertEqual(member.progress_steps(), [1, 2, 3])
            ends = [s for e, s, _d in member.events if e == "stage_end"]
            for stage in ("encode_prompt", "denoise", "decode", "export"):
                self.assertEqual(ends.count(stage), 1, stage)
            self.assertEqual(member.outcome.result.metadata.batch_group_id, first[2]["batch_group_id"])
        self.assertEqual(len(group_ids), 1)
        previews = [d["step"] for e, _s, d in members[0].events
                    if e == "stage_progress" and any(k.startswith("preview") for k in d)]
        self.assertEqual(previews, [2])  # only the member that asked for previews, at step 2
        self.assertFalse(any(k.startswith("preview") for m in members[1:] for e, _s, d in m.events
                             if e == "stage_progress" for k in d))
        self.assertEqual(members[0].outcome.result.metadata.engine.get("previews"), 1)
        engine.close()

    def test_cancelling_one_member_leaves_the_others(self):
        """A member cancelled at its first step ends cancelled at once; the others finish with
        their solo images."""
        engine = batching_engine(window_ms=FOREVER_MS, size=3)
        members = [Member(i, steps=4) for i in range(3)]

        def cancel_at_first_step(member, event, data):
            if event == "stage_progress" and data["step"] == 1:
                member.cancel.cancel("cancelled by request")

        members[1].on_event = cancel_at_first_step
        run_together(engine, members)
        self.assertIsInstance(members[1].error, JobCancelled)
        self.assertIsNone(members[1].outcome)
        for i in (0, 2):
            self.assertIsNone(members[i].error)
            self.assertEqual(members[i].progress_steps(), [1, 2, 3, 4])
            self.assertEqual(members[i].outcome.blobs, solo_blobs(i, steps=4))
        engine.close()

    def test_cancelling_every_member_stops_the_call(self):
        """With every member cancelled at step 1, the call stops there: no member sees step 2."""
        engine = batching_engine(window_ms=FOREVER_MS, size=2)
        members = [Member(i, steps=6) for i in range(2)]

        def cancel_at_first_step(member, event, data):
            if event == "stage_progress" and data["step"] == 1:
                member.cancel.cancel("cancelled by request")

        for member in members:
            member.on_event = cancel_at_first_step
        run_together(engine, members)
        for member in members:
            self.assertIsInstance(member.error, JobCancelled)
            self.assertEqual(member.progress_steps(), [1])
        engine.close()

    def test_unbatchable_jobs_never_wait_for_the_window(self):
        """With a window no test could wait out, jobs that cannot batch (several images with a
        noise-drawing scheduler, no guidance on cpu, a refiner hand-off) run at once and alone."""
        engine = batching_engine(window_ms=FOREVER_MS, size=4)
        for config in ({"num_images_per_prompt": 2, "scheduler": "euler-ancestral"}, {"guidance_scale": 1.0},
                       {"refiner": {"model": "sdxl-refiner-1.0", "switch_at": 0.5}}):
            member = Member(0, **config)
            member.run(engine)
            self.assertIsNone(member.error, config)
            self.assertEqual(member.outcome.result.metadata.batch_group_id, "")
            self.assertEqual(member.events[0][2], {})  # job_started: no batch facts
            self.assertEqual(engine.batcher.open_groups(), 0)
        engine.close()

    def test_a_lone_batchable_job_runs_when_the_window_ends(self):
        """A batchable job with no company runs after the window as a batch of one, with its solo image."""
        engine = batching_engine(window_ms=20.0, size=4)
        member = Member(2)
        member.run(engine)
        self.assertIsNone(member.error)
        self.assertEqual(member.outcome.result.metadata.batch_size, 1)
        self.assertNotEqual(member.outcome.result.metadata.batch_group_id, "")
        self.assertEqual(member.outcome.blobs, solo_blobs(2))
        engine.close()

    def test_incompatible_jobs_run_in_separate_batches(self):
        """Jobs of two sizes batch only with their own size: two groups of two."""
        engine = batching_engine(window_ms=FOREVER_MS, size=2)
        members = [Member(0), Member(1), Member(2, width=32, height=32), Member(3, width=32, height=32)]
        run_together(engine, members)
        groups = [m.outcome.result.metadata.batch_group_id for m in members]
        self.assertEqual(groups[0], groups[1])
        self.assertEqual(groups[2], groups[3])
        self.assertNotEqual(groups[0], groups[2])
        engine.close()


class EfficiencyReportTests(SynchronousTestCase):
    def test_report_on_cpu(self):
        """On cpu the accelerator options read "not applicable", the attention choice is applied
        (SDPA processors by default, the classic ones on request), all in RunReport.engine and
        none of it in config_resolved; the field survives the gRPC encoding."""
        from omnirt.workers.wire import report_from_pb, report_to_pb

        engine = Engine(backend="cpu", model_paths=tiny_paths(),
                        options=EngineOptions(compile=True, channels_last=True, attention="default"))
        member = Member(0)
        member.run(engine)
        self.assertIsNone(member.error)
        report = member.outcome.result.metadata
        self.assertEqual((report.engine["compile"], report.engine["channels_last"]),
                         ("not applicable on cpu", "not applicable on cpu"))
        self.assertEqual((report.engine["attention"], report.engine["attention_processor"]),
                         ("default", "AttnProcessor"))
        self.assertNotIn("compiled", report.engine)
        self.assertEqual(report.engine["vae_dtype"], "float32")
        for key in ("compile", "attention", "channels_last", "tf32", "attention_processor"):
            self.assertNotIn(key, report.config_resolved)
        self.assertEqual(report_from_pb(report_to_pb(report)).engine, report.engine)
        engine.close()
        solo = Member(0)
        solo.run(solo_engine())
        self.assertEqual(solo.outcome.result.metadata.engine["attention_processor"], "AttnProcessor2_0")
        self.assertEqual(solo.outcome.result.metadata.engine["compile"], False)
