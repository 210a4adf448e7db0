"""The VPP plots for a reader (issue 17 item 8): clock times on the time axis, every axis
labelled with its unit, storage state of charge, the margin over the target, legends that name
what is drawn; the tables name kvar as kvar; and no solver banner in the commands' output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ams.vpp.balancing import balance
from ams.vpp.coalition import solve_milp
from ams.vpp.dayahead import plan_day_ahead
from ams.vpp.portfolio import load_portfolio, read_mapping
from ams.vpp.report import coalition_table, figure_balance, figure_coalition, figure_plan
from ams.vpp.services import balance_from_mapping, dayahead_from_mapping, service_from_mapping

LAB = Path(__file__).resolve().parents[2] / "lab_configs" / "vpp"
PORTFOLIO = load_portfolio(LAB / "portfolio.yaml")


def ylabels(fig: Figure) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes]


def clock_axis(ax: Axes) -> list[str]:
    """The bottom axis's tick labels; they must be HH:MM clock times and the label say UTC."""
    assert "UTC" in ax.get_xlabel() and "min periods" in ax.get_xlabel(), ax.get_xlabel()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels and all(len(x) == 5 and x[2] == ":" for x in labels), labels
    return labels


def legend_matches_drawing(ax: Axes) -> None:
    """The legend lists exactly the labelled artists drawn on this axes: nothing named that is
    not drawn, nothing labelled left out."""
    _, names = ax.get_legend_handles_labels()
    legend = ax.get_legend()
    assert legend is not None and names
    assert [t.get_text() for t in legend.get_texts()] == names


def test_coalition_plot_has_clock_times_margin_and_storage_soc() -> None:
    res = solve_milp(PORTFOLIO, service_from_mapping(read_mapping(LAB / "request-capacity.yaml")), 30)
    fig = figure_coalition(res)
    assert ylabels(fig) == ["power, kW (+ injection or reduction)", "margin over target, kW", "storage SoC, kWh"]
    assert clock_axis(fig.axes[-1])[0] == f"{res.times[0]:%H:%M}"
    legend_matches_drawing(fig.axes[0])
    names = fig.axes[0].get_legend_handles_labels()[1]
    assert "target kW" in names and "VPP total kW" in names
    soc = fig.axes[2].get_legend_handles_labels()[1]
    assert soc == [f"{s.name}@{s.microgrid}" for s in res.members if s.kind == "storage"]


def test_reactive_coalition_is_in_kvar_in_the_plot_and_the_table() -> None:
    res = solve_milp(PORTFOLIO, service_from_mapping(read_mapping(LAB / "request-reactive.yaml")), 30)
    fig = figure_coalition(res)
    assert ylabels(fig)[:2] == ["reactive power, kvar", "margin over target, kvar"]
    head = coalition_table(res).splitlines()[1]
    assert "target kvar" in head and "target kW" not in head and "VPP kvar" in head
    assert all(f"{s.name}@{s.microgrid} kvar" in head for s in res.members[:8])


def test_plan_and_balance_plots_have_clock_times_and_storage_soc() -> None:
    plan = plan_day_ahead(PORTFOLIO, dayahead_from_mapping(read_mapping(LAB / "request-dayahead.yaml")), 30)
    fig = figure_plan(plan)
    assert ylabels(fig) == ["power, kW", "price, EUR/MWh", "storage SoC, kWh"]
    assert len(clock_axis(fig.axes[-1])) <= 13
    for ax in fig.axes:
        legend_matches_drawing(ax)
    bal = balance(PORTFOLIO, balance_from_mapping(read_mapping(LAB / "request-balance.yaml")), 30)
    fig = figure_balance(bal)
    assert ylabels(fig) == ["power, kW", "power, kW", "storage SoC, kWh"]
    clock_axis(fig.axes[-1])


def test_no_solver_banner_on_stdout(tmp_path: Path) -> None:
    """HiGHS prints its banner from C++ when the first instance is built; it must not land in
    the command's output (``ams coalition ... > table.txt``)."""
    r = subprocess.run(
        [sys.executable, "-m", "ams.vpp", "coalition", str(LAB / "portfolio.yaml"), str(LAB / "request-capacity.yaml"),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "HiGHS" not in r.stdout and "Copyright" not in r.stdout, r.stdout[:300]
    assert r.stdout.startswith("capacity by milp: optimal")
