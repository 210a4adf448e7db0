"""Lab configuration: YAML in, frozen typed models out, or a ConfigError naming every problem.

A lab file describes the lab, its devices and its points. A *profile* file can ``extends:``
another lab file and override parts of it (e.g. point the same lab at the local simulators);
overrides are merged key by key, so every reported line number still names the file that
holds the offending key.

Validation runs in two passes: pydantic checks each field (types, ranges, known units); a
second pass checks what spans entries (device references, duplicate addresses, a status
point for every control point, type compatibility). Both passes report into one list.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import os
import re
import ssl
import stat
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError, ConfigIssue

__all__ = [
    "QUANTITY_UNITS",
    "ClockSyncSettings",
    "CommandSettings",
    "CounterInterrogationSettings",
    "Device",
    "Direction",
    "DlmsAddress",
    "DlmsSettings",
    "Endpoint",
    "Iec104Address",
    "Iec61850Address",
    "LabConfig",
    "Point",
    "RedisAuth",
    "RedisUrl",
    "check_host",
    "check_redis_url",
    "file_problem",
    "iec104_address",
    "iec61850_address",
    "load_config",
    "no_pass_phrase",
    "pem_pair_problem",
]

# ---------------------------------------------------------------------------------------
# Vocabulary


class Direction(enum.StrEnum):
    MONITOR = "monitor"
    CONTROL = "control"


#: Quantities the gateway knows and the units each may be given in. "1" is dimensionless.
QUANTITY_UNITS: Mapping[str, tuple[str, ...]] = {
    "voltage": ("V", "kV"),
    "current": ("A", "kA"),
    "active_power": ("W", "kW", "MW"),
    "reactive_power": ("var", "kvar", "Mvar"),
    "apparent_power": ("VA", "kVA", "MVA"),
    "power_factor": ("1",),
    "frequency": ("Hz",),
    "active_energy": ("Wh", "kWh", "MWh"),
    "reactive_energy": ("varh", "kvarh", "Mvarh"),
    "temperature": ("degC", "K"),
    "breaker_position": ("1",),
    "breaker_command": ("1",),
    "switch_state": ("1",),
    "switch_command": ("1",),
    "active_power_setpoint": ("W", "kW", "MW", "%"),
    "reactive_power_setpoint": ("var", "kvar", "Mvar", "%"),
    "ratio": ("1", "%"),
}
KNOWN_UNITS: frozenset[str] = frozenset(u for units in QUANTITY_UNITS.values() for u in units)

#: SI value of one engineering unit, for the units that are a plain factor (temperatures are
#: an offset and are not listed). Simulators and adapters convert with this one table.
UNIT_SI_FACTORS: Mapping[str, float] = {
    "V": 1.0,
    "kV": 1e3,
    "A": 1.0,
    "kA": 1e3,
    "W": 1.0,
    "kW": 1e3,
    "MW": 1e6,
    "var": 1.0,
    "kvar": 1e3,
    "Mvar": 1e6,
    "VA": 1.0,
    "kVA": 1e3,
    "MVA": 1e6,
    "Wh": 1.0,
    "kWh": 1e3,
    "MWh": 1e6,
    "varh": 1.0,
    "kvarh": 1e3,
    "Mvarh": 1e6,
    "Hz": 1.0,
    "1": 1.0,
}

#: IEC 104 ASDU types the adapter and the simulator handle, by kind.
IEC104_MONITOR_TYPES = {
    "M_SP_NA_1": "single",
    "M_SP_TB_1": "single",
    "M_DP_NA_1": "double",
    "M_DP_TB_1": "double",
    "M_ME_NA_1": "measured",
    "M_ME_NB_1": "measured",
    "M_ME_NC_1": "measured",
    "M_ME_TD_1": "measured",
    "M_ME_TE_1": "measured",
    "M_ME_TF_1": "measured",
    # integrated totals (energy counters): read by counter interrogation, not by the GI;
    # asyncio engine only (checked at load)
    "M_IT_NA_1": "integrated",
    "M_IT_TB_1": "integrated",
}
#: Monitor types only the asyncio IEC 104 engine reads.
IEC104_ASYNCIO_ONLY_TYPES = frozenset({"M_IT_NA_1", "M_IT_TB_1"})
IEC104_CONTROL_TYPES = {
    "C_SC_NA_1": "single",
    "C_SC_TA_1": "single",
    "C_DC_NA_1": "double",
    "C_DC_TA_1": "double",
    "C_SE_NA_1": "measured",
    "C_SE_NB_1": "measured",
    "C_SE_NC_1": "measured",
    "C_SE_TA_1": "measured",
    "C_SE_TB_1": "measured",
    "C_SE_TC_1": "measured",
}
IEC104_TYPES = {**IEC104_MONITOR_TYPES, **IEC104_CONTROL_TYPES}


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def check_host(v: str) -> str:
    """``v`` if it is an IPv4 or IPv6 address or a host name (RFC 1123), else ValueError.

    Checked at load because the protocol libraries refuse a bad host only when they connect
    (c104 with a bare ``ValueError``, after the embedded Redis has started). A port in the
    host and a dotted quad that is no IPv4 address (``127.0.0.300``) are named as such.
    """
    if not v:
        raise ValueError("empty host: give an IP address or a host name")
    try:
        ipaddress.ip_address(v)
        return v
    except ValueError:
        pass
    if v.startswith("[") and v.endswith("]"):
        raise ValueError(f"{v!r}: write an IPv6 address without brackets")
    host, sep, port = v.rpartition(":")
    if sep and port.isdigit() and host.count(":") == 0:
        raise ValueError(f"{v!r}: no port in host (give it as port: {port})")
    labels = v.removesuffix(".").split(".")
    if labels[-1].isdigit():
        # RFC 1123 2.1: a name is never all-numeric dotted, so this was meant as an IPv4 address
        raise ValueError(f"{v!r} is not an IPv4 address (four numbers 0..255)")
    if len(v) > 253:
        raise ValueError(f"host name of {len(v)} characters (at most 253)")
    if not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"{v!r} is not an IP address or a host name (letters, digits, '-' and '.'; RFC 1123)")
    return v


def check_redis_url(v: str) -> str:
    """A URL redis-py can connect with; a wrong one otherwise fails ``run`` with a traceback."""
    parts = urlsplit(v)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{v!r}: a Redis URL starts with redis://, rediss:// or unix://")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{v!r}: unix:// needs the socket path (unix:///run/redis.sock)")
        return v
    try:
        parts.port  # noqa: B018 - raises on a port that is no number or out of range
    except ValueError as exc:
        raise ValueError(f"{v!r}: {exc}") from None
    if parts.hostname:
        check_host(parts.hostname)
    return v


#: A Redis URL, checked at load (the lab's and the AMS's ``redis.url``).
RedisUrl = Annotated[str, AfterValidator(check_redis_url)]


def _suggest_unit(word: str) -> str:
    """The unit meant when only the case is wrong ('KW' -> 'kW', not difflib's 'W'), else the closest."""
    same = [u for u in KNOWN_UNITS if u.lower() == word.lower()]
    return f" (did you mean {same[0]!r}?)" if len(same) == 1 else _suggest(word, KNOWN_UNITS)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------------------
# Devices


class Iec104Timers(_Frozen):
    """IEC 60870-5-104 timers in whole seconds (c104 takes seconds) and window sizes."""

    t0_s: Annotated[int, Field(ge=1, le=255)] = 30
    t1_s: Annotated[int, Field(ge=1, le=255)] = 15
    t2_s: Annotated[int, Field(ge=1, le=255)] = 10
    t3_s: Annotated[int, Field(ge=1, le=172800)] = 20
    k: Annotated[int, Field(ge=1, le=32767)] = 12
    w: Annotated[int, Field(ge=1, le=32767)] = 8

    @model_validator(mode="after")
    def _ordered(self) -> Iec104Timers:
        # IEC 60870-5-104 5.1: acknowledge (t2) before the peer's send timeout (t1) expires;
        # acknowledge at the latest after w frames, and w must not exceed two thirds of k.
        if self.t2_s >= self.t1_s:
            raise ValueError(f"t2_s ({self.t2_s}) must be smaller than t1_s ({self.t1_s})")
        if self.w > self.k:
            raise ValueError(f"w ({self.w}) must not exceed k ({self.k})")
        return self


class TlsSettings(_Frozen):
    """Transport security toward a device (IEC 62351-3 style TLS); files are PEM paths.

    Relative paths are read from the directory of the lab file that names them (not the
    gateway's working directory) and must exist when the config is loaded with ``enabled``.
    ``ca_file`` is the CA the device's certificate must chain to (needed when ``verify``);
    ``cert_file``/``key_file`` are the gateway's own certificate for mutual authentication.
    ``check_hostname`` also demands that
    the device certificate names ``host`` (DNS or IP subjectAltName); field devices often carry
    certificates without their address, so it can be switched off while the chain is still
    verified. ``verify: false`` encrypts without authenticating the device: lab use only.
    """

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    check_hostname: bool = True

    def files(self) -> tuple[tuple[str, str], ...]:
        """(key, path) of every PEM file given, for checks that name the key."""
        named = (("ca_file", self.ca_file), ("cert_file", self.cert_file), ("key_file", self.key_file))
        return tuple((key, path) for key, path in named if path is not None)


class ReconnectPolicy(_Frozen):
    """Capped exponential backoff with full jitter between reconnect attempts."""

    initial_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    max_s: Annotated[float, Field(gt=0, le=3600)] = 30.0


class SimulatorSettings(_Frozen):
    """How the simulator standing in for this device behaves (ignored for real devices)."""

    nominal_voltage_v: Annotated[float, Field(gt=0)] = 230.0
    mean_load_kw: Annotated[float, Field(ge=0)] = 60.0
    power_factor: Annotated[float, Field(gt=0, le=1)] = 0.95
    noise: Annotated[float, Field(ge=0, le=0.5)] = 0.005
    period_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    breaker_travel_s: Annotated[float, Field(ge=0, le=10)] = 0.06
    select_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    seed: int | None = None
    #: COT 1 (periodic) transmission of every measured point at this period; 0 = off.
    cyclic_period_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    #: IEC 104: the types a general interrogation (COT 20) is answered with. "untagged" (the
    #: default, as a COM600 or REF615 does): the type of the point's kind without time tag
    #: (M_ME_NC_1 for a point configured M_ME_TF_1); "configured": the configured type.
    #: Spontaneous and periodic values always use the configured type.
    gi_types: Literal["untagged", "configured"] = "untagged"
    #: Meter readings at simulator start (a real meter's registers are not 0): the energy
    #: registers integrate the simulated power from here.
    initial_energy_kwh: Annotated[float, Field(ge=0)] = 0.0
    initial_reactive_energy_kvarh: Annotated[float, Field(ge=0)] = 0.0
    #: Server side of TLS, used when the device's ``tls.enabled``: the outstation's own
    #: certificate and key (PEM), and the CA client certificates must chain to (none: the
    #: outstation asks for no client certificate).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None


class ClockSyncSettings(_Frozen):
    """Clock synchronisation the gateway sends to an IEC 104 device (C_CS_NA_1).

    Off by default: a device whose clock comes from SNTP/PTP (most COM600 installations) must
    not be set by a second source, so setting it is the lab's decision. ``on_connect`` sends
    one after STARTDT, before the general interrogation (so the values the GI brings are
    already stamped by the corrected clock); ``period_s`` repeats it (0 = never).
    """

    on_connect: bool = False
    period_s: Annotated[float, Field(ge=0, le=86400)] = 0.0

    @property
    def enabled(self) -> bool:
        return self.on_connect or self.period_s > 0


class Endpoint(_Frozen):
    """Another address of the same station: one outstation of a redundant pair (or group)."""

    host: str
    port: Annotated[int, Field(ge=1, le=65535)]

    @field_validator("host")
    @classmethod
    def _valid_host(cls, v: str) -> str:
        return check_host(v)


class CounterInterrogationSettings(_Frozen):
    """Counter interrogation (C_CI_NA_1) of a device's integrated totals (``M_IT_*`` points).

    Integrated totals are not part of the general interrogation. ``on_connect`` reads them
    after the GI on every connect (only a device with counter points is asked); ``period_s``
    repeats it (0 = only on connect and on demand). The request is always the general one
    (RQT 5) without freeze (FRZ 0): the device answers with its counters as they are.
    """

    on_connect: bool = True
    period_s: Annotated[float, Field(ge=0, le=86400)] = 0.0


#: Default DLMS client addresses per security level (Blue Book: public client 16, the
#: reading client with a password 17, the management client 1 for HLS).
DLMS_CLIENT_ADDRESSES: Mapping[str, int] = {"none": 16, "low": 17, "high_gmac": 1}

_OBIS_PATTERN = r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$"


def _check_obis(v: str) -> str:
    if any(int(part) > 255 for part in v.split(".")):
        raise ValueError(f"OBIS code {v!r}: every group must be 0..255")
    return v


def _check_hex_key(v: str | None, octets: int, what: str) -> str | None:
    if v is None:
        return v
    try:
        raw = bytes.fromhex(v)
    except ValueError:
        raise ValueError(f"{what} must be hexadecimal") from None
    if len(raw) != octets:
        raise ValueError(f"{what} must be {octets} octets ({2 * octets} hex digits), not {len(raw)}")
    return v


class DlmsLoadProfile(_Frozen):
    """A Profile Generic (class 7) the adapter reads by range, so each read fetches only new rows.

    Columns whose capture object (class, OBIS, attribute) is a configured point's address
    update that point with the row's capture time as source time.
    """

    obis: Annotated[str, Field(pattern=_OBIS_PATTERN)] = "1.0.99.1.0.255"
    #: How often the meter captures a row (the simulator uses it; the adapter reads it back).
    capture_period_s: Annotated[float, Field(gt=0, le=86400)] = 900.0
    #: How often the gateway asks for rows newer than the last one it has.
    read_period_s: Annotated[float, Field(gt=0, le=86400)] = 300.0
    #: On the first read after start, how far back to fetch.
    backfill_s: Annotated[float, Field(ge=0, le=31 * 86400)] = 3600.0
    #: Rows the simulated meter keeps (a ring buffer, like a real meter's profile depth).
    depth: Annotated[int, Field(ge=1, le=100_000)] = 2880

    @field_validator("obis")
    @classmethod
    def _obis_groups(cls, v: str) -> str:
        return _check_obis(v)


class DlmsSettings(_Frozen):
    """DLMS/COSEM association toward one meter (LN referencing over TCP).

    Secrets (password, keys) are never meant to sit in a committed lab file: name an
    environment variable with the ``*_env`` keys instead; the literal keys exist for
    throw-away simulator labs. Keys are hexadecimal (16 octets, AES-128, suite 0).
    """

    framing: Literal["wrapper", "hdlc"] = "wrapper"
    security: Literal["none", "low", "high_gmac"] = "none"
    #: Client SAP; default by security level (16 public, 17 low, 1 high).
    client_address: Annotated[int, Field(ge=1, le=127)] | None = None
    #: Server logical device address (1 = management logical device).
    server_address: Annotated[int, Field(ge=1, le=16383)] = 1
    password: str | None = None
    password_env: str | None = None
    #: Client system title, 8 octets hex (HLS).
    system_title: str = "4D474D5300000001"
    block_cipher_key: str | None = None
    block_cipher_key_env: str | None = None
    authentication_key: str | None = None
    authentication_key_env: str | None = None
    #: Registers (every point of the device) are read at this period.
    poll_period_s: Annotated[float, Field(gt=0, le=86400)] = 10.0
    #: The meter clock is read at this period; its drift from this host is a stat.
    clock_obis: Annotated[str, Field(pattern=_OBIS_PATTERN)] | None = "0.0.1.0.0.255"
    clock_period_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    load_profile: DlmsLoadProfile | None = None
    response_timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0

    @field_validator("clock_obis")
    @classmethod
    def _clock_obis(cls, v: str | None) -> str | None:
        return None if v is None else _check_obis(v)

    @field_validator("system_title")
    @classmethod
    def _title(cls, v: str) -> str:
        _check_hex_key(v, 8, "system_title")
        return v

    @field_validator("block_cipher_key", "authentication_key")
    @classmethod
    def _keys(cls, v: str | None) -> str | None:
        return _check_hex_key(v, 16, "key")

    @model_validator(mode="after")
    def _secrets(self) -> DlmsSettings:
        if self.password is not None and self.password_env is not None:
            raise ValueError("give password or password_env, not both")
        if self.security == "low" and self.password is None and self.password_env is None:
            raise ValueError("security 'low' needs password or password_env")
        for key in ("block_cipher_key", "authentication_key"):
            given = getattr(self, key) is not None, getattr(self, f"{key}_env") is not None
            if all(given):
                raise ValueError(f"give {key} or {key}_env, not both")
            if self.security == "high_gmac" and not any(given):
                raise ValueError(f"security 'high_gmac' needs {key} or {key}_env")
        return self

    @property
    def needed_secrets(self) -> tuple[str, ...]:
        """The secrets the security level uses (``secret(key)`` for each when associating)."""
        return {"none": (), "low": ("password",), "high_gmac": ("block_cipher_key", "authentication_key")}[
            self.security
        ]

    @property
    def client_sap(self) -> int:
        return self.client_address if self.client_address is not None else DLMS_CLIENT_ADDRESSES[self.security]

    def secret(self, key: str) -> str | None:
        """The value of ``password`` / ``block_cipher_key`` / ``authentication_key``, from the
        config or from the environment variable it names; LookupError if that is unset."""
        literal: str | None = getattr(self, key)
        env: str | None = getattr(self, f"{key}_env")
        if env is None:
            return literal
        value = os.environ.get(env)
        if value is None:
            raise LookupError(f"environment variable {env} (dlms.{key}_env) is not set")
        if key != "password":
            _check_hex_key(value, 16, f"environment variable {env}")
        return value


_RCB_PATTERN = r"^[A-Za-z0-9_]+/[A-Za-z0-9_]+\.(BR|RP)\.[A-Za-z0-9_]+$"


def _asyncio_104_only(key: str, info: ValidationInfo) -> None:
    """Refuse a setting only the asyncio IEC 104 engine carries out, rather than ignore it.

    Fields validate in declaration order, so protocol and iec104_engine are in ``info.data``
    unless they failed themselves (then that error is the one to read, and this passes).
    """
    protocol, engine = info.data.get("protocol"), info.data.get("iec104_engine")
    if protocol is not None and protocol != "iec104":
        raise ValueError(f"{key} is for protocol iec104 devices, not {protocol}")
    if engine is not None and engine != "asyncio":
        raise ValueError(f"{key} needs iec104_engine: asyncio (the {engine} engine does not do it)")


class Device(_Frozen):
    """A field device (or a front end such as a COM600) the gateway talks to."""

    name: str
    protocol: str
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    common_address: Annotated[int, Field(ge=1, le=65534)] = 1
    originator_address: Annotated[int, Field(ge=0, le=255)] = 0
    timers: Iec104Timers = Iec104Timers()
    gi_period_s: Annotated[float, Field(ge=0)] = 60.0
    command_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    reconnect: ReconnectPolicy = ReconnectPolicy()
    tls: TlsSettings = TlsSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    read_only: bool = False
    #: IEC 61850: the IED name; MMS domains are IED name + logical-device inst (REF615LD0),
    #: so point references stay as short as in the relay's documentation (LD0/MMXU1.PhV.phsA).
    ied_name: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")] | None = None
    #: IEC 61850: report control blocks to enable ("LD0/LLN0.BR.brcbMeas"), buffered ones
    #: preferred; values come by report, points in no data set are read at connect and GI.
    report_control_blocks: tuple[Annotated[str, Field(pattern=_RCB_PATTERN)], ...] = ()
    #: DLMS/COSEM association and polling (protocol dlms only).
    dlms: DlmsSettings = DlmsSettings()
    #: IEC 104 client engine (protocol iec104 only): "asyncio" (the default: the project's
    #: own client on the event loop, no threads, whole TCP reads decoded in bulk, 2-3 times
    #: the ingest rate of c104, docs/scale.md; it survives a garbling outstation, where
    #: c104 2.2.1 can crash the process, docs/protocol-notes.md) or "c104" (lib60870 in
    #: native threads, kept as the second engine and an independent check of the first).
    iec104_engine: Literal["asyncio", "c104"] = "asyncio"

    @field_validator("host")
    @classmethod
    def _valid_host(cls, v: str) -> str:
        return check_host(v)

    @field_validator("iec104_engine")
    @classmethod
    def _engine_for_104_only(cls, v: str, info: ValidationInfo) -> str:
        # on the field, so the error names iec104_engine and its line; the default passes
        # (with_device() re-validates a full dump, default included)
        protocol = info.data.get("protocol")
        if v != "asyncio" and protocol != "iec104":
            raise ValueError(f"iec104_engine is for protocol iec104 devices, not {protocol}")
        return v

    #: IEC 104 clock synchronisation sent by the gateway (asyncio engine only).
    clock_sync: ClockSyncSettings = ClockSyncSettings()

    @field_validator("clock_sync")
    @classmethod
    def _clock_sync_engine(cls, v: ClockSyncSettings, info: ValidationInfo) -> ClockSyncSettings:
        if v.enabled:
            _asyncio_104_only("clock_sync", info)
        return v

    #: IEC 104 redundancy (asyncio engine only): the other outstations that serve the same
    #: station (common address, points), e.g. the second COM600 of a redundant pair. The
    #: gateway talks to one at a time, host/port first; on a loss it switches to the next
    #: at once, without the reconnect backoff.
    redundant_hosts: tuple[Endpoint, ...] = ()

    @field_validator("redundant_hosts")
    @classmethod
    def _redundancy(cls, v: tuple[Endpoint, ...], info: ValidationInfo) -> tuple[Endpoint, ...]:
        if not v:
            return v
        _asyncio_104_only("redundant_hosts", info)
        seen = {(info.data.get("host"), info.data.get("port")): "host/port"}
        for i, e in enumerate(v):
            first = seen.setdefault((e.host, e.port), f"redundant_hosts[{i}]")
            if first != f"redundant_hosts[{i}]":
                raise ValueError(f"redundant_hosts[{i}] ({e.host}:{e.port}) is the same outstation as {first}")
        return v

    #: IEC 104 counter interrogation of the ``M_IT_*`` points (asyncio engine only).
    counter_interrogation: CounterInterrogationSettings = CounterInterrogationSettings()

    @field_validator("counter_interrogation")
    @classmethod
    def _counter_engine(cls, v: CounterInterrogationSettings, info: ValidationInfo) -> CounterInterrogationSettings:
        if v.period_s > 0:
            _asyncio_104_only("counter_interrogation.period_s", info)
        return v


# ---------------------------------------------------------------------------------------
# Points


class Iec104Address(_Frozen):
    """Where a point lives in an IEC 104 station: information object address and ASDU type."""

    ioa: Annotated[int, Field(ge=1, le=16777215)]
    type: str

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in IEC104_TYPES:
            raise ValueError(f"unknown IEC 104 type {v!r}{_suggest(v, IEC104_TYPES)}")
        return v

    @property
    def kind(self) -> str:
        """single / double / measured: what value the point carries."""
        return IEC104_TYPES[self.type]

    @property
    def is_control(self) -> bool:
        return self.type.startswith("C_")

    # -- the face every address model shows the rest of the config checks --------------
    #: field that must be unique per device, and the field that decides control/monitor
    key_field: ClassVar[str] = "ioa"
    kind_field: ClassVar[str] = "type"
    direction_rule: ClassVar[str] = "C_* types are control, M_* monitor"

    @property
    def key(self) -> Hashable:
        return self.ioa

    def describe(self) -> str:
        return f"ioa {self.ioa}"


#: COSEM interface classes a DLMS point may name (read-only, numeric value attribute).
DLMS_CLASSES: Mapping[int, str] = {1: "Data", 3: "Register", 4: "Extended Register"}


class DlmsAddress(_Frozen):
    """A COSEM attribute: OBIS logical name, interface class and attribute index.

    Register / Extended Register values are delivered with their scaler (10^scaler) and
    unit (attribute 3) applied; the point's ``scale``/``offset`` then map into its unit.
    """

    obis: Annotated[str, Field(pattern=_OBIS_PATTERN)]
    class_id: int = 3
    attribute: Annotated[int, Field(ge=1, le=127)] = 2

    @field_validator("obis")
    @classmethod
    def _obis_groups(cls, v: str) -> str:
        return _check_obis(v)

    @field_validator("class_id")
    @classmethod
    def _known_class(cls, v: int) -> int:
        if v not in DLMS_CLASSES:
            known = ", ".join(f"{k} ({n})" for k, n in DLMS_CLASSES.items())
            raise ValueError(f"COSEM class {v} not supported for points; use one of {known}")
        return v

    @property
    def kind(self) -> str:
        return "measured"

    @property
    def is_control(self) -> bool:
        return False

    key_field: ClassVar[str] = "obis"
    kind_field: ClassVar[str] = "class_id"
    direction_rule: ClassVar[str] = "DLMS points are monitor-only"

    @property
    def key(self) -> Hashable:
        return (self.obis, self.attribute)

    def describe(self) -> str:
        return f"OBIS {self.obis} attribute {self.attribute}"


#: IEC 61850 common data classes the adapter and simulator handle, by kind of value.
IEC61850_CDCS = {
    "MV": "measured",
    "CMV": "measured",
    "WYE": "measured",
    "DEL": "measured",
    "APC": "measured",
    "INS": "measured",
    "INC": "measured",
    "DPS": "double",
    "DPC": "double",
    "SPS": "single",
    "SPC": "single",
}
#: Functional constraints a point may name, and the CDCs each fits.
IEC61850_FCS: Mapping[str, frozenset[str]] = {
    "MX": frozenset({"MV", "CMV", "WYE", "DEL", "APC"}),
    "ST": frozenset({"INS", "INC", "DPS", "DPC", "SPS", "SPC"}),
    "CO": frozenset({"DPC", "SPC", "INC", "APC"}),
}


class Iec61850Address(_Frozen):
    """Where a point lives in an IEC 61850 server: object reference, FC and CDC.

    ``ref`` is ``LDinst/LNname.DO[.subDO]`` without the IED name (that is the device's
    ``ied_name``), e.g. ``LD0/MMXU1.PhV.phsA``; the FC says which view of the data object
    (MX measured, ST status, CO control); the CDC says how its value is laid out. A CO point
    is a control; the others are monitored.
    """

    ref: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+/[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+$")]
    fc: str
    cdc: str

    @field_validator("fc")
    @classmethod
    def _known_fc(cls, v: str) -> str:
        if v not in IEC61850_FCS:
            raise ValueError(f"unsupported functional constraint {v!r}{_suggest(v, IEC61850_FCS)}; use MX, ST or CO")
        return v

    @field_validator("cdc")
    @classmethod
    def _known_cdc(cls, v: str) -> str:
        if v not in IEC61850_CDCS:
            raise ValueError(f"unsupported CDC {v!r}{_suggest(v, IEC61850_CDCS)}; known: {', '.join(IEC61850_CDCS)}")
        return v

    @model_validator(mode="after")
    def _fc_fits_cdc(self) -> Iec61850Address:
        if self.cdc not in IEC61850_FCS[self.fc]:
            raise ValueError(
                f"CDC {self.cdc} has no {self.fc} value to use here"
                f" (FC {self.fc} takes {', '.join(sorted(IEC61850_FCS[self.fc]))})"
            )
        return self

    @property
    def ld_inst(self) -> str:
        return self.ref.split("/", 1)[0]

    @property
    def kind(self) -> str:
        return IEC61850_CDCS[self.cdc]

    @property
    def is_control(self) -> bool:
        return self.fc == "CO"

    key_field: ClassVar[str] = "ref"
    kind_field: ClassVar[str] = "fc"
    direction_rule: ClassVar[str] = "FC CO is control, MX and ST monitor"

    @property
    def key(self) -> Hashable:
        return (self.ref, self.fc)

    def describe(self) -> str:
        return f"{self.ref} [{self.fc}]"


#: Address model per protocol; adding a protocol adds its address model here and to
#: ``PointAddress``. Each model provides ``kind`` (measured/double/single), ``is_control``,
#: ``key`` (unique per device), ``describe()``, ``key_field``, ``kind_field`` and
#: ``direction_rule``.
ADDRESS_MODELS: Mapping[str, type[_Frozen]] = {
    "iec104": Iec104Address,
    "dlms": DlmsAddress,
    "iec61850": Iec61850Address,
}


def _address_tag(value: Any) -> str:
    """Pick the address model by its key field, so an error speaks of one model, not all."""
    for tag, model in ADDRESS_MODELS.items():
        if isinstance(value, model):
            return tag
    if isinstance(value, Mapping):
        for tag, model in ADDRESS_MODELS.items():
            if getattr(model, "key_field", None) in value:
                return tag
    return "iec104"


PointAddress = Annotated[
    Annotated[Iec104Address, Tag("iec104")]
    | Annotated[DlmsAddress, Tag("dlms")]
    | Annotated[Iec61850Address, Tag("iec61850")],
    Discriminator(_address_tag),
]


def iec104_address(point: Point) -> Iec104Address:
    """The address of ``point`` as IEC 104, for 104 code (the lab check guarantees the type)."""
    address = point.address
    if not isinstance(address, Iec104Address):
        raise TypeError(f"point {point.name} has no IEC 104 address")
    return address


def iec61850_address(point: Point) -> Iec61850Address:
    """The address of ``point`` as IEC 61850, for 61850 code (the lab check guarantees the type)."""
    address = point.address
    if not isinstance(address, Iec61850Address):
        raise TypeError(f"point {point.name} has no IEC 61850 address")
    return address


class Point(_Frozen):
    """A configured point: meaning (quantity, unit, phase), place (device, address), handling."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    device: str
    quantity: str
    unit: str
    phase: Literal["L1", "L2", "L3", "N", "L1L2", "L2L3", "L3L1", "total"] | None = None
    address: PointAddress
    direction: Direction = Direction.MONITOR
    scale: float = 1.0
    offset: float = 0.0
    deadband: Annotated[float, Field(ge=0)] = 0.0
    status_point: str | None = None
    select_before_operate: bool = False
    confirm_timeout_s: Annotated[float, Field(gt=0, le=600)] | None = None
    confirm_tolerance: Annotated[float, Field(ge=0)] = 0.0
    min_value: float | None = None
    max_value: float | None = None
    description: str = ""

    @field_validator("quantity")
    @classmethod
    def _known_quantity(cls, v: str) -> str:
        if v not in QUANTITY_UNITS:
            raise ValueError(f"unknown quantity {v!r}{_suggest(v, QUANTITY_UNITS)}")
        return v

    @field_validator("unit")
    @classmethod
    def _known_unit(cls, v: str) -> str:
        if v not in KNOWN_UNITS:
            raise ValueError(f"unknown unit {v!r}{_suggest_unit(v)}; known: {', '.join(sorted(KNOWN_UNITS))}")
        return v

    @field_validator("scale")
    @classmethod
    def _nonzero_scale(cls, v: float) -> float:
        if v == 0:
            raise ValueError("scale must not be 0 (a set-point could not be converted back)")
        return v

    def to_engineering(self, raw: float) -> float:
        """Protocol value -> engineering value in ``unit``."""
        return raw * self.scale + self.offset

    def to_raw(self, engineering: float) -> float:
        """Engineering value -> protocol value (for set-points)."""
        return (engineering - self.offset) / self.scale


# ---------------------------------------------------------------------------------------
# Lab


class RedisAuth(_Frozen):
    """Who we are on a Redis we did not start: its ``url``, the ``user`` and its secret.

    The secret comes from ``password_file`` (one line; relative to the file naming it; not
    readable by group or others) or from the environment variable ``password_env``, never
    from the config itself or the URL. Without ``url`` the service starts its own Redis with
    its own users and secrets (docs/security.md), so none of these keys may be given.
    """

    url: RedisUrl | None = None
    user: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None
    password_file: str | None = None
    password_env: str | None = None

    @model_validator(mode="after")
    def _auth_needs_url(self) -> RedisAuth:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        given = [k for k in ("user", "password_file", "password_env") if getattr(self, k) is not None]
        if given and self.url is None:
            raise ValueError(
                f"{', '.join(given)}: only with url (without url the service starts its own Redis "
                "with its own users and secrets, docs/security.md)"
            )
        return self

    def password(self) -> str | None:
        """The secret, read now from ``password_file`` or ``password_env``; None if neither.

        Raises LookupError (unset variable) or OSError/ValueError (unreadable or empty file).
        """
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise LookupError(f"environment variable {self.password_env} is not set")
            return value
        if self.password_file is None:
            return None
        text = Path(self.password_file).read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"{self.password_file} is empty")
        return text

    def problems(self) -> list[tuple[str, str]]:
        """(key, reason) for what would keep a service from authenticating (check-config, run)."""
        if self.password_env is not None and os.environ.get(self.password_env) is None:
            return [("password_env", f"environment variable {self.password_env} is not set")]
        if self.password_file is None:
            return []
        problem = file_problem(self.password_file)
        if problem is not None:
            return [("password_file", problem)]
        mode = stat.S_IMODE(os.stat(self.password_file).st_mode)
        if mode & 0o077:
            return [("password_file", f"{self.password_file} is readable by others (mode {mode:04o}): chmod 600 it")]
        try:
            self.password()
        except (OSError, ValueError) as exc:
            return [("password_file", str(exc))]
        return []


class RedisSettings(RedisAuth):
    """Where live state goes. No ``url``: the gateway starts its own redis-server."""
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] = "mgms"
    history_maxlen: Annotated[int, Field(ge=10)] = 10_000
    changes_maxlen: Annotated[int, Field(ge=10)] = 100_000
    buffer_max: Annotated[int, Field(ge=100)] = 100_000
    batch_max: Annotated[int, Field(ge=1)] = 2_000


class CommandSettings(_Frozen):
    """How the gateway treats operator command requests (docs/redis-keys.md, Commands).

    ``request_validity_s``: a request still waiting in ``P:cmd:requests`` after this long
    (e.g. the gateway was down when it was made) is refused as ``expired`` instead of being
    executed into a field that may have moved on since; ``null`` = no limit.
    """

    request_validity_s: Annotated[float, Field(gt=0, le=86_400)] | None = 30.0


class LabInfo(_Frozen):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    site: str = ""


class ReceiptSettings(_Frozen):
    """End-to-end receipts (docs/transports.md, "Receipts"): a sent message stays the sender's
    until the receiver's signed Receipt comes back, resent meanwhile.

    Why a setting at all: a peer built elsewhere that sends no receipts would have every
    message resent until ``max_age_s`` and dead-lettered; ``enabled: false`` goes back to
    "done at the next hop's acknowledgement" for such a peer. ``max_age_s`` None is 0.9 x the
    shorter of ``ttl_s`` and ``replay_window_s``: a resend later than that would be refused
    as expired anyway.
    """

    enabled: bool = True
    resend_initial_s: Annotated[float, Field(gt=0, le=3600)] = 2.0
    resend_max_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_attempts: Annotated[int, Field(ge=1, le=10_000)] = 50
    max_age_s: Annotated[float, Field(gt=0, le=86_400)] | None = None


class MessagingSettings(_Frozen):
    """How this participant talks to the aggregator: identity, keys, security, transports.

    ``transports`` maps a transport name (``mqtt``, ``https``) to its own settings, checked
    by that transport's settings model at load (``gateway.transport.mqtt.MqttSettings``,
    ``gateway.transport.https.HttpsSettings``). ``routes`` names the transport per peer;
    other peers use ``default_transport`` (else the first one). Key files are read relative
    to the lab file; the private key is never in the config itself.
    """

    participant: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    identity_file: str
    peers_dir: str | None = None
    peer_files: tuple[str, ...] = ()
    security: Literal["encrypted", "signed"] = "encrypted"
    accept_signed_only: bool = False
    ttl_s: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    replay_window_s: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    transports: dict[str, dict[str, Any]]
    routes: dict[str, str] = {}
    default_transport: str | None = None
    receipts: ReceiptSettings = ReceiptSettings()


class FlexAction(_Frozen):
    """One command of an activation or of its restoration: a control point and a value."""

    point: str
    value: str | float | int | bool


class FlexResource(_Frozen):
    """A flexible part of the lab: how much it can offer, measured where, switched how.

    Offered power = the measured power at ``power_point`` (in kW, any power unit converted)
    minus ``reserve_kw`` (what the operation plan keeps for itself), capped at ``max_kw``;
    nothing is offered below ``min_kw``. ``activate`` runs at the activation start,
    ``restore`` at its stop. ``upward`` = less consumption / more generation.
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    flexibility_type: Literal["upward", "downward"]
    power_point: str
    reserve_kw: Annotated[float, Field(ge=0)] = 0.0
    max_kw: Annotated[float, Field(gt=0)] | None = None
    min_kw: Annotated[float, Field(gt=0)] = 1.0
    activate: tuple[FlexAction, ...] = Field(min_length=1)
    restore: tuple[FlexAction, ...] = ()


class FlexibilitySettings(_Frozen):
    """The MGMS side of the DSO flexibility use case (see docs/flexibility.md)."""

    aggregator: str
    location: str = ""
    period_s: Annotated[float, Field(ge=0)] = 60.0
    window_s: Annotated[float, Field(gt=0, le=86_400)] = 900.0
    lead_s: Annotated[float, Field(ge=0)] = 0.0
    verification_step_s: Annotated[int, Field(ge=1, le=3600)] = 1
    resources: tuple[FlexResource, ...] = Field(min_length=1)


class ProbeSettings(_Frozen):
    """The hop timestamps values and messages carry for latency measurement (docs/latency.md).

    On by default because ``mgms bench`` and the latency figures read them; a lab that wants
    no clock read and no byte for them switches them off. ``probes: true`` / ``probes:
    false`` is short for ``probes: {enabled: ...}``. Timestamps the system itself decides
    with (command times, a value's receive time, a flexibility's creation time) are not
    probes and stay either way.
    """

    enabled: StrictBool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, bool):
            return {"enabled": data}
        if isinstance(data, Mapping):
            return data
        raise ValueError(f"must be true, false or {{enabled: true|false}}, not {data!r}")


