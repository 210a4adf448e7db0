"""The outputs of ``mgms bench``: report.json, samples.csv, report.md, PNG plots, the table.

Why these shapes: report.json is what other tools (and the tests) read, with the keys the
latency issue fixes per route; the CSV keeps every sample so a reader can recompute any
statistic; the Markdown report is what goes into docs/latency/ unchanged.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.bench.clock import ClockOffset, Correction, Host, correction
from gateway.bench.stats import (
    LOOP_MEDIAN_MS,
    MEDIAN_FACTOR,
    MEDIAN_SLACK_MS,
    P99_FACTOR,
    Summary,
    TargetResult,
    evaluate,
    summarise,
)

__all__ = [
    "DURABLE_RULE",
    "TARGET_RULE",
    "RouteResult",
    "RouteSpec",
    "apply_clock",
    "build_report",
    "console_table",
    "defect_line",
    "durable_verdict",
    "floor_defects",
    "machine",
    "markdown",
    "table",
    "verdict",
    "vs_heila",
    "write_outputs",
]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A measured route: its series key, what it is, its floor series and HEILA's mean.

    ``start_host``/``end_host``: whose clock stamps its start and its end, so a route
    between the MGMS and the AMS can be corrected by the clock offset when they are on
    different hosts.
    """

    key: str
    name: str
    protocol: str
    direction: str
    floor: str | None = None  # series key of the floor, or a "+"-joined sum of floor keys
    heila_ms: float | None = None
    loop: bool = False
    measures: str = ""
    start_host: Host = "mgms"
    end_host: Host = "mgms"
    #: a second floor the route is also judged against: for a message route, the bare transport
    #: plus one fsync'd write before the acknowledgement (what durability costs at minimum)
    durable_floor: str | None = None


@dataclass(frozen=True, slots=True)
class RouteResult:
    spec: RouteSpec
    summary: Summary
    floor_median_ms: float | None
    target: TargetResult
    correction: Correction
    durable_floor_median_ms: float | None = None
    durable_target: TargetResult | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "name": self.spec.name,
            "key": self.spec.key,
            "protocol": self.spec.protocol,
            "direction": self.spec.direction,
            **self.summary.as_dict(),
            "floor_median_ms": self.floor_median_ms,
            "floor": self.spec.floor,
            "heila_ms": self.spec.heila_ms,
            "measures": self.spec.measures,
            **self.correction.as_dict(),
            "target": self.target.as_dict(),
        }
        if self.spec.durable_floor is not None:
            out["durable_floor"] = self.spec.durable_floor
            out["durable_floor_median_ms"] = self.durable_floor_median_ms
            out["durable_target"] = None if self.durable_target is None else self.durable_target.as_dict()
        return out


def _floor_median(floor: str | None, series: Mapping[str, Sequence[float]]) -> float | None:
    """The median of floor series ``floor``, or the sum of medians of a "+"-joined list."""
    if floor is None:
        return None
    parts = floor.split("+")
    medians = [summarise(series.get(p, [])).median_ms for p in parts]
    if any(math.isnan(m) for m in medians):
        return None
    return sum(medians)


def floor_defects(routes: Sequence[RouteResult]) -> list[dict[str, Any]]:
    """Every floor whose median is above the median of the route it bounds: a bench defect.

    Why a check: a floor is what the bare stack does at the very least on the route's path; a
    route that beats it means the floor measures something else (another rhythm, a sleep the
    route does not have, a slower library than the route's), so "median vs floor" is then no
    measure of the gateway's cost. Printed under the table and kept in report.json.
    """
    out: list[dict[str, Any]] = []
    for r in routes:
        route_ms = r.summary.median_ms
        if r.summary.n == 0 or math.isnan(route_ms):
            continue
        for kind, key, floor_ms in (
            ("floor", r.spec.floor, r.floor_median_ms),
            ("durable_floor", r.spec.durable_floor, r.durable_floor_median_ms),
        ):
            if key is not None and floor_ms is not None and floor_ms > route_ms:
                out.append({"route": r.spec.key, "kind": kind, "floor": key, "route_median_ms": route_ms,
                            "floor_median_ms": floor_ms})  # fmt: skip
    return out


