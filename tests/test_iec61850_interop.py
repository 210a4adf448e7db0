"""Interop: a client not written here (open61850, pure Python, Apache-2.0) talks to our simulator.

It browses, reads a measurement with the value our FeederModel put there, and operates the
breaker through CSWI1.Pos with SBO and enhanced security (CommandTermination included).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.iedsim.iec61850 import Iec61850Server
from gateway.points import DoublePoint

mms = pytest.importorskip("open61850.mms")

SIM_CONFIG = Path(__file__).resolve().parents[1] / "lab_configs" / "multipower-sim.yaml"


async def test_open61850_reads_and_operates_the_simulator() -> None:
    cfg = load_config(SIM_CONFIG).only("ref615_mms")
    sim = Iec61850Server(cfg, "ref615_mms", host="127.0.0.1", port=0, seed=3)
    await sim.start()
    try:
        sim.set_value("mms.feeder.voltage.l1", 233.5)

        def session() -> tuple[list[str], float, str]:
            client = mms.MmsClient.connect("127.0.0.1", sim.port, timeout=5)
            try:
                domains = client.get_name_list(mms.OBJECT_CLASS_DOMAIN)
                value = client.read(mms.to_object_name("REF615LD0/MMXU1.PhV.phsA.cVal.mag.f [MX]"))
                result = mms.operate(client, "REF615LD0/CSWI1.Pos", False, origin=mms.Origin(category=3, ident=b"x"))
                return domains, float(value.value), str(result)
            finally:
                client.close()

        domains, volts, result = await asyncio.wait_for(asyncio.to_thread(session), 20)
        assert domains == ["REF615LD0"]
        assert volts == pytest.approx(233.5)
        assert "CommandTermination received" in result
        assert sim.model.breaker is DoublePoint.OFF and sim.operations == 1
    finally:
        await sim.close()