class LabConfig(_Frozen):
    """A whole validated lab: look points up by name with :meth:`point`."""

    lab: LabInfo
    devices: dict[str, Device]
    points: tuple[Point, ...]
    redis: RedisSettings = RedisSettings()
    commands: CommandSettings = CommandSettings()
    messaging: MessagingSettings | None = None
    flexibility: FlexibilitySettings | None = None
    probes: ProbeSettings = ProbeSettings()
    source: str = ""

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)

    def points_of(self, device: str) -> tuple[Point, ...]:
        return tuple(p for p in self.points if p.device == device)

    def with_device(self, name: str, **changes: Any) -> LabConfig:
        """A copy with some fields of one device replaced (simulator ports, test timers).

        The result is validated again, so an override cannot produce a config that
        :func:`load_config` would have refused field by field.
        """
        dev = Device.model_validate({**self.devices[name].model_dump(), **changes})
        return self.model_copy(update={"devices": {**self.devices, name: dev}})

    def only(self, *names: str) -> LabConfig:
        """A copy with just these devices and their points (one simulator, one HIL suite).

        Status points are kept with their control points since both belong to one device.
        """
        missing = [n for n in names if n not in self.devices]
        if missing:
            raise KeyError(", ".join(missing))
        return self.model_copy(
            update={
                "devices": {n: d for n, d in self.devices.items() if n in names},
                "points": tuple(p for p in self.points if p.device in names),
            }
        )


