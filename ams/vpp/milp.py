"""A small sparse MILP builder on top of HiGHS (``highspy``), with named constraint groups.

Why not the highspy expression API: the coalition model for 1,000 assets x 96 periods has a few
hundred thousand columns, and building it one Python expression at a time costs more than the
solve. Here variables and rows are added as numpy blocks (one call per asset and constraint kind)
and handed to HiGHS as one column-wise matrix.

Every row belongs to a *group* (``"capacity target"``, ``"storage SoC"`` ...). When HiGHS reports
the model infeasible, :func:`diagnose_infeasible` drops the groups one at a time and re-solves:
the first group whose removal makes the model feasible is named as the binding constraint
(issue 6, item 6).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass, field

import highspy
import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
INF = highspy.kHighsInf


@dataclass(frozen=True)
class Solution:
    """What HiGHS returned: ``status`` is ``optimal``, ``time_limit`` (a feasible incumbent),
    ``infeasible``, ``unbounded`` or ``no_solution``."""

    status: str
    x: FloatArray
    objective: float
    mip_gap: float
    seconds: float

    @property
    def has_solution(self) -> bool:
        return self.status in ("optimal", "time_limit")


@dataclass
class Model:
    """Columns and rows collected before the single ``passModel`` call; minimisation."""

    lower: list[FloatArray] = field(default_factory=list)
    upper: list[FloatArray] = field(default_factory=list)
    cost: list[FloatArray] = field(default_factory=list)
    integer: list[NDArray[np.bool_]] = field(default_factory=list)
    n_cols: int = 0
    rows_i: list[IntArray] = field(default_factory=list)
    rows_j: list[IntArray] = field(default_factory=list)
    rows_v: list[FloatArray] = field(default_factory=list)
    row_lo: list[FloatArray] = field(default_factory=list)
    row_hi: list[FloatArray] = field(default_factory=list)
    row_group: list[str] = field(default_factory=list)  # one entry per row
    n_rows: int = 0
    offset: float = 0.0
    extra_cost: list[tuple[IntArray, FloatArray]] = field(default_factory=list)

    def add_cost(self, cols: IntArray, cost: float | FloatArray) -> None:
        """Add ``cost`` to the objective coefficients of existing columns."""
        self.extra_cost.append((cols, np.broadcast_to(np.asarray(cost, dtype=np.float64), (len(cols),)).copy()))

    def add_vars(
        self,
        n: int,
        lb: float | FloatArray = 0.0,
        ub: float | FloatArray = INF,
        cost: float | FloatArray = 0.0,
        integer: bool = False,
    ) -> IntArray:
        """Add ``n`` columns; returns their indices."""
        idx = np.arange(self.n_cols, self.n_cols + n, dtype=np.int64)
        self.lower.append(np.broadcast_to(np.asarray(lb, dtype=np.float64), (n,)).copy())
        self.upper.append(np.broadcast_to(np.asarray(ub, dtype=np.float64), (n,)).copy())
        self.cost.append(np.broadcast_to(np.asarray(cost, dtype=np.float64), (n,)).copy())
        self.integer.append(np.full(n, integer, dtype=np.bool_))
        self.n_cols += n
        return idx

    def add_binaries(self, n: int, cost: float | FloatArray = 0.0) -> IntArray:
        return self.add_vars(n, 0.0, 1.0, cost, integer=True)

    def add_rows(
        self,
        group: str,
        terms: list[tuple[IntArray, float | FloatArray]],
        lo: float | FloatArray = -INF,
        hi: float | FloatArray = INF,
    ) -> None:
        """Add ``m`` rows ``lo <= sum_k coef_k * x[cols_k] <= hi``; every ``cols_k`` has length ``m``
        (row ``r`` uses ``cols_k[r]``), coefficients are scalars or length-``m`` arrays."""
        if not terms:
            return
        m = len(terms[0][0])
        if m == 0:
            return
        rows = np.arange(self.n_rows, self.n_rows + m, dtype=np.int64)
        for cols, coef in terms:
            if len(cols) != m:
                raise ValueError(f"{group}: term of length {len(cols)} in a block of {m} rows")
            self.rows_i.append(rows)
            self.rows_j.append(np.asarray(cols, dtype=np.int64))
            self.rows_v.append(np.broadcast_to(np.asarray(coef, dtype=np.float64), (m,)).copy())
        self.row_lo.append(np.broadcast_to(np.asarray(lo, dtype=np.float64), (m,)).copy())
        self.row_hi.append(np.broadcast_to(np.asarray(hi, dtype=np.float64), (m,)).copy())
        self.row_group.extend([group] * m)
        self.n_rows += m

    def groups(self) -> list[str]:
        """Constraint groups in the order they were first added."""
        return list(dict.fromkeys(self.row_group))

    def solve(
        self,
        time_limit_s: float | None = None,
        mip_rel_gap: float = 1e-6,
        drop_groups: frozenset[str] = frozenset(),
        relax_integers: bool = False,
        start: FloatArray | None = None,
    ) -> Solution:
        """Solve with HiGHS (one thread: the machines this runs on are shared)."""
        t0 = time.perf_counter()
        lp = highspy.HighsLp()
        lp.num_col_ = self.n_cols
        ncols = self.n_cols
        lo = np.concatenate(self.lower) if self.lower else np.zeros(0)
        up = np.concatenate(self.upper) if self.upper else np.zeros(0)
        cost = np.concatenate(self.cost) if self.cost else np.zeros(0)
        integ = np.concatenate(self.integer) if self.integer else np.zeros(0, dtype=np.bool_)
        for cols, extra in self.extra_cost:
            np.add.at(cost, cols, extra)
        if self.rows_i:
            ri = np.concatenate(self.rows_i)
            rj = np.concatenate(self.rows_j)
            rv = np.concatenate(self.rows_v)
            rlo = np.concatenate(self.row_lo)
            rhi = np.concatenate(self.row_hi)
        else:
            ri = rj = np.zeros(0, dtype=np.int64)
            rv = rlo = rhi = np.zeros(0)
        if drop_groups:
            keep_row = np.array([g not in drop_groups for g in self.row_group], dtype=np.bool_)
            new_index = np.cumsum(keep_row) - 1
            nz = keep_row[ri]
            ri, rj, rv = new_index[ri[nz]], rj[nz], rv[nz]
            rlo, rhi = rlo[keep_row], rhi[keep_row]
        nrows = len(rlo)
        order = np.lexsort((ri, rj))
        ri, rj, rv = ri[order], rj[order], rv[order]
        col_start = np.zeros(ncols + 1, dtype=np.int32)
        np.cumsum(np.bincount(rj, minlength=ncols), out=col_start[1:])
        lp.num_row_ = nrows
        lp.col_cost_ = cost
        lp.col_lower_ = lo
        lp.col_upper_ = up
        lp.row_lower_ = rlo
        lp.row_upper_ = rhi
        lp.offset_ = self.offset
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_ = ncols
        lp.a_matrix_.num_row_ = nrows
        lp.a_matrix_.start_ = col_start
        lp.a_matrix_.index_ = ri.astype(np.int32)
        lp.a_matrix_.value_ = rv
        if integ.any() and not relax_integers:
            lp.integrality_ = [highspy.HighsVarType.kInteger if b else highspy.HighsVarType.kContinuous for b in integ]
        h = _quiet_highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
        h.setOptionValue("mip_rel_gap", mip_rel_gap)
        if time_limit_s is not None:
            h.setOptionValue("time_limit", float(time_limit_s))
        h.passModel(lp)
        if start is not None:  # MIP start: HiGHS checks it and keeps it as incumbent when feasible
            hs = highspy.HighsSolution()
            hs.col_value = list(np.asarray(start, dtype=np.float64))
            hs.value_valid = True
            h.setSolution(hs)
        h.run()
        status = h.getModelStatus()
        info = h.getInfo()
        has_primal = info.primal_solution_status == 2  # kSolutionStatusFeasible
        name = {
            highspy.HighsModelStatus.kOptimal: "optimal",
            highspy.HighsModelStatus.kInfeasible: "infeasible",
            highspy.HighsModelStatus.kUnbounded: "unbounded",
            highspy.HighsModelStatus.kUnboundedOrInfeasible: "infeasible",
            highspy.HighsModelStatus.kTimeLimit: "time_limit" if has_primal else "no_solution",
        }.get(status, "no_solution")
        if name in ("optimal", "time_limit"):
            x = np.asarray(h.getSolution().col_value, dtype=np.float64)
            obj = float(info.objective_function_value)
            gap = float(info.mip_gap) if integ.any() and not relax_integers else 0.0
            if not np.isfinite(gap):
                gap = 0.0 if name == "optimal" else float("inf")
        else:
            x, obj, gap = np.zeros(ncols), float("nan"), float("inf")
        return Solution(name, x, obj, gap, time.perf_counter() - t0)


def _quiet_highs() -> highspy.Highs:
    """A Highs instance without its banner on stdout.

    HiGHS prints "Running HiGHS ... Copyright ..." from C++ when the first instance of a
    process is built, before ``output_flag`` can be set; in ``ams coalition ... > out.txt`` or
    a pipe it lands in the command's own output. File descriptor 1 points at /dev/null while
    the instance is built, and C stdio is flushed before it is given back, so nothing
    buffered leaks out later.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()  # type: ignore[no-untyped-call]
        ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    return h


def diagnose_infeasible(model: Model, candidates: list[str] | None = None) -> str | None:
    """Name the constraint group whose removal restores feasibility (first in model order).

    The LP relaxation is tried first for each group (cheap); a group is reported only if the
    MILP without it is feasible. ``None`` when no single group explains the infeasibility.
    """
    groups = candidates if candidates is not None else model.groups()
    for g in groups:
        sol = model.solve(time_limit_s=10.0, drop_groups=frozenset({g}))
        if sol.status in ("optimal", "time_limit", "unbounded"):
            return g
    return None
