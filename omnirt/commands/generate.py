"""`omnirt generate`: run one request on this machine (in-process engine) or on a server, write PNGs.

Also home of the request flags shared with ``omnirt validate`` (``add_request_flags`` /
``request_body``, ``build_request``): a YAML/JSON request file, overridden by flags.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

from omnirt.cli import CliError
from omnirt.config.flags import ConfigError, add_model_path_arg, parse_model_paths

DEFAULT_MODEL = "sdxl-base-1.0"

#: flag dest -> config key
_CONFIG_FLAGS = {
    "seed": "seed",
    "num_inference_steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "width": "width",
    "height": "height",
    "strength": "strength",
    "preset": "preset",
    "scheduler": "scheduler",
    "num_images": "num_images_per_prompt",
    "dtype": "dtype",
    "stub_step_delay_ms": "stub_step_delay_ms",
}


def add_request_flags(p: argparse.ArgumentParser) -> None:
    """The flags that make up a request (each overrides the same field of a request file)."""
    g = p.add_argument_group("request")
    g.add_argument("--task", help="text2image (default) or image2image (default when --image is given)")
    g.add_argument("--model", help=f"model id (default {DEFAULT_MODEL}; see 'omnirt models')")
    g.add_argument("--backend", help="auto (default) | cuda | ascend | cpu | cpu-stub")
    g.add_argument("--prompt")
    g.add_argument("--negative-prompt")
    g.add_argument("--image", metavar="FILE", help="input image for image2image")
    g.add_argument("--seed", type=int)
    g.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--strength", type=float, help="image2image: how much of the input to repaint, (0, 1]")
    g.add_argument("--preset", help="fast | balanced | quality | low-vram")
    g.add_argument("--scheduler", help="euler-discrete | euler-ancestral | ddim | dpm-solver")
    g.add_argument("--num-images", type=int, help="images per prompt (num_images_per_prompt)")
    g.add_argument("--dtype", help="auto | fp16 | bf16 | fp32")
    g.add_argument("--stub-step-delay-ms", type=float, help="cpu-stub: wait this long per denoise step")


def load_request_file(path: str) -> dict[str, Any]:
    """A request body from a YAML or JSON file (JSON is YAML, so one parser reads both)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read request file {path}: {exc.strerror or exc}") from None
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise CliError(f"{path} must hold a request object (task, model, inputs, config), not {type(body).__name__}")
    return body


def _read_image(path: str) -> str:
    try:
        return base64.b64encode(Path(path).read_bytes()).decode()
    except OSError as exc:
        raise CliError(f"cannot read --image {path}: {exc.strerror or exc}") from None