# ---------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True, slots=True)
class _Origin:
    file: str
    line: int


Path_ = tuple[str | int, ...]


#: Deeper than any lab file needs; below Python's recursion limit for the walk and pydantic.
_MAX_DEPTH = 64
#: Largest lab file read (a lab of a thousand points is some 150 kB). Why a limit at all:
#: ``extends: /dev/zero`` (or any endless or huge file) read without one never returned.
MAX_CONFIG_BYTES = 1 << 20
#: Longer integer literals than this are refused before int() sees them (its limit is 4300 digits).
_MAX_NUMBER_CHARS = 400


def _compose(text: str, file: str) -> tuple[Any, dict[Path_, _Origin]]:
    """Parse YAML keeping the line of every key, so errors can name it."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([ConfigIssue(file, "", f"not valid YAML: {getattr(exc, 'problem', exc)}", line)]) from exc
    except RecursionError as exc:
        # PyYAML's composer recurses once per nesting level: a file of thousands of '[' must be
        # a config error, not a traceback.
        raise ConfigError([ConfigIssue(file, "", "not valid YAML: nested too deeply")]) from exc
    origins: dict[Path_, _Origin] = {}
    too_big: list[ConfigIssue] = []

    def walk(n: yaml.Node | None, path: Path_, depth: int = 0) -> None:
        if n is None:
            return
        if depth > _MAX_DEPTH:
            raise ConfigError(
                [ConfigIssue(file, "", f"nested more than {_MAX_DEPTH} levels deep", n.start_mark.line + 1)]
            )
        origins.setdefault(path, _Origin(file, n.start_mark.line + 1))
        if isinstance(n, yaml.ScalarNode) and n.tag == "tag:yaml.org,2002:int" and len(n.value) > _MAX_NUMBER_CHARS:
            # int() refuses more than 4300 digits (CVE-2020-10735 guard) with a bare ValueError
            reason = f"number of {len(n.value)} characters is too long"
            too_big.append(ConfigIssue(file, _key_text(path, None), reason, n.start_mark.line + 1))
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if not isinstance(k, yaml.ScalarNode):  # `? [a, b]: x` or `{[1]: 2}`: unhashable
                    kind = "list" if isinstance(k, yaml.SequenceNode) else "mapping"
                    raise ConfigError(
                        [ConfigIssue(file, _key_text(path, None), f"a key must be text, not a {kind}",
                                     k.start_mark.line + 1)]
                    )
                key = k.value
                origins[(*path, key)] = _Origin(file, k.start_mark.line + 1)
                walk(v, (*path, key), depth + 1)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, (*path, i), depth + 1)

    walk(node, ())
    if too_big:
        raise ConfigError(too_big)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # compose succeeded, so this is a constructor problem
        raise ConfigError([ConfigIssue(file, "", f"not valid YAML: {exc}")]) from exc
    except (ValueError, OverflowError, RecursionError) as exc:
        # a scalar the constructor cannot turn into a value (a date out of range, a float
        # PyYAML's resolver takes for an int...): still the file's fault
        raise ConfigError([ConfigIssue(file, "", f"not valid YAML: {exc}")]) from exc
    return data, origins


def _merge(base: Any, over: Any, path: Path_, origins: dict[Path_, _Origin], over_origins: dict[Path_, _Origin]) -> Any:
    """Deep-merge ``over`` into ``base``. Mappings merge by key; lists of points merge by name."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v, (*path, k), origins, over_origins) if k in base else v
            if k not in base:
                _copy_origins(over_origins, (*path, k), origins, (*path, k))
        return out
    if path == ("points",) and isinstance(base, list) and isinstance(over, list):
        out_list = list(base)
        index = {p.get("name"): i for i, p in enumerate(base) if isinstance(p, dict)}
        for j, p in enumerate(over):
            name = p.get("name") if isinstance(p, dict) else None
            if name in index:
                i = index[name]
                out_list[i] = _merge(
                    base[i], p, ("points", i), origins, _shift(over_origins, ("points", j), ("points", i))
                )
            else:
                out_list.append(p)
                _copy_origins(over_origins, ("points", j), origins, ("points", len(out_list) - 1))
        return out_list
    _copy_origins(over_origins, path, origins, path)
    return over


