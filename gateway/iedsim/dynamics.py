"""A feeder as a REF615 would see it: load, voltages, currents, powers, frequency, breaker.

The model computes physics in SI units from :class:`SimulatorSettings` and hands out values
per configured point, found by ``quantity`` and ``phase`` and converted to the point's
engineering unit. Nothing here knows IEC 104 addresses or types, so the 61850 and DLMS
simulators can reuse it and any lab config that uses the gateway's quantity vocabulary
works. What the model cannot derive (temperature, ratios, spare switch states) stays at a
constant so a GI still answers every point.

All values of one step come from one electrical state, so they are mutually consistent:
S = sqrt(P^2 + Q^2), PF = P/S, I = S / (3 U) per phase. Randomness comes only from a
``random.Random(seed)``, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.config import UNIT_SI_FACTORS, Direction, Point, SimulatorSettings
from gateway.points import DoublePoint

__all__ = ["UNIT_FACTORS", "FeederModel", "FeederState"]

#: SI value of one engineering unit (the config's table; temperatures are an offset).
UNIT_FACTORS: Mapping[str, float] = UNIT_SI_FACTORS

_DAY_S = 86_400.0
_WOBBLE_PERIOD_S = 300.0  # the faster load swing on top of the daily curve
_FREQ_PERIOD_S = 900.0
_DAILY_AMPLITUDE = 0.3
_WOBBLE_AMPLITUDE = 0.05
_VOLTAGE_DROP_AT_RATED = 0.02  # relative drop at rated power
_PHASE_VOLTAGE_SKEW = (1.0, 0.997, 1.003)  # a slightly unbalanced network
_AMBIENT_C = 25.0
_PHASES = ("L1", "L2", "L3")


@dataclass(frozen=True, slots=True)
class FeederState:
    """One consistent electrical state of the feeder, SI units."""

    time: float
    p_w: float
    q_var: float
    s_va: float
    pf: float
    u_v: tuple[float, float, float]
    i_a: tuple[float, float, float]
    f_hz: float
    energy_wh: float
    reactive_energy_varh: float


@dataclass(frozen=True, slots=True)
class _Draws:
    """The random numbers of one step, kept so a breaker change can recompute the state."""

    load: float
    voltage: tuple[float, float, float]
    frequency: float


class FeederModel:
    """The feeder behind one device; :meth:`step` advances it, :meth:`value` reads a point.

    ``rated_power_w`` (twice the mean load) is the reference for ``%`` set-points and for
    the voltage drop. The active power limit starts at the set-point's ``max_value`` when the
    config gives one (so the read-back is meaningful from the first GI), else at rated power.
    """

    def __init__(
        self,
        settings: SimulatorSettings,
        points: Sequence[Point],
        *,
        seed: int | None = None,
        start_time: float = 0.0,
    ) -> None:
        self.settings = settings
        self._points = {p.name: p for p in points}
        self._rng = random.Random(seed if seed is not None else settings.seed)
        self.rated_power_w = max(2.0 * settings.mean_load_kw * 1e3, 1e3)
        self.breaker = DoublePoint.ON
        self.p_limit_w = self.rated_power_w
        self.q_setpoint_var = 0.0
        for p in points:
            limit = p.max_value
            if p.direction is Direction.CONTROL and p.quantity == "active_power_setpoint" and limit is not None:
                self.p_limit_w = self._to_si(p, limit)
        self._pinned: dict[str, float] = {}
        self._draws = _Draws(0.0, (0.0, 0.0, 0.0), 0.0)
        self._state = self._compute(
            start_time, settings.initial_energy_kwh * 1e3, settings.initial_reactive_energy_kvarh * 1e3, self._draws
        )
        self.step(start_time)

    # -- driving ---------------------------------------------------------------------

    @property
    def state(self) -> FeederState:
        return self._state

    def step(self, now: float) -> dict[str, float]:
        """Advance to wall-clock ``now`` (new noise) and return every monitor point's value."""
        noise = self.settings.noise
        rng = self._rng
        self._draws = _Draws(
            load=rng.gauss(0.0, noise),
            voltage=(rng.gauss(0.0, noise / 5), rng.gauss(0.0, noise / 5), rng.gauss(0.0, noise / 5)),
            frequency=rng.gauss(0.0, noise * 2),
        )
        prev = self._state
        dt_h = max(0.0, now - prev.time) / 3600.0
        self._state = self._compute(
            now,
            prev.energy_wh + prev.p_w * dt_h,
            prev.reactive_energy_varh + prev.q_var * dt_h,
            self._draws,
        )
        return self.values()

    def set_breaker(self, position: int) -> None:
        """Move the breaker; the electrical state follows at once (same noise, same time)."""
        self.breaker = DoublePoint(position)
        self._recompute()

    def apply_setpoint(self, control: Point, engineering: float) -> None:
        """A set-point command arrived for ``control`` (value in its engineering unit)."""
        if control.quantity == "active_power_setpoint":
            self.p_limit_w = max(0.0, self._to_si(control, engineering))
        elif control.quantity == "reactive_power_setpoint":
            self.q_setpoint_var = self._to_si(control, engineering)

    def set_value(self, name: str, engineering: float) -> bool:
        """Force a monitor point (fault injection, latency probes, command results).

        A breaker position moves the breaker (True: other points changed with it) and a
        set-point read-back changes the limit, so the rest of the feeder stays consistent;
        any other point is pinned at the value until :meth:`release`.
        """
        point = self._points[name]
        if point.quantity == "breaker_position":
            before = self.breaker
            if point.address.kind == "double":
                self.set_breaker(int(engineering))
            else:
                self.set_breaker(DoublePoint.ON if engineering else DoublePoint.OFF)
            return self.breaker is not before
        if point.quantity in ("active_power_setpoint", "reactive_power_setpoint"):
            self.apply_setpoint(point, engineering)
        else:
            self._pinned[name] = engineering
        return False

    def release(self, name: str) -> None:
        """Let the model drive a point pinned by :meth:`set_value` again."""
        self._pinned.pop(name, None)

    # -- reading ---------------------------------------------------------------------

    def values(self) -> dict[str, float]:
        """Engineering value of every monitor point, from the current state."""
        return {name: self.value(name) for name, p in self._points.items() if p.direction is Direction.MONITOR}

    def value(self, name: str) -> float:
        """Engineering value of one point in its configured unit."""
        if name in self._pinned:
            return self._pinned[name]
        point = self._points[name]
        si = self._si_value(point)
        return self._from_si(point, si)

    # -- internals -------------------------------------------------------------------

    def _recompute(self) -> None:
        s = self._state
        self._state = self._compute(s.time, s.energy_wh, s.reactive_energy_varh, self._draws)

    def _compute(self, now: float, energy_wh: float, q_energy: float, d: _Draws) -> FeederState:
        st = self.settings
        day_phase = (now % _DAY_S) / _DAY_S
        # Peak around 15:00 UTC, trough around 03:00, plus a five-minute swing.
        load = (
            1.0
            + _DAILY_AMPLITUDE * math.sin(2 * math.pi * (day_phase - 0.375))
            + _WOBBLE_AMPLITUDE * math.sin(2 * math.pi * now / _WOBBLE_PERIOD_S)
            + d.load
        )
        closed = self.breaker is DoublePoint.ON
        p = 0.0
        q = 0.0
        if closed:
            p = max(0.0, st.mean_load_kw * 1e3 * load)
            p = min(p, self.p_limit_w)
            q = p * math.tan(math.acos(st.power_factor))
        s = math.hypot(p, q)
        pf = p / s if s > 0 else 1.0
        drop = _VOLTAGE_DROP_AT_RATED * p / self.rated_power_w
        u = tuple(
            st.nominal_voltage_v * skew * (1.0 - drop) * (1.0 + n)
            for skew, n in zip(_PHASE_VOLTAGE_SKEW, d.voltage, strict=True)
        )
        i = tuple(s / (3.0 * uph) for uph in u)
        f = 50.0 + 0.02 * math.sin(2 * math.pi * now / _FREQ_PERIOD_S) + d.frequency
        return FeederState(
            time=now,
            p_w=p,
            q_var=q,
            s_va=s,
            pf=pf,
            u_v=(u[0], u[1], u[2]),
            i_a=(i[0], i[1], i[2]),
            f_hz=f,
            energy_wh=energy_wh,
            reactive_energy_varh=q_energy,
        )

    def _si_value(self, point: Point) -> float:
        s = self._state
        q = point.quantity
        phase = point.phase
        if q == "voltage":
            if phase in _PHASES:
                return s.u_v[_PHASES.index(phase)]
            if phase in ("L1L2", "L2L3", "L3L1"):
                a, b = phase[:2], phase[2:]
                return (s.u_v[_PHASES.index(a)] + s.u_v[_PHASES.index(b)]) / 2 * math.sqrt(3)
            if phase == "N":
                return 0.0
            return sum(s.u_v) / 3
        if q == "current":
            if phase in _PHASES:
                return s.i_a[_PHASES.index(phase)]
            if phase == "N":
                return 0.0
            return sum(s.i_a) / 3
        per_phase = 1 / 3 if phase in _PHASES else (0.0 if phase == "N" else 1.0)
        if q == "active_power":
            return s.p_w * per_phase
        if q == "reactive_power":
            return s.q_var * per_phase
        if q == "apparent_power":
            return s.s_va * per_phase
        if q == "power_factor":
            return s.pf
        if q == "frequency":
            return s.f_hz
        if q == "active_energy":
            return s.energy_wh
        if q == "reactive_energy":
            return s.reactive_energy_varh
        if q == "breaker_position":
            if point.address.kind == "double":
                return float(self.breaker)
            return 1.0 if self.breaker is DoublePoint.ON else 0.0
        if q == "active_power_setpoint":
            return self.p_limit_w
        if q == "reactive_power_setpoint":
            return self.q_setpoint_var
        if q == "temperature":
            return _AMBIENT_C
        # switch states, ratios and anything new: a constant that decodes everywhere
        if point.address.kind == "double":
            return float(DoublePoint.ON)
        if point.address.kind == "single":
            return 1.0
        return 0.0

    def _si_unit_factor(self, point: Point) -> float:
        if point.unit == "%":
            if point.quantity in ("active_power_setpoint", "reactive_power_setpoint"):
                return self.rated_power_w / 100.0
            return 0.01
        return UNIT_FACTORS.get(point.unit, 1.0)

    def _from_si(self, point: Point, si: float) -> float:
        if point.quantity == "temperature":
            return si + 273.15 if point.unit == "K" else si
        if point.quantity in ("breaker_position", "switch_state"):
            return si
        return si / self._si_unit_factor(point)

    def _to_si(self, point: Point, engineering: float) -> float:
        return engineering * self._si_unit_factor(point)
