"""Full-size SDXL on one GPU with random weights (no downloads): bare diffusers vs our engine, worker and gateway.

``scripts/bench-gpu`` runs ``main``. The SDXL base architecture (UNet, both text encoders, VAE:
real layer counts and widths) is built from the configs in ``benchmarks/configs/sdxl-base/``
with random weights, saved once as a diffusers folder, and measured in ONE run:

- seconds per image at 1024x1024, 30 steps, batch 1/2/4, fp16, for (a) a bare diffusers loop
  (one pipeline call of ``batch`` prompts), (b) our engine in-process (``batch`` concurrent jobs,
  dynamic batching window 50 ms / max 4), (c) the same jobs through ``omnirt worker`` over gRPC
  (RunSync), (d) through the gateway (``omnirt serve --remote-worker`` onto that worker) over
  HTTP (sync ``POST /v1/generate``); each as a ratio to (a);
- peak VRAM per case, load time per path, and what ``--compile`` buys: the engine with
  torch.compile (load time including its warm-up, s/image at batch 1 and 4) vs (b).

On a host without CUDA it prints one line and exits 0; ``--device cpu --tiny`` is the CI-size
form (tiny weights from ``omnirt models make-tiny``, 64x64, 2 steps, fp32; no compile).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs" / "sdxl-base"
MODEL = "sdxl-base-1.0"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
WINDOW_MS, MAX_BATCH = 50.0, 4

NO_CUDA = ("bench-gpu: no CUDA device on this host (torch.cuda.is_available() is False): nothing measured; "
           "the CI-size form is scripts/bench-gpu --device cpu --tiny")


# -- weights ---------------------------------------------------------------------------------------

def build_full(dest: Path, device: str, dtype) -> float:
    """Write the random-weight full-size SDXL base into ``dest``; return the seconds it took."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from omnirt.models.tiny import _write_tokenizer

    started = time.perf_counter()
    tok_dir = dest / "_tokenizer_src"
    vocab_size = _write_tokenizer(tok_dir)

    def text_config(name: str) -> CLIPTextConfig:
        raw = {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}
        raw.pop("architectures", None)
        raw.update(vocab_size=max(raw["vocab_size"], vocab_size), bos_token_id=vocab_size - 2,
                   eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
        return CLIPTextConfig(**raw)

    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds instead of minutes on the CPU
        unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "unet.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((CONFIGS / "vae.json").read_text()))
        encoder_1 = CLIPTextModel(text_config("text_encoder.json"))
        encoder_2 = CLIPTextModelWithProjection(text_config("text_encoder_2.json"))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoder_1, text_encoder_2=encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)), tokenizer_2=CLIPTokenizer.from_pretrained(str(tok_dir)),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(json.loads((CONFIGS / "scheduler.json").read_text())),
        add_watermarker=False,
    )
    pipe.to(dtype=dtype)
    pipe.save_pretrained(str(dest), safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            (dest / sub / name).write_bytes((tok_dir / name).read_bytes())
    del pipe, unet, vae, encoder_1, encoder_2
    _free(device)
    return time.perf_counter() - started


def parameter_counts(folder: Path) -> dict[str, float]:
    """Millions of parameters per component, read from the safetensors headers."""
    counts = {}
    for sub in ("unet", "text_encoder", "text_encoder_2", "vae"):
        total = 0
        for f in (folder / sub).glob("*.safetensors"):
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for key, meta in header.items():
                if key != "__metadata__":
                    n = 1
                    for d in meta["shape"]:
                        n *= d
                    total += n
        counts[sub] = total / 1e6
    return counts


# -- helpers ---------------------------------------------------------------------------------------

def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0


def _config(size: int, steps: int, seed: int) -> dict[str, Any]:
    return {"width": size, "height": size, "num_inference_steps": steps, "seed": seed, "guidance_scale": 5.0}


def _together(batch: int, call) -> float:
    """Run ``call(i)`` for i < batch on as many threads at once; return the wall seconds."""
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            call(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a job failed: {errors[0]}")
    return time.perf_counter() - started


# -- the four paths ----------------------------------------------------------------------------------

#: runs of each case (the median is reported): set by ``main`` (1 at full size, 3 in the tiny form)
REPEAT = 1


def _median_time(call) -> float:
    return statistics.median(call() for _ in range(REPEAT))


def bench_bare(folder: Path, device: str, dtype, size: int, steps: int, batches: list[int]) -> dict:
    import torch
    from diffusers import StableDiffusionXLPipeline

    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=dtype, add_watermarker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    _sync(device)
    out: dict[str, Any] = {"load_s": time.perf_counter() - started, "s_per_image": {}, "peak_vram_mb": {}}
    with torch.inference_mode():
        pipe(prompt=PROMPT, num_inference_steps=2, height=size, width=size, guidance_scale=5.0, output_type="pil")
        for batch in batches:
            _reset_peak(device)

            def call(batch: int = batch, pipe=pipe) -> float:
                generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
                _sync(device)
                t = time.perf_counter()
                pipe(prompt=[PROMPT] * batch, num_inference_steps=steps, height=size, width=size, guidance_scale=5.0,
                     generator=generators, output_type="pil")
                _sync(device)
                return time.perf_counter() - t

            out["s_per_image"][batch] = _median_time(call) / batch
            out["peak_vram_mb"][batch] = _peak_mb(device)
    del pipe
    _free(device)
    return out


def _engine_request(device: str, size: int, steps: int, seed: int):
    from omnirt.contract import GenerateRequest
    from omnirt.registry import resolve_request

    return resolve_request(GenerateRequest(task="text2image", model=MODEL, backend=device,
                                           inputs={"prompt": PROMPT}, config=_config(size, steps, seed)))


def bench_engine(folder: Path, device: str, size: int, steps: int, batches: list[int], *,
                 compile: bool = False) -> dict:
    from omnirt.engine.base import CancelToken, EngineJob
    from omnirt.engine.engine import Engine
    from omnirt.engine.options import EngineOptions

    engine = Engine(backend=device, model_paths={MODEL: str(folder)}, max_concurrency=1,
                    options=EngineOptions(batch_window_ms=WINDOW_MS, max_batch_size=MAX_BATCH, compile=compile))
    reports: list = []

    def run(i: int, s: int = steps) -> None:
        job = EngineJob(f"e{i}-{time.monotonic_ns()}", _engine_request(device, size, s, i))
        reports.append(engine.run(job, lambda *a: None, CancelToken()).result.metadata)

    started = time.perf_counter()
    run(0, 2)  # load (+ compile warm-up) and a first call
    out: dict[str, Any] = {"load_s": time.perf_counter() - started, "s_per_image": {}, "peak_vram_mb": {},
                           "batch_sizes": {}}
    out["engine"] = reports[-1].engine
    for batch in batches:
        reports.clear()
        out["s_per_image"][batch] = _median_time(lambda batch=batch: _together(batch, run)) / batch
        out["peak_vram_mb"][batch] = max(r.memory.get("peak_gpu_mb", 0.0) for r in reports)
        out["batch_sizes"][batch] = sorted({r.batch_size for r in reports})
    engine.close()
    _free(device)
    return out


def bench_served(folder: Path, device: str, size: int, steps: int, batches: list[int], log_dir: Path) -> dict:
    """(c) omnirt worker over gRPC and (d) the gateway over HTTP in front of that same worker."""
    import grpc

    from benchmarks.harness import Children, wait_listening
    from omnirt.workers.grpc import CHANNEL_OPTIONS
    from omnirt.workers.proto.omnirt.worker.v1 import worker_pb2_grpc as pb_grpc
    from omnirt.workers.wire import outcome_from_pb, request_to_pb
    from tests.support.procs import free_port

    children = Children(log_dir)
    worker_port, gateway_port = free_port(), free_port()
    out: dict[str, Any] = {"worker": {"s_per_image": {}, "peak_vram_mb": {}},
                           "gateway": {"s_per_image": {}}}
    try:
        started = time.perf_counter()
        worker = children.start("worker", [sys.executable, "-m", "omnirt", "worker", "--port", str(worker_port),
                                           "--backend", device, "--model-path", f"{MODEL}={folder}",
                                           "--batch-window-ms", str(WINDOW_MS), "--max-batch-size", str(MAX_BATCH),
                                           "--max-queue", "16"])
        wait_listening(children, "worker", worker, worker_port, timeout=300)
        channel = grpc.insecure_channel(f"127.0.0.1:{worker_port}", options=CHANNEL_OPTIONS)
        stub = pb_grpc.WorkerStub(channel)
        peaks: list[float] = []

        def grpc_run(i: int, s: int = steps) -> None:
            request = _engine_request(device, size, s, i)
            result = outcome_from_pb(stub.RunSync(request_to_pb(request), timeout=600)).result
            peaks.append(result.metadata.memory.get("peak_gpu_mb", 0.0))

        grpc_run(0, 2)  # the worker loads the pipeline on its first job
        out["worker"]["load_s"] = time.perf_counter() - started
        for batch in batches:
            peaks.clear()
            out["worker"]["s_per_image"][batch] = _median_time(lambda batch=batch: _together(batch, grpc_run)) / batch
            out["worker"]["peak_vram_mb"][batch] = max(peaks)
        channel.close()
        gateway = children.start("gateway", [sys.executable, "-m", "omnirt", "serve", "--port", str(gateway_port),
                                             "--remote-worker", f"w=127.0.0.1:{worker_port}"])
        wait_listening(children, "gateway", gateway, gateway_port, timeout=120)

        def http_run(i: int, s: int = steps) -> None:
            body = json.dumps({"task": "text2image", "model": MODEL, "backend": device,
                               "inputs": {"prompt": PROMPT}, "config": _config(size, s, i)}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{gateway_port}/v1/generate", data=body,
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as resp:
                json.loads(resp.read())

        http_run(0, 2)
        for batch in batches:
            out["gateway"]["s_per_image"][batch] = _median_time(lambda batch=batch: _together(batch, http_run)) / batch
    finally:
        children.kill_all()
    return out


# -- report ----------------------------------------------------------------------------------------

def report(results: dict) -> str:
    lines = [f"device: {results['device_name']} ({results['device']}), {results['size']}x{results['size']}, "
             f"{results['steps']} steps, {results['dtype']}; weights: random, full-size SDXL base"
             if not results["tiny"] else
             f"device: {results['device_name']} ({results['device']}), tiny SDXL, {results['size']}x{results['size']}, "
             f"{results['steps']} steps, {results['dtype']} (CI-size form)"]
    if results.get("params_m"):
        p = results["params_m"]
        lines.append("parameters (M): " + ", ".join(f"{k} {v:.0f}" for k, v in p.items()))
    if "build_s" in results:
        lines.append(f"building the random-weight folder: {results['build_s']:.1f} s")
    bare = results["bare"]["s_per_image"]
    paths = [("(a) bare diffusers", results["bare"]), ("(b) engine in-process", results["engine"]),
             ("(c) omnirt worker, gRPC", results["served"]["worker"]),
             ("(d) gateway, HTTP", results["served"]["gateway"])]
    header = "s/image (ratio to a)      " + "".join(f"   batch {b:<12d}" for b in results["batches"])
    lines.append(header)
    for name, row in paths:
        cells = "".join(f"   {row['s_per_image'][b]:7.3f} ({row['s_per_image'][b] / bare[b]:4.2f})"
                        for b in results["batches"])
        lines.append(f"{name:<26}{cells}")
    lines.append("peak VRAM MiB             " + "".join(
        f"   a {results['bare']['peak_vram_mb'][b]:6.0f} b {results['engine']['peak_vram_mb'][b]:6.0f}"
        for b in results["batches"]))
    lines.append(f"load: bare {results['bare']['load_s']:.1f} s, engine {results['engine']['load_s']:.1f} s "
                 f"(first job included), worker {results['served']['worker']['load_s']:.1f} s (process start "
                 f"+ first job)")
    lines.append(f"engine batches seen: {results['engine']['batch_sizes']}")
    compiled = results.get("compiled")
    if compiled:
        plain = results["engine"]["s_per_image"]
        lines.append(f"--compile: load {compiled['load_s']:.1f} s (warm-up included) vs {results['engine']['load_s']:.1f} s; "
                     + ", ".join(f"batch {b}: {compiled['s_per_image'][b]:.3f} s/image, "
                                 f"x{plain[b] / compiled['s_per_image'][b]:.2f} vs (b)"
                                 for b in compiled["s_per_image"]))
    else:
        lines.append(f"--compile: {results.get('compile_note', 'not measured')}")
    lines.append(f"total benchmark time: {results['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny weights, 64x64, 2 steps (the CI-size form)")
    p.add_argument("--steps", type=int, default=None, help="denoise steps (default 30; 2 with --tiny)")
    p.add_argument("--size", type=int, default=None, help="image side (default 1024; 64 with --tiny)")
    p.add_argument("--batches", default="1,2,4", help="comma list of batch sizes (default 1,2,4)")
    p.add_argument("--no-compile", action="store_true", help="skip the --compile measurement")
    p.add_argument("--weights", help="reuse a folder written by an earlier run (full size)")
    p.add_argument("--repeat", type=int, default=None, help="runs per case, median reported (default 1; 3 with --tiny)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench-gpu: torch is not installed here (scripts/bootstrap test installs it): nothing measured")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    if args.device == "cpu" and not args.tiny:
        print("bench-gpu: full-size SDXL on cpu would take hours: use --device cpu --tiny")
        return 2
    sys.path.insert(0, str(ROOT))
    global REPEAT
    REPEAT = args.repeat or (3 if args.tiny else 1)
    from omnirt.models.sdxl import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    size = args.size or (64 if args.tiny else 1024)
    steps = args.steps or (2 if args.tiny else 30)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    device = args.device
    dtype = torch.float16 if device == "cuda" else torch.float32
    results: dict[str, Any] = {
        "device": device, "tiny": args.tiny, "size": size, "steps": steps, "batches": batches,
        "dtype": str(dtype).replace("torch.", ""),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    with tempfile.TemporaryDirectory(prefix="omnirt-bench-gpu-") as tmp:
        if args.tiny:
            from omnirt.models.tiny import build_tiny

            folder = Path(build_tiny(ROOT / ".omnirt" / "bench-tiny")[MODEL])
        elif args.weights:
            folder = Path(args.weights)
        else:
            folder = Path(tmp) / "sdxl-base-random"
            results["build_s"] = build_full(folder, device, dtype)
        results["params_m"] = parameter_counts(folder)
        results["bare"] = bench_bare(folder, device, dtype, size, steps, batches)
        results["engine"] = bench_engine(folder, device, size, steps, batches)
        log_dir = Path(tmp) / "logs"
        log_dir.mkdir()
        results["served"] = bench_served(folder, device, size, steps, batches, log_dir)
        if device == "cuda" and not args.no_compile:
            results["compiled"] = bench_engine(folder, device, size, steps, [1, MAX_BATCH], compile=True)
        else:
            results["compile_note"] = "not applicable on cpu" if device == "cpu" else "skipped (--no-compile)"
    results["total_s"] = time.perf_counter() - started
    print(json.dumps(results, indent=2, default=str) if args.json else report(results))
    return 0