def _shift(origins: dict[Path_, _Origin], old: Path_, new: Path_) -> dict[Path_, _Origin]:
    n = len(old)
    return {(*new, *p[n:]) if p[:n] == old else p: o for p, o in origins.items()}


def _copy_origins(src: dict[Path_, _Origin], src_path: Path_, dst: dict[Path_, _Origin], dst_path: Path_) -> None:
    n = len(src_path)
    for p, o in src.items():
        if p[:n] == src_path:
            dst[(*dst_path, *p[n:])] = o


def _read_layered(path: Path, seen: tuple[Path, ...] = ()) -> tuple[Any, dict[Path_, _Origin]]:
    file = str(path)
    if path in seen:
        raise ConfigError([ConfigIssue(file, "extends", "circular 'extends' chain")])
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # before open(): a FIFO would block there
            raise ConfigError([ConfigIssue(file, "", "cannot read file: not a regular file")])
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([ConfigIssue(file, "", f"cannot read file: {exc.strerror}")]) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue(file, "", f"file larger than {MAX_CONFIG_BYTES} bytes: not a lab file")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [ConfigIssue(file, "", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start}", bad_line)]
        ) from exc
    data, origins = _compose(text, file)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, "", "the top level must be a mapping", 1)])
    parent = data.pop("extends", None)
    if parent is None:
        return data, origins
    if not isinstance(parent, str):
        line = origins.get(("extends",))
        raise ConfigError([ConfigIssue(file, "extends", "must be a file path", line.line if line else None)])
    base_path = (path.parent / parent).resolve()
    try:
        base, base_origins = _read_layered(base_path, (*seen, path))
    except ConfigError as exc:
        # a base that cannot be read at all is this file's mistake: name the line that points at it
        where = origins.get(("extends",))
        raise ConfigError([
            ConfigIssue(file, "extends", f"{parent!r} ({i.file}): {i.reason}", where.line if where else None)
            if i.file == str(base_path) and not i.key and i.line is None
            else i
            for i in exc.issues
        ]) from exc
    merged = _merge(base, data, (), base_origins, origins)
    return merged, base_origins


