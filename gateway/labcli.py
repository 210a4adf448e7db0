"""The lab set-up commands of ``mgms``: ``pki``, ``peers``, ``broker`` and ``lab up``.

Why they exist: the README's "with an aggregator" path needs a CA and certificates, an MQTT
broker with a user and an ACL per participant, and each side trusting the other's public key;
before these commands that took Python (``make_lab_pki``, ``DsoSandbox``). They reuse the
code the demo and the tests build their throw-away labs with - :mod:`gateway.iedsim.pki`,
:meth:`gateway.services.MosquittoServer.write_config`, :func:`gateway.services.participant_acl`,
:func:`gateway.semantic.security.load_public_identity` - so a lab set up by hand and one set
up by a test cannot differ. ``lab up`` runs ``iedsim all`` and ``mgms run`` as two child
processes until Ctrl-C, so a simulator lab needs one terminal.

Every command returns an exit code as ``mgms`` does: 0 done, 1 failed, 2 bad input, 3 a
service (Redis) could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import ConfigError
from gateway.services import MqttAcl

if TYPE_CHECKING:
    from gateway.config import MessagingSettings

__all__ = ["BrokerParticipant", "add_lab_commands", "broker_participants"]

def add_lab_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pki``, ``peers``, ``broker`` and ``lab`` to ``mgms``; each sets ``func``."""
    p = sub.add_parser("pki", help="a lab CA and certificates for TLS (MQTT broker, HTTPS, IEC 104 TLS)")
    pki = p.add_subparsers(dest="pki_cmd", required=True, metavar="ACTION")
    q = pki.add_parser("init", help="create the CA: DIR/ca.crt and DIR/ca.key (0600)")
    q.add_argument("--dir", "-d", default="pki", help="PKI directory (default ./pki)")
    q.add_argument("--days", type=float, default=365.0, help="validity of the CA certificate (default 365)")
    q.set_defaults(func=cmd_pki_init)
    q = pki.add_parser("issue", help="issue DIR/NAME.crt and DIR/NAME.key from the CA of `pki init`")
    q.add_argument("name", help="file name and certificate CN: a participant's name, or e.g. broker")
    q.add_argument("--dir", "-d", default="pki", help="PKI directory (default ./pki)")
    q.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="HOST",
        help="IP address or DNS name the certificate serves (repeatable): makes it a server certificate "
        "too; without, a client certificate only",
    )
    q.add_argument("--cn", help="subject common name (default NAME)")
    q.add_argument("--days", type=float, default=365.0, help="validity (default 365)")
    q.add_argument("--force", action="store_true", help="replace an existing NAME.crt/.key")
    q.set_defaults(func=cmd_pki_issue)

    p = sub.add_parser("peers", help="trust a peer's public key (its .pub file from `mgms keys`)")
    peers = p.add_subparsers(dest="peers_cmd", required=True, metavar="ACTION")
    q = peers.add_parser("add", help="check FILE.pub and copy it into the peers directory as <participant>.pub")
    q.add_argument("files", nargs="+", metavar="FILE.pub", help="public key file(s) of the peer(s)")
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument("--peers-dir", help="the peers directory (messaging.peers_dir of the config)")
    where.add_argument("--config", "-c", help="a lab or AMS config whose messaging.peers_dir to use")
    q.add_argument("--force", action="store_true", help="replace a different key already trusted for that peer")
    q.set_defaults(func=cmd_peers_add)

    p = sub.add_parser("broker", help="an MQTT broker (mosquitto) for the participants of a lab")
    broker = p.add_subparsers(dest="broker_cmd", required=True, metavar="ACTION")
    q = broker.add_parser(
        "config",
        help="write mosquitto.conf, the password file, the ACL file and secrets.env for the participants "
        "of the configs given",
    )
    q.add_argument(
        "--config",
        "-c",
        action="append",
        required=True,
        help="lab or AMS config with a messaging.transports.mqtt block (repeatable: one per participant)",
    )
    q.add_argument("--out-dir", "-o", default="broker", help="where to write the files (default ./broker)")
    q.add_argument(
        "--pki-dir",
        help="directory with ca.crt, broker.crt and broker.key (default: the directory of the configs' mqtt ca_file)",
    )
    q.add_argument(
        "--cert-name", default="broker", help="file name of the broker's certificate in the PKI (default broker)"
    )
    q.set_defaults(func=cmd_broker_config)

    p = sub.add_parser("lab", help="a simulator lab in one command")
    lab = p.add_subparsers(dest="lab_cmd", required=True, metavar="ACTION")
    q = lab.add_parser(
        "up",
        help="start every simulator the config names (`iedsim all`) and the gateway (`mgms run`) until Ctrl-C",
    )
    q.add_argument("--config", "-c", required=True, help="lab config file (YAML), a simulator profile")
    q.add_argument("--redis-url", help="Redis URL (overrides the config's redis.url)")
    q.add_argument(
        "--data-dir", metavar="DIR",
        help="parent folder of the lab's state: the gateway's embedded Redis in DIR/<lab name> (default .mgms)",
    )  # fmt: skip
    q.add_argument(
        "--control-port-base",
        type=int,
        metavar="PORT",
        help="simulator control channels on 127.0.0.1:PORT, PORT+1, ... (0 = free ports; default none)",
    )
    q.add_argument("--ready-timeout-s", type=float, default=30.0, help="how long the lab may take to come up")
    q.set_defaults(func=cmd_lab_up)


