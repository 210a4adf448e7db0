"""The AMS config file: who the aggregator is, how it is reached, how it prices and settles.

Same rules as the lab config (``gateway.config``): YAML, validated once into frozen models,
every issue reported with file, line and key; key and certificate paths are read relative to
the file. Example: ``lab_configs/ams-sim.yaml``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ams.market import CostModel, VerificationPolicy
from ams.service import AmsSettings, MarketSettings, MicrogridEntry
from gateway.config import (
    AddIssue,
    MessagingSettings,
    Path_,
    ProbeSettings,
    RedisAuth,
    check_messaging,
    load_yaml_model,
)
from gateway.errors import ConfigError

__all__ = ["AmsConfig", "AmsRedis", "load_ams_config"]


class AmsRedis(RedisAuth):
    """The AMS's own Redis. No ``url``: ``ams run`` starts an embedded redis-server (with its
    ``ams`` and ``viewer`` users); with one, ``user`` and ``password_file``/``password_env``
    say who the AMS is on it (:class:`~gateway.config.RedisAuth`)."""


class AmsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    messaging: MessagingSettings
    redis: AmsRedis = AmsRedis()
    cost_model: CostModel = CostModel()
    verification: VerificationPolicy = VerificationPolicy()
    market: MarketSettings = MarketSettings()
    microgrids: tuple[MicrogridEntry, ...] = ()
    reliability_memory: Annotated[float, Field(gt=0, lt=1)] = 0.8
    probes: ProbeSettings = ProbeSettings()
    source: str = ""

    @property
    def participant(self) -> str:
        return self.messaging.participant

    def service_settings(self) -> AmsSettings:
        return AmsSettings(
            cost_model=self.cost_model,
            verification=self.verification,
            market=self.market,
            microgrids=self.microgrids,
            reliability_memory=self.reliability_memory,
        )


def load_ams_config(path: str | os.PathLike[str], *, runnable: bool = False) -> AmsConfig:
    """Load and check an AMS config; raise :class:`ConfigError` listing every issue.

    ``runnable``: also check what ``ams run`` reads when it starts (the private key, the
    microgrids' public keys, the transports' environment variables and PEM files; see
    :mod:`gateway.preflight`), in the same list: ``ams check-config`` and ``ams run`` use it.
    """

    def check(m: MessagingSettings, microgrids: list[tuple[Path_, str]], add: AddIssue) -> None:
        check_messaging(m, add)
        if runnable:
            from gateway.preflight import check_messaging_runnable

            check_messaging_runnable(m, add, counterparts=microgrids)

    def check_valid_parts(data: dict[str, Any], add: AddIssue) -> None:
        # another key is wrong: still check the messaging block if it is valid by itself, so
        # one report lists a typo in `market` and an unset password variable
        try:
            m = MessagingSettings.model_validate(data.get("messaging"))
        except ValidationError:
            return
        raw = data.get("microgrids")
        entries = raw if isinstance(raw, list) else []
        microgrids: list[tuple[Path_, str]] = [
            (("microgrids", i, "participant"), e["participant"])
            for i, e in enumerate(entries)
            if isinstance(e, dict) and isinstance(e.get("participant"), str)
        ]
        check(m, microgrids, add)

    cfg, add, issues = load_yaml_model(
        path, AmsConfig, path_sections=("messaging", "redis"), on_invalid=check_valid_parts
    )
    seen: set[str] = set()
    for i, mg in enumerate(cfg.microgrids):
        if mg.participant in seen:
            add(("microgrids", i, "participant"), f"microgrid {mg.participant!r} listed twice")
        seen.add(mg.participant)
    microgrids: list[tuple[Path_, str]] = [
        (("microgrids", i, "participant"), mg.participant) for i, mg in enumerate(cfg.microgrids)
    ]
    check(cfg.messaging, microgrids, add)
    if runnable:
        for key, reason in cfg.redis.problems():
            add(("redis", key), reason)
    if issues:
        raise ConfigError(issues)
    return cfg.model_copy(update={"source": str(path)})