def _key_text(loc: Path_, data: Any) -> str:
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and 0 <= item < len(node):
                node = node[item]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    label = f"[{item}]({node['name']})"
            else:
                node = None
            parts.append(label)
        else:
            node = node.get(item) if isinstance(node, dict) else None
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _line_for(loc: Path_, origins: dict[Path_, _Origin], default_file: str) -> tuple[str, int | None]:
    for cut in range(len(loc), -1, -1):
        o = origins.get(tuple(loc[:cut]))
        if o is not None:
            return o.file, o.line
    return default_file, None


#: Where a check reports a problem: the dotted key path (file and line are looked up) and why.
AddIssue = Callable[[Path_, str], None]
#: An extra check of a valid lab config, run in the cross-entry pass (``gateway.preflight``).
LabCheck = Callable[["LabConfig", AddIssue], None]


def load_config(path: str | os.PathLike[str], *, checks: Iterable[LabCheck] = ()) -> LabConfig:
    """Load and validate a lab file (following ``extends``); raise ConfigError listing all issues.

    ``checks`` run after the built-in cross-entry checks and report into the same list, with
    the same file and line lookup (``gateway.preflight`` adds what only ``run`` needs).
    """
    p = Path(path)
    file = str(p)
    data, origins = _read_layered(p.resolve() if p.exists() else p)
    # Devices are a mapping keyed by name: the name goes into the model.
    devices = data.get("devices")
    if isinstance(devices, dict):
        data["devices"] = {k: ({"name": k, **v} if isinstance(v, dict) else v) for k, v in devices.items()}
    _resolve_files(data, origins)
    issues: list[ConfigIssue] = []

    def add(loc: Path_, reason: str) -> None:
        f, line = _line_for(loc, origins, file)
        issues.append(ConfigIssue(f, _key_text(loc, data), reason, line))

    try:
        cfg = LabConfig.model_validate({**data, "source": file})
    except ValidationError as exc:
        for err in exc.errors():
            loc: Path_ = tuple(
                x
                for i, x in enumerate(err["loc"])
                if not (isinstance(x, str) and x.startswith("function-"))
                and not (i > 0 and err["loc"][i - 1] == "address" and x in ADDRESS_MODELS)  # union tag
            )
            # the devices dict injects 'name': errors about it are the key's fault
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key{_suggest(str(loc[-1]), _known_fields(loc, data))}"
            add(loc, msg)
        _check_valid_parts(data, add, checks)
        raise ConfigError(issues) from exc
    _check_semantics(cfg, add)
    for check in checks:
        check(cfg, add)
    if issues:
        raise ConfigError(issues)
    return cfg