# -- pki -----------------------------------------------------------------------------------


def cmd_pki_init(args: argparse.Namespace) -> int:
    from gateway.iedsim.pki import PkiError, init_ca

    try:
        ca = init_ca(args.dir, days=args.days)
    except PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CA certificate: {ca.cert} (give it to every participant and device)")
    print(f"CA key:         {ca.key} (mode 0600; needed only to issue more certificates)")
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    from gateway.iedsim.pki import PkiError, issue

    try:
        pair = issue(
            args.dir, args.name, hosts=tuple(args.host), common_name=args.cn, days=args.days, overwrite=args.force
        )
    except PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    use = f"server for {', '.join(args.host)} and client" if args.host else "client"
    print(f"{pair.cert} ({use}, CN {args.cn or args.name}), key {pair.key} (mode 0600)")
    return 0


# -- peers ---------------------------------------------------------------------------------


def _messaging_of(config_file: str) -> MessagingSettings:
    """The messaging block of a lab config or of an AMS config (whichever the file is).

    A lab config has ``lab``, ``devices`` or ``extends`` at its top level, an AMS config none
    of them; telling them apart first means a broken AMS config gets its own errors, not a lab
    loader's complaints about missing devices.
    """
    import yaml

    from gateway.config import load_config
    from gateway.errors import ConfigIssue

    try:
        top = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        top = None  # the loader says what is wrong, with the line
    if isinstance(top, dict) and not {"lab", "devices", "extends"} & top.keys():
        from ams.config import load_ams_config

        return load_ams_config(config_file).messaging
    cfg = load_config(config_file)
    if cfg.messaging is None:
        raise ConfigError([ConfigIssue(config_file, "messaging", "missing: this command needs the messaging block")])
    return cfg.messaging


def cmd_peers_add(args: argparse.Namespace) -> int:
    from gateway.semantic.security import load_public_identity

    if args.peers_dir is not None:
        peers_dir = Path(args.peers_dir)
    else:
        m = _messaging_of(args.config)
        if m.peers_dir is None:
            print(f"error: {args.config} names no messaging.peers_dir (use --peers-dir)", file=sys.stderr)
            return 2
        peers_dir = Path(m.peers_dir)
    peers_dir.mkdir(parents=True, exist_ok=True)
    for file in args.files:
        try:
            ident = load_public_identity(file)
        except (OSError, ValueError, ConfigError) as exc:
            print(f"error: {file} is not a public key file of `mgms keys`: {exc}", file=sys.stderr)
            return 2
        target = peers_dir / f"{ident.participant}.pub"
        data = Path(file).read_bytes()
        if target.exists() and target.read_bytes() != data and not args.force:
            print(
                f"error: {target} already holds a different key for {ident.participant} (use --force to replace it)",
                file=sys.stderr,
            )
            return 2
        if Path(file).resolve() != target.resolve():
            target.write_bytes(data)
        print(f"{ident.participant}: trusted ({target})")
    return 0


# -- broker --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerParticipant:
    """What the broker must know of one participant: its user, password variable, listener."""

    participant: str
    user: str
    password_env: str | None
    host: str
    port: int
    tls: bool
    ca_file: Path | None
    source: str


