"""The model registry: listing, tiers, merge order (defaults -> task -> preset -> user), and every validation rule."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from omnirt.contract import GenerateRequest, ModelTierForbidden, RequestInvalid, UnknownModel
from omnirt.registry import (
    MAX_ADAPTER_SCALE,
    MAX_ADAPTERS,
    MAX_IMAGES,
    MAX_SIDE,
    MAX_STEPS,
    MAX_STUB_STEP_DELAY_MS,
    MODELS,
    PRESETS,
    get_model,
    list_models,
    merge_config,
    resolve_request,
)


def make(task="text2image", model="sdxl-base-1.0", backend="auto", inputs=None, config=None,
         adapters=None) -> GenerateRequest:
    if inputs is None:
        inputs = {"prompt": "a lighthouse"} if task == "text2image" else {"prompt": "x", "image": "aGVsbG8="}
    return GenerateRequest(task=task, model=model, backend=backend, inputs=inputs, config=config or {},
                           adapters=adapters)


class ListingTests(SynchronousTestCase):
    def test_models_and_tiers(self):
        """Both SDXL models are listed; a tier filter keeps only models of that tier."""
        self.assertEqual({m.id for m in list_models()}, {"sdxl-base-1.0", "sdxl-refiner-1.0"})
        self.assertEqual(list_models(["experimental"]), [])
        self.assertEqual({m.id for m in list_models(["adjacent"])}, set(MODELS))

    def test_openai_listing_fields(self):
        """The /v1/models entry carries the fields of the wire contract."""
        entry = get_model("sdxl-refiner-1.0").to_openai()
        for field in ("id", "object", "created", "owned_by", "task", "status", "tier", "maturity",
                      "default_backend", "summary"):
            self.assertIn(field, entry)
        self.assertEqual(entry["task"], "image2image")

    def test_unknown_model_names_known_ones(self):
        """An unknown model id is a 404 whose message lists the known ids."""
        exc = self.assertRaises(UnknownModel, resolve_request, make(model="sdxl-9"))
        self.assertEqual(exc.status, 404)
        self.assertIn("sdxl-base-1.0", exc.message)

    def test_tier_policy(self):
        """A model outside the server's allowed tiers is a 403, checked before any content problem."""
        bad = make(config={"width": 3})
        exc = self.assertRaises(ModelTierForbidden, resolve_request, bad, ["core"])
        self.assertEqual(exc.status, 403)
        self.assertRaises(RequestInvalid, resolve_request, bad, ["core", "adjacent"])


class MergeOrderTests(SynchronousTestCase):
    def test_defaults_apply(self):
        """With no config, the model defaults fill every field."""
        config = resolve_request(make()).config
        self.assertEqual((config["width"], config["height"], config["num_inference_steps"]), (1024, 1024, 30))
        self.assertEqual(config["scheduler"], "euler-discrete")
        self.assertIsNone(config["seed"])

    def test_task_defaults_differ_per_model(self):
        """image2image strength comes from each model's task defaults (base 0.8, refiner 0.3)."""
        self.assertEqual(resolve_request(make(task="image2image")).config["strength"], 0.8)
        self.assertEqual(
            resolve_request(make(task="image2image", model="sdxl-refiner-1.0")).config["strength"], 0.3
        )

    def test_preset_over_defaults_user_over_preset(self):
        """A preset overrides defaults, and the user's own values override the preset."""
        config = resolve_request(make(config={"preset": "fast", "guidance_scale": 3.0})).config
        self.assertEqual(config["num_inference_steps"], PRESETS["fast"]["num_inference_steps"])
        self.assertEqual(config["guidance_scale"], 3.0)
        self.assertEqual(resolve_request(make(config={"preset": "low-vram"})).config["dtype"], "fp16")
        low = resolve_request(make(config={"preset": "low-vram"})).config
        self.assertEqual((low["memory_mode"], low["num_inference_steps"]), ("low-vram", 30))  # steps untouched
        user = resolve_request(make(config={"preset": "low-vram", "dtype": "fp32", "num_inference_steps": 5}))
        self.assertEqual((user.config["dtype"], user.config["num_inference_steps"]), ("fp32", 5))

    def test_merge_config_does_not_touch_the_spec(self):
        """Merging never mutates the registry's defaults."""
        spec = get_model("sdxl-base-1.0")
        before = dict(spec.defaults)
        merge_config(spec, "image2image", {"width": 8, "preset": "quality"})
        self.assertEqual(spec.defaults, before)

    def test_resolved_request_keeps_everything_else(self):
        """Resolution changes only the config: task, model, backend and inputs come back as sent."""
        request = make(backend="cpu-stub", inputs={"prompt": "p", "negative_prompt": "n"})
        resolved = resolve_request(request)
        self.assertEqual(resolved.model_copy(update={"config": {}}), request)