_M = TypeVar("_M", bound=BaseModel)


def load_yaml_model(
    path: str | os.PathLike[str],
    model: type[_M],
    *,
    path_sections: tuple[str, ...] = (),
    on_invalid: Callable[[dict[str, Any], AddIssue], None] | None = None,
) -> tuple[_M, Callable[[Path_, str], None], list[ConfigIssue]]:
    """Load any YAML config file into ``model`` with the lab config's error reporting.

    Every issue is listed with file, line and dotted key; ``*_file``/``*_dir`` values inside
    ``path_sections`` are read relative to the file. Returns the model, an ``add(loc,
    reason)`` function for the caller's cross-field checks and the list it appends to (the
    caller raises ``ConfigError(issues)`` if that is not empty). When the model does not
    validate, ``on_invalid(data, add)`` may still check the parts that do, into the same list.
    Used by the AMS for its own config; the lab config has :func:`load_config`.
    """
    p = Path(path)
    file = str(p)
    data, origins = _read_layered(p.resolve() if p.exists() else p)
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(file, "", "the file must hold a mapping")])
    for section in path_sections:
        if isinstance(data.get(section), dict):
            _resolve_paths_in(data[section], (section,), origins)
    issues: list[ConfigIssue] = []

    def add(loc: Path_, reason: str) -> None:
        f, line = _line_for(loc, origins, file)
        issues.append(ConfigIssue(f, _key_text(loc, data), reason, line))

    try:
        obj = model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            add(tuple(err["loc"]), "unknown key" if err["type"] == "extra_forbidden" else msg)
        if on_invalid is not None:
            on_invalid(data, add)
        raise ConfigError(issues) from exc
    return obj, add, issues


