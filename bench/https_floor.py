"""What the HTTPS transport costs on top of bare aiohttp: POST latency over TLS with keep-alive.

Rows:

* ``aiohttp floor``: a bare ``aiohttp.web`` handler that reads the body and answers 202, and a
  bare ``ClientSession.post`` with the same TLS setup (TLS 1.2+, client certificate verified
  against the lab CA). Nothing of ours runs: this is the floor any HTTPS transport built on
  aiohttp pays.
* ``HttpsTransport (certificate)`` / ``(token)``: ``HttpsTransport.send`` on one side, the
  transport's server and a no-op handler on the other, authenticating the caller by its
  client certificate or by a bearer token.
* ``aiohttp, new TLS conn per req``: the floor without keep-alive (TCP + TLS handshake with
  the client certificate on every request): what the shared session saves.

Each request is timed from the call to its 2xx (the handler has run by then). Requests go one
after the other (the outbox sends one message at a time per peer), over one keep-alive
connection. Client and server share one event loop in one process, so a request costs both
sides' CPU on one core: the same for every row.

    python bench/https_floor.py                 # n=1000, 800-byte body (a sealed, encrypted Offer)
    python bench/https_floor.py -n 5000 --bytes 20000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.bench.stats import summarise
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.transport.base import Delivery, Outgoing, topic_for
from gateway.transport.https import HttpsPeer, HttpsSettings, HttpsTransport

TOKEN_ENV = "HTTPS_FLOOR_BENCH_TOKEN"


async def timed(n: int, warmup: int, one: Callable[[int], Awaitable[None]]) -> list[float]:
    """Per-call durations in microseconds after ``warmup`` untimed calls (handshake, caches)."""
    for i in range(warmup):
        await one(i)
    out = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        await one(i)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


async def floor(pki: LabPki, n: int, warmup: int, body: bytes, *, keepalive: bool = True) -> list[float]:
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.minimum_version = ssl.TLSVersion.TLSv1_2
    server_tls.load_cert_chain(pki.server.cert, pki.server.key)
    server_tls.load_verify_locations(cafile=pki.ca)
    server_tls.verify_mode = ssl.CERT_OPTIONAL

    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202)

    app = web.Application(client_max_size=2 << 20)
    app.router.add_post("/heila/v1/to/{r}/from/{s}/{t}", take)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = runner.addresses[0][1]
    client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_tls.minimum_version = ssl.TLSVersion.TLSv1_2
    client_tls.load_verify_locations(cafile=pki.ca)
    client_tls.load_cert_chain(pki.client.cert, pki.client.key)
    url = f"https://127.0.0.1:{port}/" + topic_for("mgms", "ams", "Offer")
    headers = {"Content-Type": "application/ld+json"}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=not keepalive)) as session:

            async def one(i: int) -> None:
                async with session.post(url, data=body, headers=headers, ssl=client_tls) as r:
                    assert r.status == 202, r.status

            return await timed(n, warmup, one)
    finally:
        await runner.cleanup()


async def transport(pki: LabPki, n: int, warmup: int, body: bytes, auth: str) -> list[float]:
    token = os.environ[TOKEN_ENV]
    if auth == "certificate":
        extra: dict[str, object] = {"client_ca_file": pki.ca, "cert_names": {"mgms gateway": "ams"}}
    else:
        extra = {"accept_token_sha256": {hashlib.sha256(token.encode()).hexdigest(): "ams"}}
    server = HttpsTransport(
        HttpsSettings.model_validate(
            {
                "participant": "mgms",
                "listen_port": 0,
                "server_cert_file": pki.server.cert,
                "server_key_file": pki.server.key,
                "client_auth": auth,
                **extra,
            }
        )
    )
    received = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal received
        received += 1

    await server.start(handler)
    assert server.port is not None
    client = HttpsTransport(
        HttpsSettings(
            participant="ams",
            cert_file=pki.client.cert if auth == "certificate" else None,
            key_file=pki.client.key if auth == "certificate" else None,
            bearer_token_env=TOKEN_ENV if auth == "token" else None,
            peers={"mgms": HttpsPeer(url=f"https://127.0.0.1:{server.port}", ca_file=pki.ca)},
        )
    )
    await client.start(handler)
    topic = topic_for("mgms", "ams", "Offer")
    try:

        async def one(i: int) -> None:
            await client.send(Outgoing(f"m{i}", "mgms", topic, body))

        out = await timed(n, warmup, one)
    finally:
        await client.close()
        await server.close()
    assert received == n + warmup, (received, n + warmup)
    return out


def row(name: str, us: list[float]) -> str:
    s = summarise([u / 1000 for u in us])
    return f"| {name:<29} | {s.median_ms:9.3f} | {s.p99_ms:6.3f} | {s.mean_ms:7.3f} | {1e3 / s.mean_ms:5.0f} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="timed requests per row (default 1000)")
    parser.add_argument("--warmup", type=int, default=100, help="untimed requests per round and row")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--bytes", type=int, default=800, help="body size (default 800: a sealed Offer is ~780)")
    args = parser.parse_args()
    os.environ.setdefault(TOKEN_ENV, "bench-token-" + os.urandom(8).hex())
    body = b"x" * args.bytes
    variants: dict[str, Callable[[LabPki, int, int, bytes], Awaitable[list[float]]]] = {
        "aiohttp floor": floor,
        "aiohttp, new TLS conn per req": lambda p, n, w, b: floor(p, n, w, b, keepalive=False),
        "HttpsTransport (certificate)": lambda p, n, w, b: transport(p, n, w, b, "certificate"),
        "HttpsTransport (token)": lambda p, n, w, b: transport(p, n, w, b, "token"),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_lab_pki(Path(tmp))
        # Interleaved rounds, so that whatever the machine does meanwhile (other tenants, CPU
        # frequency, the interpreter warming up) falls on every row alike, not on the first one.
        per_round = max(1, args.n // args.rounds)
        for _ in range(args.rounds):
            for name, run in variants.items():
                results[name] += await run(pki, per_round, args.warmup, body)
    rows = list(results.items())
    print(f"n={len(rows[0][1])} sequential POSTs per row, {args.bytes}-byte body, TLS, one process")
    print(f"| {'path':<29} | median ms | p99 ms | mean ms | req/s |")
    print(f"|{'-' * 31}|-----------|--------|---------|-------|")
    for name, us in rows:
        print(row(name, us))


if __name__ == "__main__":
    asyncio.run(main())