def request_body(args: argparse.Namespace, file: str | None) -> dict[str, Any]:
    """The request body: the file's fields, then flags on top, then defaults for task and model."""
    body = load_request_file(file) if file else {}
    body = dict(body)
    for key in ("inputs", "config"):
        if body.get(key) is None:
            body[key] = {}
        elif isinstance(body[key], dict):
            body[key] = dict(body[key])
    for key in ("task", "model", "backend"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    inputs, config = body["inputs"], body["config"]
    if isinstance(inputs, dict):
        if args.prompt is not None:
            inputs["prompt"] = args.prompt
        if args.negative_prompt is not None:
            inputs["negative_prompt"] = args.negative_prompt
        if args.image is not None:
            inputs["image"] = _read_image(args.image)
    if isinstance(config, dict):
        for dest, key in _CONFIG_FLAGS.items():
            value = getattr(args, dest)
            if value is not None:
                config[key] = value
    if "task" not in body:
        has_image = isinstance(inputs, dict) and inputs.get("image") is not None
        body["task"] = "image2image" if has_image else "text2image"
    body.setdefault("model", DEFAULT_MODEL)
    return body


def problems_of(exc: Exception) -> list[dict[str, Any]]:
    """Every problem a request error carries, as ``[{loc, msg}]`` (one for a 403/404 error)."""
    from omnirt.contract import RequestInvalid

    if isinstance(exc, RequestInvalid):
        return exc.detail()
    return [{"loc": [], "msg": str(exc)}]


def render_problem(problem: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in problem["loc"])
    return f"error: {where}: {problem['msg']}" if where else f"error: {problem['msg']}"


def build_request(body: dict[str, Any]):
    """``(parsed, resolved)`` requests; raises the contract's errors listing every problem."""
    from omnirt.contract import parse_generate_request
    from omnirt.registry import resolve_request

    parsed = parse_generate_request(body)
    return parsed, resolve_request(parsed)


def print_problems(problems: list[dict[str, Any]]) -> None:
    for problem in problems:
        print(render_problem(problem), file=sys.stderr)


# ---------------------------------------------------------------------------------------------


def register(sub):
    p = sub.add_parser(
        "generate",
        help="generate images from one request, here (in-process engine) or on a server",
        description="Run one request and write <job-id>-<i>.png files. Flags override --config.",
    )
    p.add_argument("--config", metavar="FILE", help="request file (YAML or JSON); flags override its fields")
    add_request_flags(p)
    add_model_path_arg(p)
    p.add_argument("--output-dir", default=".", metavar="DIR", help="where PNGs go (default: .)")
    p.add_argument("--json", action="store_true", help="print the GenerateResult as JSON")
    p.add_argument("--server", metavar="URL", help="send the request to an omnirt server instead")
    p.add_argument("--api-key", metavar="KEY", help="API key for --server")
    p.set_defaults(func=run)


def run(args) -> int:
    from omnirt.contract import ContractError

    try:
        model_paths = parse_model_paths(args.model_path, need_dirs=False)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    body = request_body(args, args.config)
    try:
        request, resolved = build_request(body)
    except ContractError as exc:
        print_problems(problems_of(exc))
        return 2
    if args.server:
        try:
            from omnirt.commands.remote_generate import run_remote
        except ImportError:
            raise CliError("--server is not available in this build (omnirt.commands.remote_generate is missing)") from None
        return run_remote(args, request)
    return run_local(args, resolved, model_paths)


def run_local(args, request, model_paths: dict[str, str]) -> int:
    from omnirt.engine.base import CancelToken, EngineJob, JobCancelled, JobFailed
    from omnirt.engine.engine import Engine

    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create --output-dir {output_dir}: {exc.strerror or exc}") from None

    from omnirt.telemetry.logging import cap_log_messages

    cap_log_messages()  # library warnings echo a long prompt in full
    job = EngineJob(job_id=uuid.uuid4().hex, request=request, execution_mode="sync")
    engine = Engine(model_paths=model_paths)
    cancel = CancelToken()
    progress = Progress(sys.stderr)
    outcome: dict[str, Any] = {}

    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = engine.run(job, progress.emit, cancel)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc
        finally:
            done.set()

    # The main thread only waits (in short slices, so Ctrl-C reaches it) and cancels on Ctrl-C;
    # an Event, not Thread.join, because an interrupted join can report a live thread as finished.
    threading.Thread(target=work, name="omnirt-generate", daemon=True).start()
    try:
        while not done.wait(0.2):
            pass
    except KeyboardInterrupt:
        cancel.cancel("interrupted")
        progress.note("cancelling...")
        while not done.wait(0.2):
            pass
    finally:
        progress.close()
        engine.close()

    error = outcome.get("error")
    if isinstance(error, JobCancelled):
        print("error: cancelled", file=sys.stderr)
        return 130
    if isinstance(error, JobFailed):
        print(f"error: {error}", file=sys.stderr)
        return 1
    if error is not None:
        raise error

    result = outcome["value"].result
    for i, (artifact, blob) in enumerate(zip(result.outputs, outcome["value"].blobs, strict=True)):
        path = output_dir / f"{job.job_id}-{i}.png"
        path.write_bytes(blob)
        artifact.path = str(path)
        artifact.transport = "path"
    if args.json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        for artifact in result.outputs:
            print(artifact.path)
    return 0


def _is_terminal(stream) -> bool:
    """A terminal that can show a bar: a TTY, not TERM=dumb, with a width (a pty under ``script``
    or a CI runner can report 0 columns, where tqdm draws nothing at all)."""
    try:
        if not stream.isatty() or os.environ.get("TERM") == "dumb":
            return False
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class Progress:
    """Shows engine events on ``stream``: a line per finished stage, and the denoise steps as a
    tqdm bar (step/total, ETA) on a terminal, or as plain lines (first, last, about every tenth
    step) otherwise.
    """

    def __init__(self, stream):
        self.stream = stream
        self.tty = _is_terminal(stream)
        self.bar = None

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def emit(self, event: str, stage: str, data: dict[str, Any]) -> None:
        if event == "stage_progress":
            self._step(data)
        elif event == "stage_start" and stage == "load_pipeline":
            self.note(f"loading {data.get('model')} ...")
        elif event == "stage_end":
            self.close()
            cached = " (cached)" if data.get("cached") else ""
            self.note(f"{stage} done in {data['elapsed_ms']:.0f} ms{cached}")
        elif event == "stage_error":
            self.close()  # the command's final "error: ..." line carries the message

    def _step(self, data: dict[str, Any]) -> None:
        step, total = int(data.get("step") or 0), int(data.get("total") or 0)
        if not self.tty:
            # plain lines (logs, CI): the first and last step and about every tenth in between
            if step in (1, total) or step % max(1, total // 10) == 0:
                eta = data.get("eta_ms")
                self.note(f"denoise step {step}/{total}" + (f" eta {eta / 1000:.1f}s" if eta is not None else ""))
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc="denoise", total=total, unit="step", file=self.stream, leave=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
