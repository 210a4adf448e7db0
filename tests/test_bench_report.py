"""The bench's outputs from hand-made series: files, report.json keys, table, targets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from gateway.bench.report import (
    DURABLE_RULE,
    TARGET_RULE,
    RouteSpec,
    build_report,
    console_table,
    defect_line,
    durable_verdict,
    markdown,
    table,
    verdict,
    vs_heila,
    write_outputs,
)

SPECS = (
    RouteSpec("a", "route A", "IEC 104", "monitoring", "floor_a", 483.0, measures="A's path"),
    RouteSpec("b", "route B", "MQTT", "AMS -> MGMS", "floor_a+floor_b", None),
    RouteSpec("loop", "the loop", "MQTT + IEC 104", "loop", None, loop=True),
    RouteSpec("missing", "not run", "x", "y"),
)
SERIES = {
    "a": [1.0, 1.0, 1.0, 1.0, 1.0],
    "floor_a": [0.2, 0.2, 0.2],
    "b": [3.0, 3.0, 3.0],
    "floor_b": [0.5, 0.5, 0.5],
    "loop": [12.0, 12.0, 12.0],
    "loop_hop_x": [4.0],
}
ROUTE_KEYS = {"name", "protocol", "direction", "n", "mean_ms", "median_ms", "p95_ms", "p99_ms", "max_ms",
              "floor_median_ms", "heila_ms"}  # fmt: skip


def test_report_routes_floors_targets() -> None:
    r = build_report(SPECS, SERIES, {"n": 5})
    by = {x["key"]: x for x in r["routes"]}
    assert set(by) == {"a", "b", "loop"}  # a route with no series is left out
    assert set(by["a"]) >= ROUTE_KEYS
    assert by["a"]["floor_median_ms"] == pytest.approx(0.2)
    assert by["a"]["target"]["median_limit_ms"] == pytest.approx(0.76) and by["a"]["target"]["passed"] is False
    assert by["b"]["floor_median_ms"] == pytest.approx(0.7)  # a sum of floors
    assert by["b"]["heila_ms"] is None
    assert by["loop"]["target"]["median_limit_ms"] == 10.0 and by["loop"]["target"]["passed"] is False
    assert (r["targets_met"], r["targets_judged"]) == (0, 3)
    assert set(r["floors"]) == {"floor_a", "floor_b"} and set(r["loop_hops"]) == {"loop_hop_x"}
    assert {"cpu", "cores", "python", "c104", "paho", "aiohttp", "redis_server", "mosquitto"} <= set(r["machine"])


def test_table_has_heila_columns_and_verdicts_with_their_rule() -> None:
    text = table(build_report(SPECS, SERIES, {}))
    assert text.splitlines()[0] == (
        "| route | protocol | direction | n | mean ms | median ms | p95 ms | p99 ms | max ms | floor median ms "
        "| HEILA ms | vs HEILA | near-floor target |"
    )
    row_a = "| route A | IEC 104 | monitoring | 5 | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 | 0.20 | 483 | 483x faster |"
    assert row_a + " missed: median 1.00 > 1.3 x 0.20 + 0.5 = 0.76; p99 <= 5 x median |" in text
    assert "| the loop |" in text and "missed: median 12.00 > 10 ms (DSO loop); p99 <= 5 x median" in text
    assert "FAIL" not in text


def test_terminal_table_puts_the_rule_beside_each_verdict() -> None:
    """A route 483x faster than HEILA that misses the near-floor target must not read as a bare
    FAIL: the line says which rule, with the numbers, and what the target is not."""
    text = console_table(build_report(SPECS, SERIES, {}))
    lines = text.splitlines()
    assert lines[0].split() == ["route", "protocol", "n", "median", "ms", "p99", "ms", "floor", "ms", "HEILA", "ms",
                                "vs", "HEILA", "near-floor", "target"]  # fmt: skip
    row_a = next(x for x in lines if x.startswith("route A"))
    assert "483x faster" in row_a and row_a.endswith("missed: median 1.00 > 1.3 x 0.20 + 0.5 = 0.76; p99 <= 5 x median")
    row_b = next(x for x in lines if x.startswith("route B"))
    assert " - " in row_b and row_b.endswith("missed: median 3.00 > 1.3 x 0.70 + 0.5 = 1.41; p99 <= 5 x median")
    assert TARGET_RULE + "." in text and "not HEILA's" in TARGET_RULE
    assert "FAIL" not in text


def test_vs_heila_and_verdict_words() -> None:
    r = build_report(SPECS, {**SERIES, "a": [500.0] * 5, "floor_a": [400.0] * 3}, {})
    a = next(x for x in r["routes"] if x["key"] == "a")
    assert vs_heila(a) == "1.0x slower"
    assert verdict(a) == "met: median 500.00 <= 1.3 x 400.00 + 0.5 = 520.50; p99 <= 5 x median"
    assert vs_heila({**a, "median_ms": 48.3}) == "10x faster" and vs_heila({**a, "heila_ms": None}) == "-"


def test_outputs_written_nan_as_null(tmp_path: Path) -> None:
    series = {**SERIES, "a": []}  # a route that produced no sample
    r = build_report(SPECS, series, {"started": "now", "duration_s": 1.0, "command": "mgms bench"})
    files = write_outputs(r, series, tmp_path)
    names = {f.name for f in files}
    assert names == {"report.json", "samples.csv", "report.md", "latency_distributions.png", "median_vs_floor.png"}
    data = json.loads((tmp_path / "report.json").read_text())
    a = next(x for x in data["routes"] if x["key"] == "a")
    assert a["n"] == 0 and a["median_ms"] is None and a["target"]["passed"] is None
    rows = list(csv.reader((tmp_path / "samples.csv").read_text().splitlines()))
    assert rows[0] == ["series", "i", "ms"] and ["floor_b", "2", "0.5000"] in rows
    assert len(rows) == 1 + sum(len(v) for v in series.values())
    md = (tmp_path / "report.md").read_text()
    assert "![median_vs_floor.png](median_vs_floor.png)" in md and "| floor_a | 3 |" in md
    assert (tmp_path / "median_vs_floor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_message_route_judged_against_its_durable_floor_too() -> None:
    specs = (RouteSpec("m", "msg route", "MQTT", "MGMS -> AMS", "floor_t", 52.0, durable_floor="floor_t_durable"),)
    series = {"m": [1.0] * 5, "floor_t": [0.2] * 5, "floor_t_durable": [0.5] * 5}
    r = build_report(specs, series, {})
    m = r["routes"][0]
    assert m["durable_floor"] == "floor_t_durable" and m["durable_floor_median_ms"] == pytest.approx(0.5)
    assert m["target"]["passed"] is False  # 1.0 > 1.3 x 0.2 + 0.5
    assert m["durable_target"]["passed"] is True and m["durable_target"]["median_limit_ms"] == pytest.approx(1.15)
    assert (r["durable_targets_met"], r["durable_targets_judged"]) == (1, 1)
    assert durable_verdict(m) == "met: median 1.00 <= 1.3 x 0.50 + 0.5 = 1.15; p99 <= 5 x median"
    text = console_table(r)
    assert DURABLE_RULE + "." in text and "against the durable floor" in text
    row = "| msg route | MQTT | 5 | 1.00 | 1.00 | 0.20 | 0.50 | met: median 1.00 <= 1.3 x 0.50 + 0.5 = 1.15"
    assert row in markdown(r, [])
    a = next(x for x in build_report(SPECS, SERIES, {})["routes"] if x["key"] == "a")
    assert "durable_floor" not in a and durable_verdict(a) == "-"  # routes without one are unchanged


def test_a_floor_slower_than_its_route_is_flagged_as_a_bench_defect(tmp_path: Path) -> None:
    specs = (
        RouteSpec("v", "value route", "IEC 61850 MMS", "monitoring", "floor_slow"),
        RouteSpec("m", "msg route", "MQTT", "x", "floor_t", durable_floor="floor_d"),
        RouteSpec("ok", "fine route", "IEC 104", "monitoring", "floor_t"),
    )
    series = {"v": [0.64] * 5, "floor_slow": [1.11] * 5, "m": [0.4] * 3, "floor_t": [0.1] * 3, "floor_d": [0.6] * 3,
              "ok": [0.3] * 3}  # fmt: skip
    r = build_report(specs, series, {})
    assert [(d["route"], d["kind"], d["floor"]) for d in r["bench_defects"]] == [
        ("v", "floor", "floor_slow"),
        ("m", "durable_floor", "floor_d"),
    ]
    assert r["bench_defects"][0]["floor_median_ms"] == pytest.approx(1.11)
    line = defect_line(r["bench_defects"][0])
    assert line == (
        "bench defect: floor floor_slow (1.11 ms) is slower than route v (0.64 ms): a floor must bound its route"
    )
    assert line in console_table(r)
    write_outputs(r, series, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["bench_defects"][1]["kind"] == "durable_floor"
    assert "## Bench defects" in (tmp_path / "report.md").read_text()
    assert build_report(SPECS, SERIES, {})["bench_defects"] == []  # floors below their routes: none
