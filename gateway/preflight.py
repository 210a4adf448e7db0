"""What ``run`` needs beyond a valid file, checked before it starts anything.

A lab file can be valid and still not run: a secret's environment variable is unset, a key
file is not 0600 or not a key, a broker CA is not PEM, the aggregator's public key is not in
the keystore. ``run`` used to find these one at a time, each after its embedded Redis had
started. Here they are all checked at once, in the config loader's cross-entry pass, so
every problem is a :class:`~gateway.errors.ConfigIssue` with file, line and key, and
``check-config`` and ``run`` (``mgms`` and ``ams``) refuse exactly the same configs, before
anything is started, with exit 2.

Plain :func:`gateway.config.load_config` does not look at the environment: ``mgms watch`` and
``mgms command`` need no meter key and no private key.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from gateway.config import (
    TRANSPORT_SETTINGS,
    AddIssue,
    LabConfig,
    MessagingSettings,
    Path_,
    file_problem,
    load_config,
    transport_settings_model,
)
from gateway.errors import ConfigError

__all__ = ["check_lab", "check_messaging_runnable", "load_runnable_config"]

#: transport name -> module with ``preflight(settings) -> [(key, reason)]``
_TRANSPORT_PREFLIGHT = {name: target.partition(":")[0] for name, target in TRANSPORT_SETTINGS.items()}


def load_runnable_config(path: str | os.PathLike[str]) -> LabConfig:
    """:func:`load_config` plus everything ``mgms run`` reads at start (``check-config`` too)."""
    return load_config(path, checks=(check_lab,))


def check_lab(cfg: LabConfig, add: AddIssue) -> None:
    """Device secrets from the environment; the messaging keys, peers and transports."""
    from gateway.protocols import device_problems

    for name, dev in cfg.devices.items():
        files_ok = not dev.tls.enabled or all(file_problem(path) is None for _, path in dev.tls.files())
        if files_ok:  # a missing TLS file: reported by the loader
            for sub, reason in device_problems(dev):
                add(("devices", name, *sub), reason)
        if dev.protocol != "dlms":
            continue
        dlms = dev.dlms
        for key in dlms.needed_secrets:
            loc = ("devices", name, "dlms", f"{key}_env")
            try:
                dlms.secret(key)
            except LookupError:
                add(loc, f"environment variable {getattr(dlms, f'{key}_env')} is not set")
            except ValueError as exc:  # set, but not 16 octets of hex
                add(loc, str(exc))
    for key, reason in cfg.redis.problems():
        add(("redis", key), reason)
    if cfg.messaging is not None:
        flex = cfg.flexibility
        aggregator: list[tuple[Path_, str]] = [] if flex is None else [(("flexibility", "aggregator"), flex.aggregator)]
        check_messaging_runnable(cfg.messaging, add, counterparts=aggregator)


def check_messaging_runnable(
    m: MessagingSettings, add: AddIssue, *, counterparts: Iterable[tuple[Path_, str]] = ()
) -> None:
    """Our private key, the peers' public keys and each transport's variables and files.

    ``counterparts`` are (key, participant) pairs the config says we talk to (the MGMS's
    aggregator, the AMS's microgrids): each needs a public key, to encrypt to it and to
    verify what it signs.
    """
    from gateway.semantic.security import load_private_identity, load_public_identity

    known: set[str] = set()
    if os.path.isfile(m.identity_file):  # missing: reported by the loader already
        try:
            own = load_private_identity(m.identity_file)
        except ConfigError as exc:
            for issue in exc.issues:
                add(("messaging", "identity_file"), f"{m.identity_file}: {issue.reason}")
        else:
            known.add(own.participant)
            if own.participant != m.participant:
                add(
                    ("messaging", "identity_file"),
                    f"{m.identity_file} is the key of {own.participant!r}, not of participant {m.participant!r}",
                )
    peer_files: list[tuple[Path_, Path]] = [
        (("messaging", "peer_files", i), Path(f)) for i, f in enumerate(m.peer_files)
    ]
    if m.peers_dir is not None and os.path.isdir(m.peers_dir):
        peer_files += [(("messaging", "peers_dir"), f) for f in sorted(Path(m.peers_dir).glob("*.pub"))]
    for loc, file in peer_files:
        if not file.is_file():
            continue  # reported by the loader
        try:
            known.add(load_public_identity(file).participant)
        except ConfigError as exc:
            for issue in exc.issues:
                add(loc, f"{file}: {issue.reason}")
    for loc, participant in counterparts:
        if participant not in known:
            where = " or ".join(k for k, v in (("peers_dir", m.peers_dir), ("peer_files", m.peer_files)) if v)
            add(
                loc,
                f"no public key of {participant!r} in messaging.{where or 'peers_dir'}"
                f" (its {participant}.pub, made by `mgms keys {participant}` on its side)",
            )
    for name, raw in m.transports.items():
        _check_transport(m.participant, name, raw, add)


def _check_transport(participant: str, name: str, raw: dict[str, object], add: AddIssue) -> None:
    module = _TRANSPORT_PREFLIGHT.get(name)
    if module is None:
        return  # unknown transport: reported by the loader
    try:
        settings = transport_settings_model(name).model_validate({**raw, "participant": participant})
    except ValidationError:
        return  # reported by the loader
    check: Callable[[BaseModel], list[tuple[tuple[str, ...], str]]] = importlib.import_module(module).preflight
    for key, reason in check(settings):
        add(("messaging", "transports", name, *key), reason)