#: (case name, request, expected problem location, a fragment of its message)
PROBLEM_CASES = [
    ("task not served", make(model="sdxl-refiner-1.0"), ("task",), "does not serve"),
    ("unknown backend", make(backend="tpu"), ("backend",), "unknown backend"),
    ("unknown input key", make(inputs={"prompt": "p", "depth": "x"}), ("inputs", "depth"), "unknown input key"),
    ("mask on text2image", make(inputs={"prompt": "p", "mask": "x"}), ("inputs", "mask"), "takes no input mask"),
    ("inpaint without mask", make(task="inpaint", inputs={"prompt": "p", "image": "aGk="}), ("inputs", "mask"), "needs an input mask"),
    ("inpaint mask wrong type", make(task="inpaint", inputs={"image": "aGk=", "mask": 3}), ("inputs", "mask"), "base64 string"),
    ("inpaint on refiner", make(task="inpaint", model="sdxl-refiner-1.0", inputs={"image": "aGk=", "mask": "aGk="}), ("task",), "does not serve"),
    ("unknown config key", make(config={"steps": 3}), ("config", "steps"), "unknown config key"),
    ("missing prompt", make(inputs={}), ("inputs", "prompt"), "non-empty prompt"),
    ("blank prompt", make(inputs={"prompt": "   "}), ("inputs", "prompt"), "non-empty prompt"),
    ("prompt not a string", make(task="image2image", inputs={"prompt": 5, "image": "aGk="}), ("inputs", "prompt"), "must be a string"),
    ("negative not a string", make(inputs={"prompt": "p", "negative_prompt": ["x"]}), ("inputs", "negative_prompt"), "must be a string"),
    ("image missing", make(task="image2image", inputs={"prompt": "p"}), ("inputs", "image"), "needs an input image"),
    ("image wrong type", make(task="image2image", inputs={"image": 42}), ("inputs", "image"), "base64 string"),
    ("image on text2image", make(inputs={"prompt": "p", "image": "aGk="}), ("inputs", "image"), "takes no input image"),
    ("unknown preset", make(config={"preset": "turbo"}), ("config", "preset"), "unknown preset"),
    ("width not int", make(config={"width": "64"}), ("config", "width"), "must be an integer"),
    ("width bool", make(config={"width": True}), ("config", "width"), "must be an integer"),
    ("height not multiple", make(config={"height": 100}), ("config", "height"), "multiple of 8"),
    ("width zero", make(config={"width": 0}), ("config", "width"), "positive multiple"),
    ("width too big", make(config={"width": MAX_SIDE + 8}), ("config", "width"), f"at most {MAX_SIDE}"),
    ("steps not int", make(config={"num_inference_steps": 2.5}), ("config", "num_inference_steps"), "must be an integer"),
    ("steps too many", make(config={"num_inference_steps": MAX_STEPS + 1}), ("config", "num_inference_steps"), "between 1"),
    ("guidance not number", make(config={"guidance_scale": "7"}), ("config", "guidance_scale"), "between 0 and 50"),
    ("guidance out of range", make(config={"guidance_scale": 51}), ("config", "guidance_scale"), "between 0 and 50"),
    ("seed negative", make(config={"seed": -1}), ("config", "seed"), "seed must be"),
    ("seed float", make(config={"seed": 1.5}), ("config", "seed"), "seed must be"),
    ("unknown scheduler", make(config={"scheduler": "lms"}), ("config", "scheduler"), "unknown scheduler"),
    ("unknown dtype", make(config={"dtype": "int8"}), ("config", "dtype"), "unknown dtype"),
    ("too many images", make(config={"num_images_per_prompt": MAX_IMAGES + 1}), ("config", "num_images_per_prompt"), "from 1 to"),
    ("stub delay negative", make(config={"stub_step_delay_ms": -1}), ("config", "stub_step_delay_ms"), "from 0 to"),
    ("stub delay too long", make(config={"stub_step_delay_ms": MAX_STUB_STEP_DELAY_MS + 1}), ("config", "stub_step_delay_ms"), "from 0 to"),
    ("aesthetic not number", make(task="image2image", model="sdxl-refiner-1.0", config={"aesthetic_score": "high"}), ("config", "aesthetic_score"), "must be a number"),
    ("strength zero", make(task="image2image", config={"strength": 0}), ("config", "strength"), "(0, 1]"),
    ("strength above one", make(task="image2image", config={"strength": 1.5}), ("config", "strength"), "(0, 1]"),
    ("steps x strength < 1", make(task="image2image", config={"num_inference_steps": 2, "strength": 0.3}), ("config", "strength"), "at least 1"),
    ("strength on text2image", make(config={"strength": 0.5}), ("config", "strength"), "only applies to image2image"),
    ("preview_every negative", make(config={"preview_every": -1}), ("config", "preview_every"), "from 0 (off)"),
    ("preview_every float", make(config={"preview_every": 2.5}), ("config", "preview_every"), "from 0 (off)"),
    ("refiner not object", make(config={"refiner": "sdxl-refiner-1.0"}), ("config", "refiner"), "must be an object"),
    ("refiner unknown model", make(config={"refiner": {"model": "nope"}}), ("config", "refiner", "model"), "sdxl-refiner-1.0"),
    ("refiner is the base", make(config={"refiner": {"model": "sdxl-base-1.0"}}), ("config", "refiner", "model"), "must be one of"),
    ("refiner switch 0", make(config={"refiner": {"model": "sdxl-refiner-1.0", "switch_at": 0}}), ("config", "refiner", "switch_at"), "strictly between"),
    ("refiner switch 1", make(config={"refiner": {"model": "sdxl-refiner-1.0", "switch_at": 1.0}}), ("config", "refiner", "switch_at"), "strictly between"),
    ("refiner extra key", make(config={"refiner": {"model": "sdxl-refiner-1.0", "steps": 3}}), ("config", "refiner", "steps"), "unknown refiner key"),
    ("refiner on image2image", make(task="image2image", config={"refiner": {"model": "sdxl-refiner-1.0"}}), ("config", "refiner"), "after a text2image"),
    ("unknown memory mode", make(config={"memory_mode": "tiny"}), ("config", "memory_mode"), "unknown memory_mode"),
    ("adapter kind", make(adapters=[{"kind": "hypernetwork", "name": "a"}]), ("adapters", 0, "kind"), "unknown adapter kind"),
    ("adapter name and path", make(adapters=[{"name": "a", "path": "/x/a.safetensors"}]), ("adapters", 0, "name"), "exactly one"),
    ("adapter neither", make(adapters=[{"scale": 1.0}]), ("adapters", 0, "name"), "exactly one"),
    ("adapter name with folder", make(adapters=[{"name": "../etc/a"}]), ("adapters", 0, "name"), "plain file name"),
    ("adapter hidden name", make(adapters=[{"name": ".a"}]), ("adapters", 0, "name"), "plain file name"),
    ("adapter empty path", make(adapters=[{"path": ""}]), ("adapters", 0, "path"), "non-empty"),
    ("adapter scale high", make(adapters=[{"name": "a", "scale": MAX_ADAPTER_SCALE + 0.5}]), ("adapters", 0, "scale"), "scale must be"),
    ("adapter scale nan", make(adapters=[{"name": "a", "scale": float("nan")}]), ("adapters", 0, "scale"), "scale must be"),
    ("adapter twice", make(adapters=[{"name": "a"}, {"name": "a", "scale": 0.5}]), ("adapters", 1), "listed twice"),
    ("too many adapters", make(adapters=[{"name": f"a{i}"} for i in range(MAX_ADAPTERS + 1)]), ("adapters",), f"at most {MAX_ADAPTERS}"),
]