def broker_participants(config_files: list[str]) -> list[BrokerParticipant]:
    """Read the mqtt block of each config (a lab or an AMS config)."""
    from gateway.config import transport_settings_model
    from gateway.errors import ConfigIssue

    out: list[BrokerParticipant] = []
    for file in config_files:
        m = _messaging_of(file)
        raw = m.transports.get("mqtt")
        if raw is None:
            raise ConfigError([ConfigIssue(file, "messaging.transports.mqtt", "missing: the broker needs it")])
        s = transport_settings_model("mqtt").model_validate({**raw, "participant": m.participant})
        out.append(
            BrokerParticipant(
                participant=m.participant,
                user=getattr(s, "username", None) or m.participant,
                password_env=getattr(s, "password_env", None),
                host=str(getattr(s, "host", "127.0.0.1")),
                port=int(getattr(s, "port", 8883)),
                tls=bool(getattr(s, "tls", True)),
                ca_file=getattr(s, "ca_file", None),
                source=file,
            )
        )
    return out


def _acl(p: BrokerParticipant) -> list[MqttAcl]:
    """The participant's message topics, and the clock probe's (``mgms bench --lab --clock-mqtt``
    measures the MGMS-AMS clock offset over the lab's own broker, on a root of its own)."""
    from gateway.bench.clock import clock_acl
    from gateway.services import participant_acl

    clock = [MqttAcl(p.user, rule.access, rule.topic) for rule in clock_acl([p.participant])]
    return participant_acl(p.user, p.participant) + clock


def cmd_broker_config(args: argparse.Namespace) -> int:
    """Write the broker files; passwords from the variables the configs name, new ones otherwise."""
    from gateway.services import MosquittoServer, MqttTls, ServiceNotInstalled

    parts = broker_participants(args.config)
    listeners = {(p.host, p.port) for p in parts}
    if len(listeners) != 1:
        where = "; ".join(f"{p.source}: {p.host}:{p.port}" for p in parts)
        print(f"error: the configs name different brokers ({where})", file=sys.stderr)
        return 2
    host, port = listeners.pop()
    users = [p.user for p in parts]
    if len(set(users)) != len(users):
        print(f"error: two configs use the same broker user ({', '.join(users)})", file=sys.stderr)
        return 2
    tls: MqttTls | None = None
    if any(p.tls for p in parts):
        ca_files = [p.ca_file for p in parts if p.ca_file is not None]
        pki = Path(args.pki_dir) if args.pki_dir else (ca_files[0].parent if ca_files else None)
        if pki is None:
            print("error: the configs use TLS but name no ca_file: give --pki-dir", file=sys.stderr)
            return 2
        cert, key, ca = pki / f"{args.cert_name}.crt", pki / f"{args.cert_name}.key", pki / "ca.crt"
        missing = [str(f) for f in (cert, key, ca) if not f.exists()]
        if missing:
            print(
                f"error: missing {', '.join(missing)} (make them with `mgms pki init --dir {pki}` and "
                f"`mgms pki issue {args.cert_name} --dir {pki} --host {host}`)",
                file=sys.stderr,
            )
            return 2
        tls = MqttTls(cert.absolute(), key.absolute(), ca.absolute())
    passwords: dict[str, str] = {}
    exports: list[str] = []
    for p in parts:
        given = os.environ.get(p.password_env) if p.password_env else None
        passwords[p.user] = given or secrets.token_urlsafe(18)
        if p.password_env:
            exports.append(f"export {p.password_env}={passwords[p.user]}")
        else:
            print(f"warning: {p.source} names no password_env: {p.user}'s password is only in secrets.env")
            exports.append(f"# {p.user} ({p.source}): {passwords[p.user]}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    server = MosquittoServer(
        data_dir=out,
        host=host,
        port=port,
        tls=tls,
        users=passwords,
        acl=[rule for p in parts for rule in _acl(p)],
    )
    try:
        conf = server.write_config(out, port)
    except ServiceNotInstalled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    env = out / "secrets.env"
    env.touch(mode=0o600)
    env.chmod(0o600)
    env.write_text(
        "# broker passwords of the participants (mgms broker config); keep this file secret\n"
        + "\n".join(exports)
        + "\n",
        encoding="utf-8",
    )
    print(f"broker for {', '.join(users)} on {host}:{port}{' (TLS)' if tls else ''}: {conf}")
    print(f"passwords: {env} (mode 0600); `. {env}` sets the variables the configs read")
    print(f"start it: mosquitto -c {conf}")
    return 0


# -- lab up --------------------------------------------------------------------------------

LAB_UP_READY = "lab up"