def defect_line(d: Mapping[str, Any]) -> str:
    """``bench defect: floor floor_x (1.11 ms) is slower than route y (0.64 ms)``."""
    return (
        f"bench defect: {d['kind'].replace('_', ' ')} {d['floor']} ({_f(d['floor_median_ms'])} ms) is slower than "
        f"route {d['route']} ({_f(d['route_median_ms'])} ms): a floor must bound its route"
    )


def apply_clock(
    specs: Sequence[RouteSpec],
    series: Mapping[str, Sequence[float]],
    hop_hosts: Mapping[str, tuple[Host, Host]],
    offset: ClockOffset | None,
    *,
    ams_remote: bool,
) -> tuple[dict[str, list[float]], dict[str, Correction]]:
    """Every route and hop series with its clock correction applied, and the corrections.

    The series come in as raw stamp differences (end - start); a cross-host one goes out as
    ``end - start - offset(start host -> end host)`` (see :mod:`gateway.bench.clock`).
    """
    hosts = {**hop_hosts, **{s.key: (s.start_host, s.end_host) for s in specs}}
    out: dict[str, list[float]] = {}
    corrections: dict[str, Correction] = {}
    for key, values in series.items():
        start, end = hosts.get(key, ("mgms", "mgms"))
        c = correction(start, end, offset, ams_remote=ams_remote)
        corrections[key] = c
        out[key] = c.apply(values)
    return out, corrections


def build_report(
    specs: Sequence[RouteSpec],
    series: Mapping[str, Sequence[float]],
    extra: Mapping[str, Any],
    corrections: Mapping[str, Correction] | None = None,
) -> dict[str, Any]:
    """report.json's content: routes (with targets), floors, probe hops, machine, ``extra``.

    ``series`` are already corrected (:func:`apply_clock`); ``corrections`` says how, per
    series key (none: every route on one clock, nothing applied).
    """
    routes: list[RouteResult] = []
    corrections = corrections or {}
    for spec in specs:
        if spec.key not in series:
            continue
        s = summarise(series[spec.key])
        floor = _floor_median(spec.floor, series)
        corr = corrections.get(spec.key) or correction(spec.start_host, spec.end_host, None, ams_remote=False)
        durable = _floor_median(spec.durable_floor, series)
        durable_target = None if spec.durable_floor is None else evaluate(s, durable)
        routes.append(RouteResult(spec, s, floor, evaluate(s, floor, loop=spec.loop), corr, durable, durable_target))
    # floor_*: the floors routes are judged against; ref_*: the same stack used differently, for comparison
    floors = {k: summarise(v).as_dict() for k, v in series.items() if k.startswith(("floor_", "ref_"))}
    hops = {k: summarise(v).as_dict() for k, v in series.items() if k.startswith("loop_hop_")}
    message_hops = {k: summarise(v).as_dict() for k, v in series.items() if k.startswith("hop_")}
    judged = [r.target.passed for r in routes if r.target.passed is not None]
    durable_judged = [
        r.durable_target.passed for r in routes if r.durable_target is not None and r.durable_target.passed is not None
    ]
    hop_clock = {k: c.as_dict() for k, c in corrections.items() if c.cross_host and k in {**hops, **message_hops}}
    return {
        "routes": [r.as_dict() for r in routes],
        "floors": floors,
        "loop_hops": hops,
        "message_hops": message_hops,
        "hop_clock_corrections": hop_clock,
        "targets_met": sum(1 for p in judged if p),
        "targets_judged": len(judged),
        "durable_targets_met": sum(1 for p in durable_judged if p),
        "durable_targets_judged": len(durable_judged),
        "bench_defects": floor_defects(routes),
        "machine": machine(),
        **extra,
    }


def _version(cmd: list[str], pattern: str) -> str | None:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else None


def _pkg(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, cores and the versions of everything on the measured paths."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "c104": _pkg("c104"),
        "paho": _pkg("paho-mqtt"),
        "aiohttp": _pkg("aiohttp"),
        "redis_py": _pkg("redis"),
        "gurux_dlms": _pkg("gurux-dlms"),
        "redis_server": _version(["redis-server", "--version"], r"v=(\S+)"),
        "mosquitto": _version(["mosquitto", "-h"], r"mosquitto version (\S+)"),
    }


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