#: File-path keys, per section of a device, that are read relative to the lab file naming them.
_FILE_KEYS = {
    "tls": ("ca_file", "cert_file", "key_file"),
    "simulator": ("tls_cert_file", "tls_key_file", "tls_ca_file"),
}


def _resolve_files(data: Any, origins: dict[Path_, _Origin]) -> None:
    """Make relative certificate paths relative to the file that names them, not to the cwd.

    A lab file is moved around with its certificates; where ``mgms`` is started from must
    not change which key it loads.
    """
    for section in ("messaging", "redis"):
        if isinstance(data, dict) and isinstance(data.get(section), dict):
            _resolve_paths_in(data[section], (section,), origins)
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, dict):
        return
    for name, dev in devices.items():
        if not isinstance(dev, dict):
            continue
        for section, keys in _FILE_KEYS.items():
            sec = dev.get(section)
            if not isinstance(sec, dict):
                continue
            for key in keys:
                value = sec.get(key)
                origin = origins.get(("devices", name, section, key))
                if isinstance(value, str) and value and not os.path.isabs(value) and origin is not None:
                    sec[key] = str(Path(origin.file).resolve().parent / value)


def _is_path_key(key: str) -> bool:
    return key.endswith(("_file", "_dir", "_files"))


def _resolve_paths_in(sec: dict[str, Any], loc: Path_, origins: dict[Path_, _Origin]) -> None:
    """Resolve every ``*_file``/``*_dir``/``*_files`` value below ``sec`` (the messaging block
    and its transports hold keys and certificates) relative to the file that names it."""
    for key, value in sec.items():
        here = (*loc, key)
        if isinstance(value, dict):
            _resolve_paths_in(value, here, origins)
            continue
        if not _is_path_key(str(key)):
            continue
        origin = origins.get(here)
        if origin is None:
            continue
        base = Path(origin.file).resolve().parent
        if isinstance(value, str) and value and not os.path.isabs(value):
            sec[key] = str(base / value)
        elif isinstance(value, list):
            sec[key] = [str(base / v) if isinstance(v, str) and v and not os.path.isabs(v) else v for v in value]


def _known_fields(loc: Path_, data: Any) -> list[str]:
    """Field names valid at ``loc``'s parent, for 'did you mean' on an unknown key."""
    models: dict[str, type[BaseModel]] = {
        "": LabConfig,
        "messaging": MessagingSettings,
        "flexibility": FlexibilitySettings,
        "probes": ProbeSettings,
        "resources": FlexResource,
        "activate": FlexAction,
        "restore": FlexAction,
        "lab": LabInfo,
        "redis": RedisSettings,
        "commands": CommandSettings,
        "timers": Iec104Timers,
        "tls": TlsSettings,
        "reconnect": ReconnectPolicy,
        "simulator": SimulatorSettings,
        "address": Iec104Address,
        "dlms": DlmsSettings,
        "load_profile": DlmsLoadProfile,
    }
    parent = loc[:-1]
    if not parent:
        model: type[BaseModel] = LabConfig
    elif parent[0] == "devices" and len(parent) == 2:
        model = Device
    elif parent[0] == "points" and len(parent) == 2:
        model = Point
    else:
        model = models.get(str(parent[-1]), LabConfig)
    return list(model.model_fields)


def _check_valid_parts(data: Any, add: AddIssue, checks: Iterable[LabCheck]) -> None:
    """With field errors somewhere in the file: the checks of the parts that are valid.

    The cross-entry checks need the whole model, but a device's own checks (its PEM files,
    its secrets) and the messaging block's (key files, transports) do not; running them here
    lists a bad port of one device and an unset key variable of another in the same report,
    instead of one after the other fix. ``checks`` get a stand-in config holding only the
    valid devices, messaging and flexibility blocks.
    """
    if not isinstance(data, dict):
        return

    def valid(model: type[_M], raw: Any) -> _M | None:
        try:
            return model.model_validate(raw)
        except ValidationError:
            return None

    raw_devices = data.get("devices")
    devices: dict[str, Device] = {}
    if isinstance(raw_devices, dict):
        for name, raw in raw_devices.items():
            dev = valid(Device, raw)
            if dev is not None:
                devices[str(name)] = dev
                _check_device(str(name), dev, add)
    messaging = valid(MessagingSettings, data["messaging"]) if data.get("messaging") is not None else None
    if messaging is not None:
        check_messaging(messaging, add)
    flexibility = valid(FlexibilitySettings, data["flexibility"]) if data.get("flexibility") is not None else None
    parts = LabConfig.model_construct(
        lab=LabInfo.model_construct(name=""),
        devices=devices,
        points=(),
        redis=RedisSettings(),
        messaging=messaging,
        flexibility=flexibility,
        probes=ProbeSettings(),
        source="",
    )
    for check in checks:
        check(parts, add)


def _check_device(name: str, dev: Device, add: Any) -> None:
    """The checks of one device that need no other entry (so they run even when another part
    of the file is invalid, see :func:`_check_valid_parts`)."""
    if dev.protocol not in ADDRESS_MODELS:
        add(
            ("devices", name, "protocol"),
            f"unknown protocol {dev.protocol!r}{_suggest(dev.protocol, ADDRESS_MODELS)};"
            f" supported: {', '.join(ADDRESS_MODELS)}",
        )
    tls = dev.tls
    if tls.enabled and (tls.cert_file is None) != (tls.key_file is None):
        add(("devices", name, "tls"), "cert_file and key_file go together")
    if tls.enabled and tls.verify and tls.ca_file is None:
        add(
            ("devices", name, "tls", "ca_file"),
            "needed to verify the device (the CA its certificate chains to); or set verify: false",
        )
    if tls.enabled:
        _check_tls_files(name, tls, add)
    if tls.enabled and dev.protocol == "iec61850":
        # libiec61850 can do neither (gateway/protocols/iec61850/adapter.py): refused at load,
        # not when the adapter starts
        if not tls.verify:
            add(
                ("devices", name, "tls", "verify"),
                "false is not possible with libiec61850 (it always verifies the IED certificate against ca_file)",
            )
        if tls.check_hostname:
            add(
                ("devices", name, "tls", "check_hostname"),
                "libiec61850 does not compare the IED certificate with the host name: set check_hostname: false"
                " (the chain is still verified against ca_file)",
            )
    if dev.protocol == "iec104" and dev.iec104_engine == "c104" and not tls.enabled and not _is_ipv4(dev.host):
        # c104 takes IPv4 addresses only (its ValueError "IP ... is invalid!"); with TLS it
        # connects to the gateway's own 127.0.0.1 bridge, which resolves names itself
        add(
            ("devices", name, "host"),
            f"the c104 engine connects to IPv4 addresses only, not {dev.host!r}: give the device's IPv4"
            " address, or use iec104_engine: asyncio",
        )
    if dev.protocol == "iec61850" and dev.ied_name is None:
        add(
            ("devices", name, "ied_name"),
            "an iec61850 device needs its IED name (MMS domain = IED name + LD inst)",
        )
    sim = dev.simulator
    if (sim.tls_cert_file is None) != (sim.tls_key_file is None):
        add(("devices", name, "simulator"), "tls_cert_file and tls_key_file go together")


