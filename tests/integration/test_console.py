"""The console in a real browser: headless Chromium from Debian's packages (/usr/bin/chromium),
driven by Playwright for Python, against real ``omnirt serve`` / ``omnirt worker`` processes.

Playwright's sync API runs in a worker thread (trial's asyncio reactor owns the main thread's
loop). On failure a screenshot of the page is kept under the test's _trial_temp folder; with
``OMNIRT_CONSOLE_SCREENSHOT=PATH`` the submit test also saves the finished page there (that is how
docs/console.png is made).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support.procs import free_port, start_omnirt
from tests.support.tiny import model_path_args

CHROMIUM = os.environ.get("OMNIRT_CHROMIUM", "/usr/bin/chromium")
#: as root in a sandbox-less container, and without the background connections a closed network refuses
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000

#: JS: how many distinct colours the first output image has (0 = not drawn / blank)
DISTINCT_COLOURS_JS = """() => {
  const img = document.querySelector('#detail-outputs img.output');
  if (!img || !img.complete || !img.naturalWidth) return 0;
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let i = 0; i < px.length; i += 4) seen.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
  return seen.size;
}"""


def _requirements() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} missing (scripts/test installs Debian's chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright missing (pip install -e '.[test]')"
    return None


def http_json(url: str, method: str = "GET", body: dict | None = None, key: str | None = None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


class ConsoleTestCase(unittest.TestCase):
    timeout = 180

    def setUp(self):
        missing = _requirements()
        if missing:
            raise unittest.SkipTest(missing)
        self.failure_dir = Path(self.mktemp()).resolve()
        self.failure_dir.mkdir(parents=True)

    def start_gateway(self, *args: str, name: str = "serve"):
        port = free_port()
        proc = start_omnirt(self, ["serve", "--port", str(port), "--artifact-dir", str(self.failure_dir / "art"),
                                   *args], port, name=name)
        return proc, f"http://127.0.0.1:{port}"

    def start_worker(self, worker_id: str, port: int | None = None):
        port = port or free_port()
        proc = start_omnirt(self, ["worker", "--port", str(port), "--worker-id", worker_id, "--backend", "cpu-stub"],
                            port, name=f"worker-{worker_id}")
        return proc, port

    @contextmanager
    def browser(self, *, allow_status: tuple[int, ...] = ()):
        """A page in a fresh headless Chromium; console errors are collected and must be none at the
        end (except ``Failed to load resource`` for the HTTP statuses in ``allow_status``)."""
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            self.console_errors: list[str] = []
            self.requests: list[tuple[str, str | None]] = []

            def on_console(msg):
                if msg.type != "error":
                    return
                if any(f"status of {code}" in msg.text for code in allow_status):
                    return
                self.console_errors.append(msg.text)

            page.on("console", on_console)
            page.on("pageerror", lambda exc: self.console_errors.append(f"uncaught: {exc}"))
            page.on("request", lambda req: self.requests.append((req.url, req.headers.get("authorization"))))
            try:
                yield page
                self.assertEqual(self.console_errors, [], "console errors on the page")
            except BaseException:
                shot = self.failure_dir / f"{self._testMethodName}.png"
                try:
                    page.screenshot(path=str(shot), full_page=True)
                    print(f"screenshot of the failing page: {shot}")
                except Exception as exc:  # noqa: BLE001 - the page itself may be gone
                    print(f"no screenshot: {exc}")
                raise
            finally:
                browser.close()

    # -- helpers run on the browser thread ----------------------------------------------------

    def submit(self, page, *, steps: int, delay_ms: float | None = None, backend: str | None = None) -> str:
        page.fill("#f-prompt", "a lighthouse at dusk")
        page.fill("#f-steps", str(steps))
        page.fill("#f-seed", "7")
        if backend:
            page.select_option("#f-backend", backend)
        if delay_ms is not None:
            page.click("#submit-form details summary")
            page.fill("#f-extra", json.dumps({"stub_step_delay_ms": delay_ms}))
        page.click("#f-submit")
        page.wait_for_function("() => /^submitted job /.test(document.getElementById('submit-status').textContent)")
        return page.text_content("#submit-status").split()[2]

    def job_row(self, job_id: str) -> str:
        return f"#jobs li[data-job='{job_id}']"

    def watch_progress(self, page, job_id: str, timeout_s: float = 60.0) -> list[tuple[str, float, float]]:
        """(state, value, max) of the job's progress bar, sampled until the job is terminal."""
        seen: list[tuple[str, float, float]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            sample = page.evaluate("""(sel) => {
              const li = document.querySelector(sel);
              if (!li) return null;
              const bar = li.querySelector('progress');
              return [li.dataset.state, bar.value, bar.max];
            }""", self.job_row(job_id))
            if sample and (not seen or tuple(sample) != seen[-1]):
                seen.append(tuple(sample))
            if sample and sample[0] in ("succeeded", "failed", "cancelled"):
                return seen
            time.sleep(0.03)
        raise AssertionError(f"job {job_id} not terminal in the list after {timeout_s}s: {seen[-5:]}")

    def assert_image_not_blank(self, page):
        page.wait_for_selector("#detail-outputs img.output")
        page.wait_for_function("() => { const i = document.querySelector('#detail-outputs img.output');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        colours = page.evaluate(DISTINCT_COLOURS_JS)
        self.assertGreater(colours, 16, "the output image is blank (too few distinct colours)")


class StubConsoleTests(ConsoleTestCase):
    """Against a cpu-stub gateway (in-process worker, per-step delay from the request)."""

    def setUp(self):
        super().setUp()
        self.gateway, self.base = self.start_gateway("--backend", "cpu-stub")

    def test_load_has_no_console_errors_and_docs_render(self):
        """/ loads with no console error and shows the worker and the store; /docs renders every
        operation of /openapi.json from the locally served Swagger UI."""
        def scenario():
            with self.browser() as page:
                page.goto(self.base + "/")
                page.wait_for_selector("#app:not([hidden])")
                page.wait_for_selector("#workers .worker[data-state=healthy]")
                self.assertIn("healthy", page.text_content("#workers"))
                self.assertIn("memory", page.text_content("#fleet"))
                self.assertTrue(page.is_hidden("#auth"))
                page.goto(self.base + "/docs")
                page.wait_for_selector(".opblock")
                _, doc = http_json(self.base + "/openapi.json")
                operations = sum(len(ops) for ops in doc["paths"].values())
                self.assertEqual(page.locator(".opblock").count(), operations)
                self.assertTrue(all(u.startswith(self.base) or u.startswith("data:") for u, _ in self.requests),
                                [u for u, _ in self.requests if not u.startswith(self.base)])

        return deferToThread(scenario)

    def test_submitted_job_progress_advances_to_done_with_image(self):
        """A job submitted in the form appears in the list; its progress bar advances step by step
        and ends full with state succeeded; the detail shows the image with real pixels, the event
        timeline ending in job_finished and a trace waterfall."""
        def scenario():
            with self.browser() as page:
                page.goto(self.base + "/")
                page.wait_for_selector("#app:not([hidden])")
                job_id = self.submit(page, steps=8, delay_ms=200)
                seen = self.watch_progress(page, job_id)
                partial = {v for state, v, m in seen if state == "running" and 0 < v < m}
                self.assertGreaterEqual(len(partial), 2, f"the bar never advanced step by step: {seen}")
                self.assertEqual(seen[-1], ("succeeded", 8, 8))
                self.assertEqual([v for _, v, _ in seen], sorted(v for _, v, _ in seen), "the bar went backwards")
                self.assertIn("done", page.text_content(self.job_row(job_id)))
                self.assert_image_not_blank(page)
                page.wait_for_selector("#detail-events li[data-event=job_finished]")
                page.wait_for_selector("#detail-trace .span[data-span=denoise]")
                self.assertIn('"prompt": "a lighthouse at dusk"', page.text_content("#detail-request"))
                shot = os.environ.get("OMNIRT_CONSOLE_SCREENSHOT")
                if shot:
                    page.wait_for_timeout(300)
                    page.screenshot(path=shot, full_page=True)
                _, rec = http_json(f"{self.base}/v1/jobs/{job_id}?events=false")
                self.assertEqual(rec["state"], "succeeded")

        return deferToThread(scenario)

    def test_cancel_turns_running_job_cancelled(self):
        """The detail's cancel button on a running job: the job goes cancelling -> cancelled on the
        server and the page shows it cancelled, the bar short of the end."""
        def scenario():
            with self.browser() as page:
                page.goto(self.base + "/")
                page.wait_for_selector("#app:not([hidden])")
                job_id = self.submit(page, steps=50, delay_ms=200)
                page.wait_for_function("(sel) => { const b = document.querySelector(sel + ' progress');"
                                       " return b && b.value >= 2; }", arg=self.job_row(job_id))
                page.click("#detail-cancel")
                page.wait_for_selector(f"{self.job_row(job_id)}[data-state=cancelled]")
                page.wait_for_selector("#detail-events li[data-event=job_cancelled]")
                _, rec = http_json(f"{self.base}/v1/jobs/{job_id}?events=false")
                self.assertEqual(rec["state"], "cancelled")
                value = page.evaluate("(sel) => document.querySelector(sel + ' progress').value", self.job_row(job_id))
                self.assertLess(value, 50)
                self.assertIn("cancelled", page.text_content(self.job_row(job_id)))
                self.assertTrue(page.is_disabled("#detail-cancel"))

        return deferToThread(scenario)

    def test_phone_sized_screen(self):
        """On a 390 px wide screen nothing overflows sideways and the submit form works."""
        def scenario():
            with self.browser() as page:
                page.set_viewport_size({"width": 390, "height": 844})
                page.goto(self.base + "/")
                page.wait_for_selector("#app:not([hidden])")
                job_id = self.submit(page, steps=3)
                page.wait_for_selector(f"{self.job_row(job_id)}[data-state=succeeded]")
                self.assert_image_not_blank(page)
                width = page.evaluate("() => document.documentElement.scrollWidth")
                self.assertLessEqual(width, 390)

        return deferToThread(scenario)


class WorkerDownConsoleTests(ConsoleTestCase):
    def test_killed_worker_shows_down_then_healthy(self):
        """A remote worker SIGKILLed while the page is open shows as down (in words); restarted on
        the same port it shows healthy again."""
        worker, wport = self.start_worker("w1")
        _, base = self.start_gateway("--remote-worker", f"w1=127.0.0.1:{wport}", "--health-interval-s", "0.5")

        def scenario():
            with self.browser(allow_status=(503,)) as page:  # /readyz answers 503 while no worker is usable
                page.goto(base + "/")
                page.wait_for_selector("#workers .worker[data-worker=w1][data-state=healthy]")
                worker.signal(signal.SIGKILL)
                page.wait_for_selector("#workers .worker[data-worker=w1][data-state=down]")
                self.assertIn("down", page.text_content("#workers .worker[data-worker=w1]"))
                self.assertIn("NOT READY", page.text_content("#fleet"))
                self.start_worker("w1", port=wport)
                page.wait_for_selector("#workers .worker[data-worker=w1][data-state=healthy]")

        return deferToThread(scenario)


class WebhookConsoleTests(ConsoleTestCase):
    def test_detail_lists_webhook_deliveries(self):
        """A job with a webhook to a port nobody listens on: its detail lists the completed
        delivery, unsettled (pending, or delivering while an attempt is under way) after failed
        attempts, the attempt count rising as it retries."""
        _, base = self.start_gateway("--backend", "cpu-stub", "--webhook-allow-private",
                                     "--webhook-retry-base-s", "0.2", "--webhook-retry-max-s", "0.4")
        body = {"task": "text2image", "model": "sdxl-base-1.0", "backend": "cpu-stub", "inputs": {"prompt": "p"},
                "config": {"width": 64, "height": 64, "num_inference_steps": 2},
                "webhook": f"http://127.0.0.1:{free_port()}/hook"}
        code, job = http_json(base + "/v1/jobs", "POST", body)
        self.assertEqual(code, 202, job)

        def scenario():
            with self.browser() as page:
                page.goto(base + "/")
                page.wait_for_selector(f"{self.job_row(job['id'])}[data-state=succeeded]")
                page.click(self.job_row(job["id"]))
                row = "#detail-webhooks li[data-delivery$=_completed]"
                page.wait_for_selector(row)
                page.wait_for_function("(sel) => /attempts [2-9]/.test(document.querySelector(sel).textContent)",
                                       arg=row)
                text = page.text_content(row)
                self.assertRegex(text, r"\b(pending|delivering)\b")
                self.assertNotIn("delivered", text)
                self.assertIn("connection refused", text)

        return deferToThread(scenario)


class AuthConsoleTests(ConsoleTestCase):
    KEY = "console-test-key-9f2c"

    def test_key_required_then_everything_works_with_it(self):
        """With --api-key-file the page shows only the key form (no workers, no jobs) until a valid
        key is entered; a wrong key is refused; with the right one the page lists, submits and
        streams a job to the end. The key travels only in the Authorization header: no request URL
        (nor the access log) holds it."""
        key_file = self.failure_dir / "keys"
        key_file.write_text(f"# console test\n{self.KEY}\n")
        gateway, base = self.start_gateway("--backend", "cpu-stub", "--api-key-file", str(key_file), "--access-log")

        def scenario():
            with self.browser(allow_status=(401,)) as page:
                page.goto(base + "/")
                page.wait_for_selector("#auth:not([hidden])")
                self.assertTrue(page.is_hidden("#app"))
                self.assertEqual(page.locator("#workers .worker").count(), 0)
                self.assertEqual(page.locator("#jobs li").count(), 0)
                self.assertEqual(page.text_content("#summary"), "")
                page.fill("#auth-key", "wrong-key")
                page.click("#auth-form button")
                page.wait_for_function("() => document.getElementById('auth-error').textContent.includes('401')")
                self.assertTrue(page.is_hidden("#app"))
                page.fill("#auth-key", self.KEY)
                page.click("#auth-form button")
                page.wait_for_selector("#app:not([hidden])")
                page.wait_for_selector("#workers .worker[data-state=healthy]")
                job_id = self.submit(page, steps=6, delay_ms=100)
                seen = self.watch_progress(page, job_id)
                self.assertEqual(seen[-1], ("succeeded", 6, 6))
                self.assertTrue(any(s == "running" and 0 < v < m for s, v, m in seen), seen)
                self.assert_image_not_blank(page)
                for url, _auth in self.requests:
                    self.assertNotIn(self.KEY, url)
                streams = [auth for url, auth in self.requests if url.endswith(f"/v1/jobs/{job_id}/events")]
                self.assertTrue(streams, "the job's event stream was never opened")
                self.assertTrue(all(a == f"Bearer {self.KEY}" for a in streams), streams)
            self.assertNotIn(self.KEY, gateway.log())

        return deferToThread(scenario)


class TinyWeightsConsoleTests(ConsoleTestCase):
    def test_tiny_cpu_weights_job_from_the_form(self):
        """On the real diffusers path (tiny offline SDXL on the cpu backend) a job from the form
        reaches done and its image has real pixels."""
        try:
            import torch  # noqa: F401
        except ImportError:
            raise unittest.SkipTest("torch missing (the diffusion extra)") from None
        _, base = self.start_gateway("--backend", "cpu", *model_path_args())

        def scenario():
            with self.browser() as page:
                page.goto(base + "/")
                page.wait_for_selector("#app:not([hidden])")
                job_id = self.submit(page, steps=2, backend="cpu")
                seen = self.watch_progress(page, job_id, timeout_s=120)
                self.assertEqual(seen[-1], ("succeeded", 2, 2))
                self.assert_image_not_blank(page)
                _, rec = http_json(f"{base}/v1/jobs/{job_id}?events=false")
                self.assertEqual(rec["result"]["metadata"]["backend"], "cpu")

        return deferToThread(scenario)