#: the near-floor rule, as a reader needs it beside a verdict (gateway.bench.stats.evaluate)
TARGET_RULE = (
    f"near-floor target (this project's own, not HEILA's): median <= {MEDIAN_FACTOR:g} x floor median + "
    f"{MEDIAN_SLACK_MS:g} ms and p99 <= {P99_FACTOR:g} x median; DSO loop: median <= {LOOP_MEDIAN_MS:g} ms"
)


#: the durable floor and how a message route is judged against it
DURABLE_RULE = (
    "durable floor: the bare transport plus one fsync'd XADD (Redis appendfsync always) at the receiver before "
    "the acknowledgement, same run, same payload size - what a message that is durable before it is acknowledged "
    "costs at minimum; a message route is judged against it by the same rule: median <= "
    f"{MEDIAN_FACTOR:g} x durable floor median + {MEDIAN_SLACK_MS:g} ms and p99 <= {P99_FACTOR:g} x median"
)


def durable_verdict(r: Mapping[str, Any]) -> str:
    """The verdict of a message route against its durable floor, with the rule and numbers."""
    t = r.get("durable_target")
    if t is None:
        return "-"
    return verdict({**r, "target": t, "floor_median_ms": r.get("durable_floor_median_ms")})


def verdict(r: Mapping[str, Any]) -> str:
    """The near-floor verdict of one route with its rule and numbers beside it.

    ``met: median 0.61 <= 1.3 x 0.18 + 0.5 = 0.73`` or ``missed: median 2.45 > 1.3 x 0.23 + 0.5 = 0.80``:
    a route far faster than HEILA can miss this target, and the line must say which rule it
    missed rather than a bare FAIL (the "vs HEILA" column is the other comparison).
    """
    t = r["target"]
    if t.get("passed") is None:
        return "- (no floor measured)" if r.get("n") else "- (no samples)"
    parts = []
    limit, floor = t.get("median_limit_ms"), r.get("floor_median_ms")
    if limit is not None:
        by_floor = floor is not None and abs(MEDIAN_FACTOR * floor + MEDIAN_SLACK_MS - limit) < 1e-9
        rule = (
            f"{MEDIAN_FACTOR:g} x {_f(floor)} + {MEDIAN_SLACK_MS:g} = {_f(limit)}"
            if by_floor
            else f"{LOOP_MEDIAN_MS:g} ms (DSO loop)"
        )
        parts.append(f"median {_f(r['median_ms'])} {'<=' if t['median_ok'] else '>'} {rule}")
    if t.get("p99_ok") is True:
        parts.append(f"p99 <= {P99_FACTOR:g} x median")
    elif t.get("p99_ok") is False:
        parts.append(f"p99 {_f(r['p99_ms'])} > {P99_FACTOR:g} x median = {_f(t['p99_limit_ms'])}")
    return ("met: " if t["passed"] else "missed: ") + "; ".join(parts)


def vs_heila(r: Mapping[str, Any]) -> str:
    """``19x faster`` / ``1.4x slower`` than HEILA's mean, by our median; ``-`` without a HEILA figure."""
    h, m = r.get("heila_ms"), r.get("median_ms")
    if h is None or m is None or (isinstance(m, float) and math.isnan(m)) or m <= 0:
        return "-"
    ratio = h / m
    if ratio < 1:
        return f"{1 / ratio:.1f}x slower"
    return f"{ratio:.0f}x faster" if ratio >= 10 else f"{ratio:.1f}x faster"


def table(report: Mapping[str, Any]) -> str:
    """The HEILA-like table (Markdown), one row per route, with the verdict and its rule."""
    head = (
        "| route | protocol | direction | n | mean ms | median ms | p95 ms | p99 ms | max ms "
        "| floor median ms | HEILA ms | vs HEILA | near-floor target |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {r['name']} | {r['protocol']} | {r['direction']} | {r['n']} | {_f(r['mean_ms'])} | {_f(r['median_ms'])} "
        f"| {_f(r['p95_ms'])} | {_f(r['p99_ms'])} | {_f(r['max_ms'])} | {_f(r['floor_median_ms'])} "
        f"| {_f(r['heila_ms'], 0)} | {vs_heila(r)} | {verdict(r)} |"
        for r in report["routes"]
    ]
    return head + "\n".join(rows) + "\n"