async def _stop_child(proc: asyncio.subprocess.Process, name: str, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``: every child is gone when this returns."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            print(f"{name} did not stop within {timeout_s:g} s: killed", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _wait_links_up(args: argparse.Namespace, deadline: float, procs: list[asyncio.subprocess.Process]) -> str:
    """Poll the gateway's Redis until every device's link is up; the Redis URL."""
    from gateway.cli import resolve_redis_url
    from gateway.config import load_config
    from gateway.store import RedisStore

    cfg = load_config(args.config)
    url: str | None = None
    while time.monotonic() < deadline:
        if any(p.returncode is not None for p in procs):
            raise RuntimeError("a child process exited during start-up")
        url = url or resolve_redis_url(args, cfg, user="viewer")
        if url is not None:
            store = RedisStore.from_url(cfg, url)
            try:
                links = [await store.link(dev) for dev in cfg.devices]
            except Exception:  # Redis still starting
                links = []
            finally:
                await store.aclose()
            if links and all(link is not None and link.state == "up" for link in links):
                return url
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the gateway did not connect to every device within {args.ready_timeout_s:g} s")


async def _lab_up(args: argparse.Namespace) -> int:
    from gateway.config import load_config
    from gateway.services import _die_with_parent

    cfg = load_config(args.config)  # bad config: exit 2 before anything starts
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    py = sys.executable
    sim_cmd = [
        py,
        "-m",
        "gateway.iedsim.cli",
        "--log-level",
        "WARNING",
        "all",
        "--config",
        args.config,
        "--parent-pid",
        str(os.getpid()),
    ]
    if args.control_port_base is not None:
        sim_cmd += ["--control-port-base", str(args.control_port_base)]
    run_cmd = [py, "-m", "gateway.cli", "run", "--config", args.config]
    for flag in ("redis_url", "data_dir"):
        if getattr(args, flag):
            run_cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    # a SIGKILLed `lab up` (no finally runs) must not leave its children: the kernel sends them
    # SIGTERM when this thread (the main one, i.e. the process) ends - as for the embedded servers
    orphan = _die_with_parent()
    procs: list[tuple[str, asyncio.subprocess.Process]] = []
    code = 0
    try:
        sims = await asyncio.create_subprocess_exec(*sim_cmd, stdout=asyncio.subprocess.PIPE, preexec_fn=orphan)
        procs.append(("simulators", sims))
        assert sims.stdout is not None
        deadline = time.monotonic() + args.ready_timeout_s
        from gateway.iedsim.cli import ALL_READY

        while True:
            try:
                line = (await asyncio.wait_for(sims.stdout.readline(), max(0.1, deadline - time.monotonic()))).decode()
            except TimeoutError:
                print(f"error: the simulators were not ready within {args.ready_timeout_s:g} s", file=sys.stderr)
                return 1
            if not line and stop.is_set():  # Ctrl-C while they started (it reached them too)
                return 130
            if not line:
                print(f"error: the simulators exited (code {await sims.wait()})", file=sys.stderr)
                return 1
            print(line.rstrip(), flush=True)
            if ALL_READY in line:
                break
        gw = await asyncio.create_subprocess_exec(*run_cmd, preexec_fn=orphan)
        procs.append(("gateway", gw))
        up = asyncio.create_task(_wait_links_up(args, deadline, [sims, gw]))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({up, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():  # Ctrl-C before the lab was up (a child it reached may have ended first)
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await up
            return 130
        stopped.cancel()
        from gateway.services import display_url

        try:
            url = up.result()
        except (TimeoutError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(
            f"{LAB_UP_READY}: lab {cfg.lab.name!r}, {len(cfg.devices)} simulator(s) and the gateway, "
            f"Redis at {display_url(url)};"
            " Ctrl-C stops everything",
            flush=True,
        )
        # until a signal, or until a child dies (then the lab is not up any more: say so, exit 1)
        waits = {asyncio.create_task(p.wait(), name=n): n for n, p in procs}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for t in (stopper, *waits):
            if t not in done:
                t.cancel()
        if stopper not in done:  # a child ended by itself, not because of a Ctrl-C that reached it too
            for t in done:
                print(f"error: the {waits[t]} exited (code {t.result()}): stopping the lab", file=sys.stderr)
                code = 1
    finally:
        # the gateway first (it may still be writing), then the simulators; bounded each
        for name, proc in reversed(procs):
            await _stop_child(proc, name, 15.0)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(RuntimeError):
                loop.remove_signal_handler(sig)
    return code


def cmd_lab_up(args: argparse.Namespace) -> int:
    return asyncio.run(_lab_up(args))
