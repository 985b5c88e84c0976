"""The human-readable form of a benchmark report (the JSON form is the report itself)."""

from __future__ import annotations

from typing import Any

#: (report key, label) of the latency-like summaries each scenario may carry, in print order
_SUMMARIES = (
    ("latency_ms", "latency"),
    ("submit_latency_ms", "submit"),
    ("queue_wait_ms", "queue wait"),
    ("delete_latency_ms", "DELETE reply"),
    ("spread_ms", "spread"),
    ("terminal_spread_ms", "terminal spread"),
)

_LATENCY_LABEL = {"async": "completion", "cancel": "cancel->event", "sse": "job fan-out"}


def summary_line(summary: dict[str, Any]) -> str:
    if not summary or not summary.get("count"):
        return "no samples"
    return (f"p50 {summary['p50']:.2f}  p90 {summary['p90']:.2f}  p99 {summary['p99']:.2f}  "
            f"max {summary['max']:.2f} ms  (n={summary['count']})")


def _errors_line(errors: dict[str, int]) -> str:
    return ", ".join(f"{key} x{n}" for key, n in errors.items()) if errors else "none"


def _body(report: dict[str, Any], scenario: str, indent: str) -> list[str]:
    ops = report["operations"]
    lines = [
        f"{indent}operations      {ops['ok']} ok, {ops['failed']} failed, {ops['aborted']} aborted",
        f"{indent}throughput      {report['throughput']['value']:g} {report['throughput']['unit']}",
    ]
    for key, label in _SUMMARIES:
        if key in report:
            if key == "latency_ms":
                label = _LATENCY_LABEL.get(scenario, label)
            lines.append(f"{indent}{label:<15} {summary_line(report[key])}")
    if "jobs" in report:
        lines.append(f"{indent}jobs            " + ", ".join(f"{k} {v}" for k, v in report["jobs"].items()))
    if "events" in report:
        ev = report["events"]
        lines.append(f"{indent}events          {ev['measured']} measured live, {ev['replayed']} replayed, "
                     f"{ev['missing']} missing deliveries; {report['missing_terminal']} missing terminal; "
                     f"{report['deliveries']} deliveries ({report['deliveries_per_s']:g}/s)")
    lines.append(f"{indent}errors          {_errors_line(report['errors'])}")
    return lines


def format_text(report: dict[str, Any]) -> str:
    """A few aligned lines: what ran, then each figure."""
    request = report["request"]
    if "model" in request:
        requests = [request]
    else:
        requests = list(request.values())
    described = "; ".join(
        f"{r['model']} {r['width']}x{r['height']} {r['steps']} steps, backend {r['backend']}, "
        f"step delay {r['step_delay_ms']:g} ms" if isinstance(r.get("step_delay_ms"), (int, float)) else str(r)
        for r in requests
    )
    head = (f"omnirt bench {report['scenario']} -> {report['url']}: {report['operations']['planned']} ops, "
            f"concurrency {report['concurrency']}, warmup {report['warmup']}"
            + (f", {report['subscribers']} subscribers/job" if "subscribers" in report else ""))
    lines = [
        head,
        f"  request         {described}",
        f"  duration        {report['duration_s']:.2f} s (stopped by {report['stopped_by']}), "
        f"{report['connections']} pooled connections",
    ]
    lines.extend(_body(report, report["scenario"], "  "))
    for kind, part in report.get("by_kind", {}).items():
        lines.append(f"  [{kind}]")
        lines.extend(_body(part, kind, "    "))
    if report.get("warmup_errors"):
        lines.append(f"  warmup errors {_errors_line(report['warmup_errors'])}")
    return "\n".join(lines)