def console_table(report: Mapping[str, Any]) -> str:
    """What ``mgms bench`` prints: aligned columns for a terminal, each verdict with its rule,
    and the rule and what it is not (a comparison with HEILA) spelled out under the table."""
    head = ["route", "protocol", "n", "median ms", "p99 ms", "floor ms", "HEILA ms", "vs HEILA", "near-floor target"]
    rows = [
        [r["name"], r["protocol"], str(r["n"]), _f(r["median_ms"]), _f(r["p99_ms"]), _f(r["floor_median_ms"]),
         _f(r["heila_ms"], 0), vs_heila(r), verdict(r)]
        for r in report["routes"]
    ]  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6}

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    body = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    text = "\n".join(body) + f"\n\n{TARGET_RULE}.\nfloor: the bare protocol stack measured in the same run.\n"
    durable = [r for r in report["routes"] if r.get("durable_floor")]
    if durable:
        dhead = ["route", "protocol", "median ms", "durable floor ms", "against the durable floor"]
        drows = [[r["name"], r["protocol"], _f(r["median_ms"]), _f(r.get("durable_floor_median_ms")),
                  durable_verdict(r)] for r in durable]  # fmt: skip
        dw = [max(len(h), *(len(row[i]) for row in drows)) for i, h in enumerate(dhead)]

        def dline(cells: Sequence[str]) -> str:
            out = [c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, dw, strict=True))]
            return "  ".join(out).rstrip()

        text += "\n" + "\n".join([dline(dhead), dline(["-" * w for w in dw]), *(dline(r) for r in drows)])
        text += f"\n\n{DURABLE_RULE}.\n"
    for d in report.get("bench_defects", []):
        text += f"{defect_line(d)}\n"
    return text


