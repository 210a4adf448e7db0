"""The AMS config file: who the aggregator is, how it is reached, how it prices and settles.

Same rules as the lab config (``gateway.config``): YAML, validated once into frozen models,
every issue reported with file, line and key; key and certificate paths are read relative to
the file. Example: ``lab_configs/ams-sim.yaml``.
"""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ams.market import CostModel, VerificationPolicy
from ams.service import AmsSettings, MarketSettings, MicrogridEntry
from gateway.config import MessagingSettings, ProbeSettings, RedisUrl, check_messaging, load_yaml_model
from gateway.errors import ConfigError

__all__ = ["AmsConfig", "AmsRedis", "load_ams_config"]


class AmsRedis(BaseModel):
    """The AMS's own Redis. No ``url``: ``ams run`` starts an embedded redis-server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: RedisUrl | None = None


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
    cfg, add, issues = load_yaml_model(path, AmsConfig, path_sections=("messaging",))
    check_messaging(cfg.messaging, add)
    seen: set[str] = set()
    for i, mg in enumerate(cfg.microgrids):
        if mg.participant in seen:
            add(("microgrids", i, "participant"), f"microgrid {mg.participant!r} listed twice")
        seen.add(mg.participant)
    if runnable:
        from gateway.preflight import check_messaging_runnable

        microgrids = [(("microgrids", i, "participant"), mg.participant) for i, mg in enumerate(cfg.microgrids)]
        check_messaging_runnable(cfg.messaging, add, counterparts=microgrids)
    if issues:
        raise ConfigError(issues)
    return cfg.model_copy(update={"source": str(path)})
