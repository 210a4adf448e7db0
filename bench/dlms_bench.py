"""DLMS/COSEM benchmark: the gateway's adapter against the meter simulator on loopback.

Run:  python bench/dlms_bench.py [--samples 200] [--rows 2000] [--out bench-out/dlms]

Per framing (WRAPPER, HDLC) and security level (none, low, high_gmac):

1. association: TCP connect + (SNRM/UA) + AARQ/AARE (+ HLS pass 3/4), median and p95;
2. one register read round trip (GET attribute 2 of 1.0.32.7.0.255), median and p95;
3. load profile: ``--rows`` rows captured in the meter, read by range in one request, rows/s.

Plus the cost of one suite-0 GMAC operation with ``cryptography`` vs gurux's pure-Python
cipher. The simulator runs in this process (same event loop): the figures are the cost of
both ends together, an upper bound for the gateway side alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from gurux_dlms.enums import Security
from gurux_dlms.GXDLMSChipperingStream import GXDLMSChipperingStream

from gateway.bench.stats import pct
from gateway.config import LabConfig, load_config
from gateway.iedsim.dlms import DlmsMeter
from gateway.protocols.dlms import DlmsAdapter
from gateway.protocols.dlms.fastgcm import FastGcmStream

LAB = """\
lab: {name: dlmsbench}
devices:
  meter1:
    protocol: dlms
    host: 127.0.0.1
    port: 4059
    dlms:
      password: "12345678"
      block_cipher_key: 000102030405060708090A0B0C0D0E0F
      authentication_key: D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF
      load_profile: {capture_period_s: 900, read_period_s: 900, depth: 100000}
points:
  - {name: meter.voltage.l1, device: meter1, quantity: voltage, unit: V, phase: L1, address: {obis: 1.0.32.7.0.255}}
  - {name: meter.energy, device: meter1, quantity: active_energy, unit: kWh, address: {obis: 1.0.1.8.0.255}}
"""


def _config(framing: str, security: str) -> LabConfig:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "lab.yaml"
        path.write_text(LAB, encoding="utf-8")
        cfg = load_config(path)
    dev = cfg.devices["meter1"]
    return cfg.with_device("meter1", dlms={**dev.dlms.model_dump(), "framing": framing, "security": security})


async def _one(framing: str, security: str, samples: int, rows: int) -> dict[str, Any]:
    cfg = _config(framing, security)
    meter = DlmsMeter(cfg, "meter1", host="127.0.0.1", port=0, seed=1)
    await meter.start()
    try:
        cfg = cfg.with_device("meter1", port=meter.port)
        adapter = DlmsAdapter(cfg.devices["meter1"], cfg.points_of("meter1"))
        assoc_ms: list[float] = []
        for _ in range(max(10, samples // 10)):
            t = time.perf_counter()
            session = await adapter._connect()
            assoc_ms.append((time.perf_counter() - t) * 1e3)
            adapter._save_counter(session.client)
            session.close()
        session = await adapter._connect()
        reg = adapter._registers["meter.voltage.l1"]
        read_ms: list[float] = []
        for _ in range(samples):
            t = time.perf_counter()
            await session.read(reg.obj, 2, "voltage")
            read_ms.append((time.perf_counter() - t) * 1e3)
        now = time.time()
        for i in range(rows):
            meter.app.capture(now - (rows - i) * 900)
        adapter._profile_last = now - (rows + 1) * 900
        served = meter.app.rows_served
        t = time.perf_counter()
        await adapter._read_profile(session)
        dt = time.perf_counter() - t
        got = meter.app.rows_served - served
        session.close()
    finally:
        await meter.close()
    return {
        "framing": framing,
        "security": security,
        "association_ms_median": statistics.median(assoc_ms),
        "association_ms_p95": pct(assoc_ms, 0.95),
        "read_ms_median": statistics.median(read_ms),
        "read_ms_p95": pct(read_ms, 0.95),
        "profile_rows": got,
        "profile_rows_per_s": got / dt if dt > 0 else 0.0,
    }


def _gmac_cost(n: int = 300) -> dict[str, float]:
    key, iv, aad = os.urandom(16), os.urandom(12), os.urandom(17 + 30)
    out = {}
    for name, cls in (("cryptography", FastGcmStream), ("gurux_pure_python", GXDLMSChipperingStream)):
        t = time.perf_counter()
        for _ in range(n):
            s = cls(Security.AUTHENTICATION, True, key, aad, iv, None)
            s.flushFinalBlock()
        out[f"gmac_ms_{name}"] = (time.perf_counter() - t) / n * 1e3
    return out


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    for framing in ("wrapper", "hdlc"):
        for security in ("none", "low", "high_gmac"):
            results.append(await _one(framing, security, args.samples, args.rows))
    return {"runs": results, **_gmac_cost()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--out", default="bench-out/dlms")
    args = parser.parse_args()
    report = asyncio.run(_main(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print("| framing | security | association ms (median / p95) | read ms (median / p95) | profile rows/s |")
    print("|---|---|---|---|---|")
    for r in report["runs"]:
        print(
            f"| {r['framing']} | {r['security']} | {r['association_ms_median']:.2f} / {r['association_ms_p95']:.2f}"
            f" | {r['read_ms_median']:.3f} / {r['read_ms_p95']:.3f} | {r['profile_rows_per_s']:.0f}"
            f" ({r['profile_rows']} rows) |"
        )
    print(
        f"\nGMAC (suite 0, 30-byte APDU): cryptography {report['gmac_ms_cryptography']:.4f} ms,"
        f" gurux pure Python {report['gmac_ms_gurux_pure_python']:.3f} ms"
    )


if __name__ == "__main__":
    main()