class ValidationTests(SynchronousTestCase):
    def test_each_rule(self):
        """Each rule reports exactly its own problem, at the right field, with a message saying what is wrong."""
        for name, request, loc, fragment in PROBLEM_CASES:
            exc = self.assertRaises(RequestInvalid, resolve_request, request)
            rendered = [(p.loc, p.msg) for p in exc.problems]
            self.assertEqual([p.loc for p in exc.problems], [loc], f"{name}: {rendered}")
            self.assertIn(fragment, exc.problems[0].msg, name)

    def test_all_problems_together(self):
        """A request breaking many rules gets every problem in one error, not just the first."""
        request = make(
            backend="tpu",
            inputs={"prompt": "", "depth": 1},
            config={"width": 7, "height": 4096, "num_inference_steps": 0, "scheduler": "x", "seed": -3, "zzz": 1},
        )
        exc = self.assertRaises(RequestInvalid, resolve_request, request)
        locs = [p.loc for p in exc.problems]
        expected = [
            ("backend",), ("inputs", "depth"), ("config", "zzz"), ("inputs", "prompt"), ("config", "width"),
            ("config", "height"), ("config", "num_inference_steps"), ("config", "seed"), ("config", "scheduler"),
        ]
        self.assertEqual(sorted(locs), sorted(expected))
        self.assertEqual(len(exc.detail()), len(expected))

    def test_valid_edges_pass(self):
        """The boundary values themselves are accepted."""
        resolve_request(make(config={"width": MAX_SIDE, "height": 8, "num_inference_steps": MAX_STEPS,
                                     "guidance_scale": 0, "seed": 2**63 - 1,
                                     "num_images_per_prompt": MAX_IMAGES, "stub_step_delay_ms": 0}))
        resolve_request(make(task="image2image", config={"num_inference_steps": 1, "strength": 1.0}))
        resolve_request(make(task="image2image", inputs={"image": {"artifact": "ab" * 32}}))
        self.assertEqual(resolve_request(make(config={"refiner": {"model": "sdxl-refiner-1.0"}})).config["refiner"],
                         {"model": "sdxl-refiner-1.0", "switch_at": 0.8})
        resolve_request(make(adapters=[{"name": "a", "scale": -MAX_ADAPTER_SCALE}, {"path": "/x/b", "scale": 0}]))
