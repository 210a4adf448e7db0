"""The AMS as a virtual power plant (issue 6): portfolio, coalitions, day-ahead plan, balancing.

Public API (what the AMS calls):

- :func:`load_portfolio`, :class:`Portfolio` and the asset models; :func:`apply_flexibility`
  keeps an asset current from a received ``Flexibility``; :func:`update_reliability` folds a
  verified delivery into the asset's reliability score;
- :func:`solve_milp` / :func:`solve_heuristic` / :func:`solve_hierarchical` / :func:`compare`
  form a coalition for a service request (:class:`EnergyTrading`, :class:`Capacity`,
  :class:`DemandResponse`, :class:`ReactivePower`);
- :func:`offers_from_coalition` turns a coalition into :class:`OfferLine` blocks (``.to_offer()``
  gives the gateway ``Offer`` message);
- :func:`plan_day_ahead` (hourly bids and unit schedule) and :func:`balance` (real time);
- :func:`ams.vpp.cli.add_vpp_commands` registers ``plan``, ``coalition``, ``balance``.

Errors: :class:`BadInput` (exit code 2) and :class:`Infeasible` (exit code 3, ``.constraint``).
"""

from ams.vpp.balancing import BalanceResult, balance
from ams.vpp.coalition import CoalitionResult, GapReport, compare, solve_heuristic, solve_hierarchical, solve_milp
from ams.vpp.dayahead import DayAheadResult, plan_day_ahead
from ams.vpp.errors import BadInput, Infeasible, VppError
from ams.vpp.offers import OfferLine, offers_from_coalition
from ams.vpp.portfolio import (
    FlexibleLoad,
    Generator,
    Portfolio,
    Renewable,
    Storage,
    apply_flexibility,
    load_portfolio,
    portfolio_from_mapping,
    update_reliability,
)
from ams.vpp.services import (
    BalanceRequest,
    Capacity,
    DayAheadRequest,
    DemandResponse,
    EnergyTrading,
    ReactivePower,
    Realisation,
    balance_from_mapping,
    dayahead_from_mapping,
    service_from_mapping,
)

__all__ = [
    "BadInput",
    "BalanceRequest",
    "BalanceResult",
    "Capacity",
    "CoalitionResult",
    "DayAheadRequest",
    "DayAheadResult",
    "DemandResponse",
    "EnergyTrading",
    "FlexibleLoad",
    "GapReport",
    "Generator",
    "Infeasible",
    "OfferLine",
    "Portfolio",
    "ReactivePower",
    "Realisation",
    "Renewable",
    "Storage",
    "VppError",
    "apply_flexibility",
    "balance",
    "balance_from_mapping",
    "compare",
    "dayahead_from_mapping",
    "load_portfolio",
    "offers_from_coalition",
    "plan_day_ahead",
    "portfolio_from_mapping",
    "service_from_mapping",
    "solve_heuristic",
    "solve_hierarchical",
    "solve_milp",
    "update_reliability",
]