def _check_semantics(cfg: LabConfig, add: Any) -> None:
    """Checks that span entries: references, duplicates, control/status pairing, protocols."""
    _check_messaging(cfg, add)
    _check_flexibility(cfg, add)
    for name, dev in cfg.devices.items():
        _check_device(name, dev, add)
    endpoints: dict[tuple[str, int, int], str] = {}
    for name, dev in cfg.devices.items():
        key = (dev.host, dev.port, dev.common_address)
        if key in endpoints:
            add(("devices", name, "common_address"), f"same host, port and common address as device {endpoints[key]!r}")
        endpoints[key] = name
    by_name: dict[str, int] = {}
    addresses: dict[tuple[str, Hashable], str] = {}
    for i, pt in enumerate(cfg.points):
        if pt.name in by_name:
            add(("points", i, "name"), f"duplicate point name (first at points[{by_name[pt.name]}])")
        by_name.setdefault(pt.name, i)
        if pt.device not in cfg.devices:
            add(
                ("points", i, "device"),
                f"unknown device {pt.device!r}{_suggest(pt.device, cfg.devices)};"
                f" devices: {', '.join(cfg.devices) or 'none'}",
            )
            continue
        allowed = QUANTITY_UNITS[pt.quantity]
        if pt.unit not in allowed:
            add(
                ("points", i, "unit"),
                f"unit {pt.unit!r} does not fit quantity {pt.quantity!r} (use one of {', '.join(allowed)})",
            )
        addr = pt.address
        model = ADDRESS_MODELS.get(cfg.devices[pt.device].protocol)
        if model is not None and not isinstance(addr, model):
            add(
                ("points", i, "address"),
                f"device {pt.device!r} speaks {cfg.devices[pt.device].protocol}: the address needs the fields"
                f" {', '.join(model.model_fields)}",
            )
            continue
        akey = (pt.device, addr.key)
        if akey in addresses:
            add(
                ("points", i, "address", addr.key_field),
                f"duplicate address: {addr.describe()} on device {pt.device!r}"
                f" is already used by point {addresses[akey]!r}",
            )
        addresses.setdefault(akey, pt.name)
        if addr.is_control != (pt.direction is Direction.CONTROL):
            add(
                ("points", i, "address", addr.kind_field),
                f"{addr.describe()} ({getattr(addr, addr.kind_field)}) does not fit direction"
                f" {pt.direction.value!r} ({addr.direction_rule})",
            )
        dev = cfg.devices[pt.device]
        if (
            isinstance(addr, Iec104Address)
            and addr.type in IEC104_ASYNCIO_ONLY_TYPES
            and dev.iec104_engine != "asyncio"
        ):
            add(
                ("points", i, "address", "type"),
                f"{addr.type} (integrated totals) needs iec104_engine: asyncio on device {pt.device!r};"
                f" the {dev.iec104_engine} engine does not read counters",
            )
    for i, pt in enumerate(cfg.points):
        if pt.direction is Direction.CONTROL:
            if pt.status_point is None:
                add(("points", i, "status_point"), "a control point needs the status point that confirms it")
                continue
            if pt.status_point not in by_name:
                add(
                    ("points", i, "status_point"),
                    f"unknown point {pt.status_point!r}{_suggest(pt.status_point, by_name)}",
                )
                continue
            st = cfg.points[by_name[pt.status_point]]
            if st.direction is not Direction.MONITOR:
                add(("points", i, "status_point"), f"{st.name!r} is a control point; the status must be monitored")
            elif st.address.kind != pt.address.kind:
                add(
                    ("points", i, "status_point"),
                    f"{st.name!r} is a {st.address.kind} point but {getattr(pt.address, pt.address.kind_field)}"
                    f" needs a {pt.address.kind} status",
                )
        elif pt.status_point is not None:
            add(("points", i, "status_point"), "only control points take a status point")


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a file named in a config cannot be read ("file not found: ..."), or None."""
    if not os.path.isfile(path):
        return f"file not found: {os.fspath(path)}"
    if not os.access(path, os.R_OK):
        return f"file not readable: {os.fspath(path)}"
    return None


def no_pass_phrase() -> bytes:
    """``password=`` for every ``load_cert_chain``: without it OpenSSL asks for the pass phrase
    of an encrypted key on the terminal, and ``check-config`` or ``run`` would hang there."""
    return b""


def pem_pair_problem(cert: str | os.PathLike[str], key: str | os.PathLike[str], exc: ssl.SSLError) -> str:
    """Why ``load_cert_chain(cert, key)`` failed, in words (OpenSSL says "PEM lib")."""
    try:
        with open(key, "rb") as fh:
            encrypted = b"ENCRYPTED" in fh.read(4096)
    except OSError:
        encrypted = False
    if encrypted:
        return f"key {os.fspath(key)} is encrypted: give it unencrypted (mode 0600); no one types a pass phrase"
    return f"certificate {os.fspath(cert)} and key {os.fspath(key)}: not a usable PEM pair ({exc.reason or exc})"


def _is_ipv4(host: str) -> bool:
    if host == "localhost":  # c104 takes this one name
        return True
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False


def _check_tls_files(device: str, tls: TlsSettings, add: Any) -> None:
    """Every PEM file of a device's TLS exists, is readable and is what its key says.

    Checked at load so a typo or a wrong file fails ``mgms check-config`` (and ``run`` before
    it starts anything), not the first connect. Parsed with OpenSSL (``ssl``) as the IEC 104
    adapter does; libiec61850 reads the same PEM files.
    """
    missing = False
    for field, path in tls.files():
        problem = file_problem(path)
        if problem is not None:
            add(("devices", device, "tls", field), problem)
            missing = True
    if missing:
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except ssl.SSLError as exc:
            add(("devices", device, "tls", "ca_file"), f"not a PEM CA certificate: {tls.ca_file} ({exc.reason or exc})")
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file, password=no_pass_phrase)
        except ssl.SSLError as exc:
            add(("devices", device, "tls", "cert_file"), pem_pair_problem(tls.cert_file, tls.key_file, exc))


#: Transport name -> "module:SettingsModel" that validates its block (imported lazily so a
#: lab without messaging needs neither paho nor aiohttp).
TRANSPORT_SETTINGS = {
    "mqtt": "gateway.transport.mqtt:MqttSettings",
    "https": "gateway.transport.https:HttpsSettings",
}


def transport_settings_model(name: str) -> type[BaseModel]:
    import importlib

    module, _, attr = TRANSPORT_SETTINGS[name].partition(":")
    model: type[BaseModel] = getattr(importlib.import_module(module), attr)
    return model


def _check_messaging(cfg: LabConfig, add: Any) -> None:
    if cfg.messaging is not None:
        check_messaging(cfg.messaging, add)


def check_messaging(m: MessagingSettings, add: Any) -> None:
    """Cross-checks of a messaging block (files exist, transports known and valid, routes)."""
    for field in ("identity_file", "peers_dir"):
        path = getattr(m, field)
        if path is not None and not os.path.exists(path):
            add(("messaging", field), f"not found: {path} (make a key pair with `mgms keys`)")
    for i, path in enumerate(m.peer_files):
        problem = file_problem(path)
        if problem is not None:
            add(("messaging", "peer_files", i), problem)
    if not m.transports:
        add(("messaging", "transports"), f"name at least one transport: {', '.join(TRANSPORT_SETTINGS)}")
    for name, raw in m.transports.items():
        if name not in TRANSPORT_SETTINGS:
            add(
                ("messaging", "transports", name),
                f"unknown transport {name!r}{_suggest(name, TRANSPORT_SETTINGS)};"
                f" known: {', '.join(TRANSPORT_SETTINGS)}",
            )
            continue
        try:
            transport_settings_model(name).model_validate({**raw, "participant": m.participant})
        except ValidationError as exc:
            for err in exc.errors():
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown key"
                add(("messaging", "transports", name, *err["loc"]), msg)
    for peer, transport in m.routes.items():
        if transport not in m.transports:
            add(
                ("messaging", "routes", peer),
                f"no transport {transport!r} configured{_suggest(transport, m.transports)}",
            )
    if m.default_transport is not None and m.default_transport not in m.transports:
        add(("messaging", "default_transport"), f"no transport {m.default_transport!r} configured")


def _check_flexibility(cfg: LabConfig, add: Any) -> None:
    f = cfg.flexibility
    if f is None:
        return
    if cfg.messaging is None:
        add(("flexibility",), "needs a messaging block (how to reach the aggregator)")
    points = {p.name: p for p in cfg.points}
    for i, res in enumerate(f.resources):
        pp = points.get(res.power_point)
        if pp is None:
            add(
                ("flexibility", "resources", i, "power_point"),
                f"unknown point {res.power_point!r}{_suggest(res.power_point, points)}",
            )
        elif pp.unit not in ("W", "kW", "MW") or pp.direction is not Direction.MONITOR:
            add(
                ("flexibility", "resources", i, "power_point"),
                f"{pp.name!r} is not a monitored active power point (W, kW, MW)",
            )
        for group in ("activate", "restore"):
            for j, action in enumerate(getattr(res, group)):
                cp = points.get(action.point)
                if cp is None:
                    add(
                        ("flexibility", "resources", i, group, j, "point"),
                        f"unknown point {action.point!r}{_suggest(action.point, points)}",
                    )
                elif cp.direction is not Direction.CONTROL:
                    add(("flexibility", "resources", i, group, j, "point"), f"{cp.name!r} is not a control point")