def durable_table(report: Mapping[str, Any]) -> str:
    """Markdown: each message route against its durable floor, with the verdict and its rule."""
    rows = [
        f"| {r['name']} | {r['protocol']} | {r['n']} | {_f(r['median_ms'])} | {_f(r['p99_ms'])} "
        f"| {_f(r['floor_median_ms'])} | {_f(r.get('durable_floor_median_ms'))} | {durable_verdict(r)} |"
        for r in report["routes"]
        if r.get("durable_floor")
    ]
    if not rows:
        return ""
    head = (
        "| route | protocol | n | median ms | p99 ms | transport floor ms | durable floor ms "
        "| against the durable floor |\n|---|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(rows) + "\n"


def _stats_table(title: str, rows: Mapping[str, Mapping[str, Any]]) -> str:
    out = f"| {title} | n | mean ms | median ms | p95 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|\n"
    for k, s in rows.items():
        out += (
            f"| {k} | {s['n']} | {_f(s['mean_ms'])} | {_f(s['median_ms'])} | {_f(s['p95_ms'])} "
            f"| {_f(s['p99_ms'])} | {_f(s['max_ms'])} |\n"
        )
    return out


def _clock_section(report: Mapping[str, Any]) -> list[str]:
    """The offset(s) found, and per route whose clocks stamp it and what was applied."""
    parts: list[str] = []
    clock = report.get("clock")
    if clock:
        others = [
            f"{c['method'].upper()}: {c['offset_ms']:+.3f} ms +- {c['uncertainty_ms']:.3f} ms "
            f"(min delay {c['min_delay_ms']:.3f} ms, {c['exchanges']} exchanges with {c['peer']})"
            for c in report.get("clock_estimates", [clock])
        ]
        parts.append(
            "\n## Clock offset (AMS clock - MGMS clock, NTP-style exchanges)\n\n"
            + "".join(f"- {o}\n" for o in others)
            + f"\nUsed: {clock['method'].upper()} (the tightest bound). {report.get('clock_note', '')}\n"
        )
    elif report.get("clock_note"):
        parts.append(f"\n## Clock offset\n\n{report['clock_note']}\n")
    rows = [
        f"| {r['name']} | {r.get('clock_hosts', '-')} | {'yes' if r.get('cross_host') else 'no'} "
        f"| {_f(r.get('offset_applied_ms'), 3)} | {_f(r.get('offset_uncertainty_ms'), 3)} |"
        for r in report["routes"]
    ]
    if rows:
        parts.append(
            "\n## Clocks per route\n\n| route | stamped by | cross-host | offset applied ms | +- ms |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
        )
    return parts


def markdown(report: Mapping[str, Any], plots: Sequence[str]) -> str:
    m = report["machine"]
    mode = report.get("mode", "simulators")
    if mode == "lab":
        setting = (
            f"Mode: **lab** (no simulators started; measured from the probes the running system stored over "
            f"{report.get('window_s', 0):g} s). Command: `{report.get('command', '')}`.\n"
        )
    else:
        setting = (
            f"Mode: simulators; Redis `appendfsync {report.get('redis_appendfsync', 'always')}`. "
            f"Command: `{report.get('command', '')}`. Breaker travel time in the simulators: 0 "
            "(the command routes end at the confirmed status; a real breaker adds its travel).\n"
        )
    parts = [
        "# mgms bench report\n",
        f"Run {report.get('started', '')}, {report.get('duration_s', 0):.0f} s; "
        f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, c104 {m['c104']}, paho {m['paho']}, "
        f"aiohttp {m['aiohttp']}, redis-server {m['redis_server']}, mosquitto {m['mosquitto']}.\n",
        setting,
        "## Routes\n",
        table(report),
    ]
    if mode == "lab":
        parts.append("\nn is the number of samples the running system stored in the window.\n")
    else:
        parts.append(
            f"\nn is the number of good samples of {report.get('n', '?')} requested ({report.get('loop_n', '?')} "
            "for the DSO loop); one below that was lost (timeout or refused command) and is named in the run's log.\n"
        )
    parts += [
        f"\nNear-floor targets met: {report['targets_met']} of {report['targets_judged']} judged routes "
        f"({TARGET_RULE}). The target says how close a route comes to its bare protocol stack; "
        "the vs HEILA column compares the median with HEILA's published mean.\n",
    ]
    if durable_table(report):
        parts += [
            "\n## Message routes against their durable floor\n",
            durable_table(report),
            f"\nDurable-floor targets met: {report.get('durable_targets_met', 0)} of "
            f"{report.get('durable_targets_judged', 0)} ({DURABLE_RULE}).\n",
        ]
    if report.get("bench_defects"):
        parts.append("\n## Bench defects\n\n" + "".join(f"- {defect_line(d)}\n" for d in report["bench_defects"]))
    parts += [
        "\n## What each route measures\n",
        *[f"- **{r['name']}**: {r['measures']}\n" for r in report["routes"] if r.get("measures")],
    ]
    if report.get("not_measured"):
        parts.append(
            "\n## Not measured\n\n" + "".join(f"- `{k}`: {why}\n" for k, why in report["not_measured"].items())
        )
    if report["floors"]:
        parts += ["\n## Floors (bare stacks, same run)\n", _stats_table("floor", report["floors"])]
    if report.get("message_hops"):
        title = "\n## Message routes, hop by hop (from the stored probes)\n"
        parts += [title, _stats_table("hop", report["message_hops"])]
    if report.get("loop_hops"):
        parts += ["\n## DSO loop, hop by hop (from the stored probes)\n", _stats_table("hop", report["loop_hops"])]
    parts += _clock_section(report)
    if plots:
        parts.append("\n## Plots\n\n" + "".join(f"![{p}]({p})\n\n" for p in plots))
    return "\n".join(p.strip("\n") + "\n" for p in parts if p.strip())


def plots(report: Mapping[str, Any], series: Mapping[str, Sequence[float]], out: Path) -> list[str]:
    """latency_distributions.png (per route, log x) and median_vs_floor.png (vs HEILA).

    Every axis says what it counts and in which unit, every line drawn is in its panel's
    legend (and nothing that is not drawn), and the target limit is drawn where there is one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")  # 0.2, 3, 40 ms rather than 2 x 10^-1

    routes = [r for r in report["routes"] if series.get(r["key"])]
    files: list[str] = []
    if not routes:
        return files
    fig, axes = plt.subplots(len(routes), 1, figsize=(9, 1.9 * len(routes) + 1), squeeze=False)
    for ax, r in zip(axes[:, 0], routes, strict=True):
        vals = [v for v in series[r["key"]] if v > 0]
        if vals:
            lo, hi = min(vals), max(vals)
            bins = [lo * (hi / lo) ** (i / 60) for i in range(61)] if hi > lo else 10
            ax.hist(vals, bins=bins, color="tab:blue", alpha=0.8, label=f"samples (n={len(vals)})")
            ax.set_xscale("log")
        ax.axvline(r["median_ms"], color="k", lw=1, label=f"median {_f(r['median_ms'])} ms")
        ax.axvline(r["p99_ms"], color="tab:purple", lw=1, ls=":", label=f"p99 {_f(r['p99_ms'])} ms")
        if r["floor_median_ms"] is not None:
            ax.axvline(r["floor_median_ms"], color="tab:green", lw=1, ls="--",
                       label=f"floor median {_f(r['floor_median_ms'])} ms")  # fmt: skip
        limit = r["target"].get("median_limit_ms")
        if limit is not None:
            ax.axvline(limit, color="tab:red", lw=1.5, ls="-.", label=f"target: median <= {_f(limit)} ms")
        ax.set_title(f"{r['name']} - {r['protocol']}: {verdict(r)}", fontsize=7, loc="left")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel("latency, ms (log scale)", fontsize=7)
        ax.set_ylabel("samples", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "latency_distributions.png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    files.append("latency_distributions.png")

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(routes) + 2))
    y = list(range(len(routes)))
    h = 0.27
    nan = float("nan")  # a missing figure is not drawn (a 0-length bar on a log axis is no bar either)
    ax.barh([i - h for i in y], [r["median_ms"] for r in routes], h, label="median (this run)", color="tab:blue")
    ax.barh(y, [r["floor_median_ms"] if r["floor_median_ms"] is not None else nan for r in routes], h,
            label="floor median (bare stack, this run)", color="tab:green")  # fmt: skip
    ax.barh([i + h for i in y], [r["heila_ms"] if r["heila_ms"] is not None else nan for r in routes], h,
            label="HEILA mean (published)", color="tab:orange")  # fmt: skip
    limits = [(i, r["target"].get("median_limit_ms")) for i, r in enumerate(routes)]
    drawn = [(i, v) for i, v in limits if v is not None]
    if drawn:
        ax.scatter([v for _, v in drawn], [i - h for i, _ in drawn], marker="|", s=200, color="tab:red",
                   linewidths=2, zorder=3, label="target: median limit")  # fmt: skip
    ax.set_yticks(y, [f"{r['name']} - {r['protocol']}" for r in routes], fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plain)
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_title("Median per route, its floor and HEILA's mean", fontsize=9)
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncols=2)  # below: clear of the bars
    fig.tight_layout()
    fig.savefig(out / "median_vs_floor.png", dpi=90, bbox_inches="tight")  # long route names
    plt.close(fig)
    files.append("median_vs_floor.png")
    return files


def write_outputs(report: dict[str, Any], series: Mapping[str, Sequence[float]], out: Path) -> list[Path]:
    """report.json, samples.csv, report.md and the PNGs into ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["series", "i", "ms"])
        for key, values in series.items():
            for i, v in enumerate(values):
                w.writerow([key, i, f"{v:.4f}"])
    pngs = plots(report, series, out)
    (out / "report.json").write_text(json.dumps(_no_nan(report), indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(report, pngs))
    return [out / "report.json", out / "samples.csv", out / "report.md", *(out / p for p in pngs)]


def _no_nan(o: Any) -> Any:
    """NaN (a route with no samples) as null: JSON has no NaN."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _no_nan(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_no_nan(v) for v in o]
    return o
