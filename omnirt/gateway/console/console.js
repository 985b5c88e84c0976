// OmniRT console: workers (polls /readyz), jobs (polls /v1/jobs, streams each active job's events
// with fetch so the API key travels as a header, never in a URL), job detail, submit form.
// No framework: the DOM is built with h() (text is never parsed as HTML).
"use strict";
(function () {
  const KEY = "omnirt.apiKey";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const SYMBOL = { queued: "…", running: "▶", cancelling: "⊘", succeeded: "✓", failed: "✗", cancelled: "⊘",
                   healthy: "✓", draining: "↧", down: "✗", unknown: "?" };
  const MAX_STREAMS = 3; // browsers allow 6 HTTP/1.1 connections per host: leave room for polls
  const $ = (id) => document.getElementById(id);

  const state = {
    jobs: [],            // newest first, from GET /v1/jobs
    live: new Map(),     // job id -> {events, progress, stream: AbortController|null, record}
    selected: null,
    authed: false,
    gen: 0,              // bumped by each start(): older poll loops stop
    blobUrls: new Map(), // artifact url -> object URL
    models: [],
  };

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }

  function badge(s) { return h("span", { class: "badge state-" + s }, (SYMBOL[s] || "") + " " + s); }
  function fmtMs(ms) {
    if (ms === null || ms === undefined || isNaN(ms)) return "–";
    if (ms < 1000) return Math.round(ms) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    return Math.floor(ms / 60000) + " min " + Math.round((ms % 60000) / 1000) + " s";
  }

  // -- HTTP -------------------------------------------------------------------------------------

  class Unauthorized extends Error {}

  function headers(extra) {
    const hdrs = Object.assign({}, extra || {});
    const key = sessionStorage.getItem(KEY);
    if (key) hdrs.Authorization = "Bearer " + key;
    return hdrs;
  }

  async function api(path, opts) {
    opts = opts || {};
    const resp = await fetch(path, Object.assign({}, opts, { headers: headers(opts.headers) }));
    if (resp.status === 401) { needKey("The server refused the key (401)."); throw new Unauthorized(path); }
    return resp;
  }

  async function apiJSON(path, opts) {
    const resp = await api(path, opts);
    let body = null;
    try { body = await resp.json(); } catch (_e) { body = null; }
    return { status: resp.status, ok: resp.ok, body };
  }

  function errorText(body, status) {
    if (!body) return "HTTP " + status;
    const d = body.detail !== undefined ? body.detail : body.error && body.error.message;
    if (Array.isArray(d)) return d.map((p) => (p.loc || []).join(".") + ": " + p.msg).join("; ");
    return String(d === undefined ? "HTTP " + status : d);
  }

  // -- auth -------------------------------------------------------------------------------------

  function needKey(message) {
    state.authed = false;
    for (const live of state.live.values()) if (live.stream) live.stream.abort();
    state.live.clear();
    $("app").hidden = true;
    $("summary").textContent = "";
    $("auth").hidden = false;
    $("auth-error").textContent = sessionStorage.getItem(KEY) ? message : "";
    $("key-button").hidden = true;
    $("auth-key").focus();
  }

  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("auth-key").value.trim());
    $("auth-key").value = "";
    start();
  });
  $("key-button").addEventListener("click", () => { sessionStorage.removeItem(KEY); needKey(""); });

  // -- workers ----------------------------------------------------------------------------------

  async function pollReady(gen) {
    if (!state.authed || gen !== state.gen) return;
    try {
      const resp = await fetch("/readyz", { headers: headers() });
      renderReady(await resp.json());
    } catch (e) {
      $("summary").textContent = "gateway unreachable (" + e.message + ")";
    }
    setTimeout(() => pollReady(gen), 1500);
  }

  function renderReady(r) {
    const status = r.ok ? "ready" : "not ready: " + (r.reason || "unknown");
    $("summary").textContent = status + " · store " + r.job_store_backend + " · queue " + (r.queue_depth ?? "–");
    $("fleet").textContent = (r.workers || []).length + " worker(s) · job store " + r.job_store_backend +
      " · queue depth " + (r.queue_depth ?? "–") + " · default backend " + (r.backend || "auto") +
      (r.ok ? "" : " · NOT READY: " + (r.reason || ""));
    const cards = (r.workers || []).map((w) => h("div", { class: "card worker", "data-worker": w.worker_id, "data-state": w.state },
      h("strong", {}, w.worker_id), " ", badge(w.state),
      h("dl", {},
        h("dt", {}, "backend"), h("dd", {}, w.backend || "–"),
        h("dt", {}, "address"), h("dd", {}, w.address || "–"),
        h("dt", {}, "inflight"), h("dd", {}, w.inflight + " / " + w.capacity),
        h("dt", {}, "models"), h("dd", {}, (w.models || []).join(", ") || "all"),
        h("dt", {}, "loaded"), h("dd", {}, (w.loaded_models || []).join(", ") || "none"),
        (w.tags && w.tags.length) ? [h("dt", {}, "tags"), h("dd", {}, w.tags.join(", "))] : null,
        w.last_error ? [h("dt", {}, "last error"), h("dd", { class: "error" }, w.last_error)] : null)));
    $("workers").replaceChildren(...cards);
  }

  // -- jobs -------------------------------------------------------------------------------------

  async function pollJobs(gen) {
    if (!state.authed || gen !== state.gen) return;
    try {
      const params = new URLSearchParams({ limit: "50" });
      if ($("filter-state").value) params.set("state", $("filter-state").value);
      if ($("filter-model").value) params.set("model", $("filter-model").value);
      const r = await apiJSON("/v1/jobs?" + params);
      if (r.ok) {
        setJobs(r.body.data);
      }
    } catch (e) {
      if (e instanceof Unauthorized) return;
    }
    setTimeout(() => pollJobs(gen), 1000);
  }

  function liveOf(id) {
    let live = state.live.get(id);
    if (!live) {
      live = { events: [], progress: null, stream: null, record: null, ended: false, lastSeq: 0 };
      state.live.set(id, live);
    }
    return live;
  }

  function manageStreams() {
    // the selected job, then the newest unfinished ones, up to MAX_STREAMS at once
    const want = [];
    if (state.selected) want.push(state.selected);
    for (const rec of state.jobs) {
      if (want.length >= MAX_STREAMS) break;
      if (!TERMINAL.has(rec.state) && !want.includes(rec.id)) want.push(rec.id);
    }
    for (const [id, live] of state.live) {
      if (live.stream && !want.includes(id)) { live.stream.abort(); live.stream = null; }
    }
    for (const id of want) {
      const live = liveOf(id);
      if (!live.stream && !live.ended) follow(id, live);
    }
  }

  async function follow(id, live) {
    const ctrl = new AbortController();
    live.stream = ctrl;
    try {
      const hdrs = live.lastSeq ? { "Last-Event-ID": String(live.lastSeq) } : {};
      const resp = await api("/v1/jobs/" + encodeURIComponent(id) + "/events", { headers: hdrs, signal: ctrl.signal });
      if (!resp.ok) { live.ended = true; return; }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (data) onEvent(id, live, JSON.parse(data));
        }
      }
      live.ended = live.ended || live.events.some((e) => ["job_finished", "job_failed", "job_cancelled"].includes(e.event));
    } catch (e) {
      if (e.name === "AbortError" || e instanceof Unauthorized) return;
    } finally {
      if (live.stream === ctrl) live.stream = null;
    }
    scheduleRender();
  }

  function onEvent(id, live, ev) {
    if (ev.seq && ev.seq <= live.lastSeq) return;
    live.lastSeq = ev.seq || live.lastSeq;
    live.events.push(ev);
    const rec = live.record;
    if (ev.event === "stage_progress") live.progress = ev.data;
    if (rec) {
      if (ev.event === "job_started" || ev.event === "job_dispatched") { rec.state = "running"; rec.worker_id = ev.data.worker_id || rec.worker_id; rec.started_at_ms = rec.started_at_ms || ev.timestamp_ms; }
      if (ev.event === "job_enqueued") rec.queue_position = ev.data.queue_position;
      if (ev.event === "job_retried") { rec.state = "queued"; live.progress = null; }
      if (ev.event === "job_finished") { rec.state = "succeeded"; live.ended = true; }
      if (ev.event === "job_failed") { rec.state = "failed"; rec.error = ev.data.error; live.ended = true; }
      if (ev.event === "job_cancelled") { rec.state = "cancelled"; live.ended = true; }
      if (live.ended) rec.finished_at_ms = rec.finished_at_ms || ev.timestamp_ms;
    }
    if (live.ended) refreshDetail(id);
    scheduleRender();
  }

  let renderPending = false;
  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    requestAnimationFrame(() => { renderPending = false; renderJobs(); renderDetailLive(); });
  }

  function progressOf(rec) {
    const live = state.live.get(rec.id);
    const p = live && live.progress;
    if (rec.state === "succeeded") {
      const total = (p && p.total) || rec.request.config.num_inference_steps || 1;
      return { value: total, max: total, text: "done · " + total + "/" + total + " steps" };
    }
    if (rec.state === "queued") {
      return { value: 0, max: 1, text: "queued" + (rec.queue_position ? " · position " + rec.queue_position : "") };
    }
    if (p && p.total) {
      const eta = TERMINAL.has(rec.state) ? "" : " · ETA " + fmtMs(p.eta_ms);
      return { value: p.step, max: p.total, text: rec.state + " · step " + p.step + "/" + p.total + eta };
    }
    return { value: 0, max: 1, text: rec.state + (rec.error ? ": " + rec.error : "") };
  }

  function durationOf(rec) {
    const now = Date.now();
    if (rec.started_at_ms) return (rec.finished_at_ms || now) - rec.started_at_ms;
    if (rec.finished_at_ms) return rec.finished_at_ms - rec.enqueued_at_ms;
    return null;
  }

  function renderJobs() {
    if (!state.authed) return;
    $("jobs-empty").hidden = state.jobs.length > 0;
    const items = state.jobs.map((rec) => {
      const p = progressOf(rec);
      const prompt = (rec.request.inputs && rec.request.inputs.prompt) || "";
      const dur = durationOf(rec);
      return h("li", { "data-job": rec.id, "data-state": rec.state, class: rec.id === state.selected ? "selected" : null,
                       tabindex: "0", role: "button", "aria-label": "job " + rec.id + " " + rec.state },
        h("div", { class: "line" }, badge(rec.state), h("code", {}, rec.id.slice(0, 12)),
          h("span", { class: "meta" }, rec.request.model), h("span", { class: "prompt", title: prompt }, prompt)),
        h("progress", { max: String(p.max), value: String(p.value), "aria-label": p.text }),
        h("div", { class: "line meta" }, h("span", { class: "progress-text" }, p.text),
          h("span", {}, "worker " + (rec.worker_id || "–")),
          h("span", {}, (rec.state === "queued" ? "waiting " + fmtMs(Date.now() - rec.enqueued_at_ms) : "took " + fmtMs(dur)))));
    });
    $("jobs").replaceChildren(...items);
  }

  function openJob(id) {
    state.selected = id;
    $("detail").hidden = false;
    $("detail-id").textContent = id;
    $("detail-outputs").replaceChildren();
    $("detail-previews").replaceChildren();
    $("detail-previews-wrap").hidden = true;
    $("detail-trace").replaceChildren();
    $("detail-webhooks").replaceChildren();
    $("detail-webhooks-wrap").hidden = true;
    manageStreams();
    refreshDetail(id);
    renderJobs();
    $("detail").scrollIntoView({ block: "nearest" });
  }

  $("jobs").addEventListener("click", (ev) => {
    const li = ev.target.closest("li[data-job]");
    if (li) openJob(li.dataset.job);
  });
  $("jobs").addEventListener("keydown", (ev) => {
    const li = ev.target.closest("li[data-job]");
    if (li && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); openJob(li.dataset.job); }
  });
  $("detail-close").addEventListener("click", () => { state.selected = null; $("detail").hidden = true; manageStreams(); renderJobs(); });
  $("detail-cancel").addEventListener("click", async () => {
    const id = state.selected;
    if (!id) return;
    $("detail-cancel").disabled = true;
    try {
      const r = await apiJSON("/v1/jobs/" + encodeURIComponent(id), { method: "DELETE" });
      $("detail-status").textContent = r.ok ? "cancel requested: " + r.body.state : "cancel refused: " + errorText(r.body, r.status);
      if (r.ok) { const live = liveOf(id); if (live.record) live.record.state = r.body.state; scheduleRender(); }
    } catch (_e) { /* 401 handled */ }
  });
  for (const id of ["filter-state", "filter-model"]) $(id).addEventListener("change", () => pollJobsOnce());
  async function pollJobsOnce() {
    const r = await apiJSON("/v1/jobs?" + new URLSearchParams(Object.fromEntries(
      [["limit", "50"], ["state", $("filter-state").value], ["model", $("filter-model").value]].filter(([, v]) => v))));
    if (r.ok) setJobs(r.body.data);
  }

  function setJobs(records) {
    // a list fetched just before a stream's terminal event must not undo it
    for (const rec of records) {
      const live = liveOf(rec.id);
      const known = live.record && live.record.state;
      if (live.ended && TERMINAL.has(known) && !TERMINAL.has(rec.state)) rec.state = known;
      live.record = rec;
    }
    state.jobs = records;
    manageStreams();
    renderJobs();
  }

  // -- detail -----------------------------------------------------------------------------------

  async function refreshDetail(id) {
    if (state.selected !== id) return;
    try {
      const r = await apiJSON("/v1/jobs/" + encodeURIComponent(id) + "?events=false");
      if (!r.ok || state.selected !== id) return;
      const rec = r.body;
      const live = liveOf(id);
      live.record = Object.assign(live.record || {}, rec);
      $("detail-request").textContent = JSON.stringify(rec.request, null, 2);
      await renderOutputs(rec);
      renderDetailLive();
      const t = await apiJSON("/v1/jobs/" + encodeURIComponent(id) + "/trace");
      if (t.ok && state.selected === id) renderTrace(t.body);
      if (rec.request.webhook) await refreshWebhooks(id, rec.request.webhook);
    } catch (_e) { /* 401 handled */ }
  }

  // a job's deliveries, read again every 2 s while the detail is open and one is still unsettled
  const webhookTimers = new Map();
  async function refreshWebhooks(id, url) {
    clearTimeout(webhookTimers.get(id));
    const w = await apiJSON("/v1/jobs/" + encodeURIComponent(id) + "/webhooks");
    if (!w.ok || state.selected !== id) return;
    renderWebhooks(url, w.body.data);
    const rec = liveOf(id).record;
    const open = w.body.data.some((d) => d.state === "pending" || d.state === "delivering");
    if (open || (rec && !TERMINAL.has(rec.state))) {
      webhookTimers.set(id, setTimeout(() => refreshWebhooks(id, url).catch(() => {}), 2000));
    }
  }

  function renderWebhooks(url, deliveries) {
    $("detail-webhooks-wrap").hidden = false;
    const items = deliveries.map((d) => h("li", { "data-delivery": d.id, "data-state": d.state },
      h("strong", {}, d.kind), " ", badge(d.state), " ",
      h("span", { class: "meta" }, "attempts " + d.attempts +
        (d.last_status ? " · HTTP " + d.last_status : "") +
        (d.state === "pending" && d.next_at_ms ? " · next try in " + fmtMs(Math.max(0, d.next_at_ms - Date.now())) : "") +
        (d.last_error ? " · " + d.last_error : "")), " ", h("code", {}, d.id)));
    $("detail-webhooks").replaceChildren(h("li", { class: "meta" }, "to " + url),
      ...(items.length ? items : [h("li", { class: "meta" }, "no deliveries yet")]));
  }

  async function blobUrl(url) {
    if (state.blobUrls.has(url)) return state.blobUrls.get(url);
    const resp = await api(url);
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const obj = URL.createObjectURL(await resp.blob());
    state.blobUrls.set(url, obj);
    return obj;
  }

  async function renderOutputs(rec) {
    const outs = (rec.result && rec.result.outputs) || [];
    const figs = [];
    for (const [i, a] of outs.entries()) {
      if (!a.url) continue;
      const src = await blobUrl(a.url);
      figs.push(h("figure", {}, h("img", { src, alt: "output " + (i + 1) + " of job " + rec.id, class: "output",
        style: "width:" + Math.min(512, Math.max(256, a.width || 256)) + "px" }),
        h("figcaption", {}, a.width + "×" + a.height + " · ", h("a", { href: src, download: rec.id + "-" + i + ".png" }, "download"))));
    }
    if (figs.length) $("detail-outputs").replaceChildren(...figs);
    else $("detail-outputs").replaceChildren(h("p", { class: "meta" }, TERMINAL.has(rec.state) ? "no images" : "images appear when the job is done"));
  }

  const shownPreviews = new Set();
  function renderDetailLive() {
    const id = state.selected;
    if (!id) return;
    const live = liveOf(id);
    const rec = live.record;
    if (rec) {
      const p = progressOf(rec);
      $("detail-status").replaceChildren(badge(rec.state), " ", h("span", {}, p.text),
        h("progress", { max: String(p.max), value: String(p.value), "aria-label": p.text }),
        h("div", { class: "meta" }, "model " + rec.request.model + " · worker " + (rec.worker_id || "–") +
          " · attempts " + (rec.attempts ?? "–") + " · took " + fmtMs(durationOf(rec)) +
          (rec.error ? " · error: " + rec.error : "")));
      $("detail-cancel").disabled = TERMINAL.has(rec.state) || rec.state === "cancelling";
    }
    const t0 = live.events.length ? live.events[0].timestamp_ms : 0;
    $("detail-events").replaceChildren(...live.events.map((e) => h("li", { "data-event": e.event },
      h("code", {}, "+" + fmtMs(e.timestamp_ms - t0)), " ", h("strong", {}, e.event), " ", h("span", { class: "meta" }, e.stage), " ",
      summarize(e))));
    for (const e of live.events) {
      const url = e.event === "stage_progress" && e.data && e.data.preview_url;
      if (!url || shownPreviews.has(id + url)) continue;
      shownPreviews.add(id + url);
      $("detail-previews-wrap").hidden = false;
      blobUrl(url).then((src) => {
        if (state.selected !== id) return;
        $("detail-previews").append(h("figure", {}, h("img", { src, alt: "preview at step " + e.data.step, class: "preview" }),
          h("figcaption", {}, "step " + e.data.step + "/" + e.data.total)));
      }).catch(() => {});
    }
  }

  function summarize(e) {
    const d = e.data || {};
    if (e.event === "stage_progress") return "step " + d.step + "/" + d.total + " · ETA " + fmtMs(d.eta_ms);
    const keep = Object.entries(d).filter(([k, v]) => k !== "job_id" && k !== "preview_sha256" && typeof v !== "object");
    return keep.map(([k, v]) => k + "=" + (k.endsWith("_ms") && typeof v === "number" ? fmtMs(v) : v)).join(" ");
  }

  function renderTrace(trace) {
    const spans = (trace.spans || []).filter((s) => s.start_ms && s.end_ms);
    if (!spans.length) { $("detail-trace").replaceChildren(h("p", { class: "meta" }, "no spans recorded yet")); return; }
    const t0 = Math.min(...spans.map((s) => s.start_ms));
    const t1 = Math.max(...spans.map((s) => s.end_ms));
    const width = Math.max(1, t1 - t0);
    const byId = new Map(spans.map((s) => [s.span_id, s]));
    const depth = (s) => { let d = 0; let p = s; while (p && p.parent_span_id && byId.has(p.parent_span_id) && d < 10) { p = byId.get(p.parent_span_id); d++; } return d; };
    spans.sort((a, b) => a.start_ms - b.start_ms);
    $("detail-trace").replaceChildren(h("p", { class: "meta" }, "trace " + (trace.trace_id || "–") + " · " + fmtMs(width)),
      ...spans.map((s) => h("div", { class: "span", "data-span": s.name },
        h("span", { style: "padding-left:" + depth(s) + "em", title: s.service || "" }, s.name + (s.service ? " (" + s.service + ")" : "")),
        h("div", { class: "track" }, h("div", { class: "bar" + (s.status === "error" ? " error" : ""),
          style: "left:" + ((s.start_ms - t0) / width * 100).toFixed(2) + "%;width:" + ((s.end_ms - s.start_ms) / width * 100).toFixed(2) + "%" })),
        h("span", { class: "dur" }, fmtMs(s.end_ms - s.start_ms) + (s.status === "error" ? " error" : "")))));
  }

  // -- submit -----------------------------------------------------------------------------------

  function fillModels(models) {
    state.models = models;
    $("f-model").replaceChildren(...models.map((m) => h("option", { value: m.id }, m.id + " (" + m.tier + ")")));
    $("filter-model").replaceChildren(h("option", { value: "" }, "all"), ...models.map((m) => h("option", { value: m.id }, m.id)));
    fillTasks();
  }
  function fillTasks() {
    const m = state.models.find((x) => x.id === $("f-model").value);
    const tasks = (m && (m.tasks || [m.task])) || ["text2image"];
    $("f-task").replaceChildren(...tasks.map((t) => h("option", {}, t)));
    $("f-image-label").hidden = $("f-task").value === "text2image";
  }
  $("f-model").addEventListener("change", fillTasks);
  $("f-task").addEventListener("change", () => { $("f-image-label").hidden = $("f-task").value === "text2image"; });

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const fr = new FileReader();
      fr.onload = () => resolve(String(fr.result).split(",", 2)[1]);
      fr.onerror = () => reject(fr.error);
      fr.readAsDataURL(file);
    });
  }

  $("submit-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const status = $("submit-status");
    const config = {};
    const num = (id) => ($(id).value === "" ? null : Number($(id).value));
    for (const [id, key] of [["f-width", "width"], ["f-height", "height"], ["f-steps", "num_inference_steps"], ["f-seed", "seed"]]) {
      if (num(id) !== null) config[key] = num(id);
    }
    if ($("f-preset").value) config.preset = $("f-preset").value;
    if ($("f-extra").value.trim()) {
      let extra;
      try { extra = JSON.parse($("f-extra").value); } catch (e) { status.textContent = "error: more config is not JSON: " + e.message; return; }
      if (!extra || typeof extra !== "object" || Array.isArray(extra)) { status.textContent = "error: more config must be a JSON object"; return; }
      Object.assign(config, extra);
    }
    const inputs = { prompt: $("f-prompt").value };
    if ($("f-negative").value) inputs.negative_prompt = $("f-negative").value;
    if ($("f-task").value !== "text2image" && $("f-image").files[0]) inputs.image = await readFile($("f-image").files[0]);
    const body = { task: $("f-task").value, model: $("f-model").value, backend: $("f-backend").value, inputs, config };
    $("f-submit").disabled = true;
    status.textContent = "submitting…";
    try {
      const r = await apiJSON("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      if (r.ok) {
        status.textContent = "submitted job " + r.body.id + (r.body.warnings ? " · warnings: " + r.body.warnings.join("; ") : "");
        const live = liveOf(r.body.id);
        live.record = r.body;
        if (!state.jobs.some((j) => j.id === r.body.id)) state.jobs.unshift(r.body);
        openJob(r.body.id);
      } else {
        status.textContent = "error (" + r.status + "): " + errorText(r.body, r.status);
      }
    } catch (e) {
      if (!(e instanceof Unauthorized)) status.textContent = "error: " + e.message;
    } finally {
      $("f-submit").disabled = false;
    }
  });

  // -- start ------------------------------------------------------------------------------------

  async function start() {
    let r;
    try {
      r = await apiJSON("/v1/models");
    } catch (e) {
      if (!(e instanceof Unauthorized)) $("summary").textContent = "gateway unreachable (" + e.message + ")";
      return;
    }
    if (!r.ok) { $("summary").textContent = "cannot list models: " + errorText(r.body, r.status); return; }
    state.authed = true;
    $("auth").hidden = true;
    $("app").hidden = false;
    $("key-button").hidden = !sessionStorage.getItem(KEY);
    fillModels(r.body.data);
    state.gen += 1;
    pollReady(state.gen);
    pollJobs(state.gen);
  }

  setInterval(() => { if (state.authed) scheduleRender(); }, 1000); // durations and waits tick
  start();
})();
