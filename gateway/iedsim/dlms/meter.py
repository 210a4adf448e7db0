"""The COSEM application of a simulated meter: association, GET, ACTION, RELEASE, security.

Pure functions of bytes in, bytes out (no sockets): :class:`MeterApplication` holds the
object model and :class:`Association` the state of one client association. The network
listener (:mod:`.server`) only frames and unframes.

Why not gurux's ``GXDLMSServer``: in gurux-dlms 1.0.203 the Python server side is unfinished
(missing methods, AARE/RLRE mis-encoded, the secure server never encrypts, the invocation
counter restarts at 0 on every association, which reuses AES-GCM nonces). The part of the
server a meter simulator needs is small and fully specified by the Green Book, so it is
written here against the standard and checked with gurux's *client* (and dlms-cosem).

Security: ``none`` (lowest), ``low`` (password in the AARQ) and ``high_gmac`` (HLS
mechanism 5, security suite 0): the AARQ/AARE user information and every APDU after it are
glo-ciphered with security control 0x10 (authenticated, not encrypted), tags computed with
``cryptography``'s AES-GCM. The meter's invocation counter lives in the meter, not in the
association, so it only grows, across associations and simulated restarts; the client's
counter must grow too (a replayed APDU is refused).
"""

from __future__ import annotations

import hmac
import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config import Device, DlmsAddress, Point
from gateway.iedsim.dlms.axdr import (
    AxdrError,
    Enum,
    Structure,
    Typed,
    decode,
    encode,
    encode_length,
    from_cosem_datetime,
    read_length,
    to_cosem_datetime,
)
from gateway.iedsim.dynamics import UNIT_FACTORS

log = logging.getLogger(__name__)

__all__ = ["Association", "MeterApplication", "ProfileRow", "obis_bytes"]

# DLMS unit codes and scalers per quantity: the meter keeps integers, as real meters do.
_REGISTER_FORMAT: dict[str, tuple[int, int]] = {  # quantity -> (scaler, unit code)
    "voltage": (-2, 35),
    "current": (-3, 33),
    "active_power": (0, 27),
    "reactive_power": (0, 29),
    "apparent_power": (0, 28),
    "power_factor": (-3, 255),
    "frequency": (-3, 44),
    "active_energy": (0, 30),
    "reactive_energy": (0, 32),
}
# DLMS unit code -> SI factor of the unit, for the simulator's SI state
_SI_BASE = {35: 1.0, 33: 1.0, 27: 1.0, 29: 1.0, 28: 1.0, 30: 1.0, 32: 1.0, 44: 1.0, 255: 1.0}

CLASS_DATA, CLASS_REGISTER, CLASS_EXT_REGISTER, CLASS_PROFILE, CLASS_CLOCK, CLASS_ASSOCIATION_LN = 1, 3, 4, 7, 8, 15
ASSOCIATION_OBIS = bytes([0, 0, 40, 0, 0, 255])

# Data-Access-Result (Green Book)
DAR_HARDWARE_FAULT = 1
DAR_READ_WRITE_DENIED = 3
DAR_OBJECT_UNDEFINED = 4
DAR_OBJECT_CLASS_INCONSISTENT = 9
DAR_OBJECT_UNAVAILABLE = 11
DAR_SCOPE_OF_ACCESS_VIOLATED = 13
DAR_OTHER = 250

# AARE result-source-diagnostic (acse-service-user)
DIAG_NULL = 0
DIAG_CALLING_AP_TITLE_NOT_RECOGNISED = 3
DIAG_MECHANISM_NOT_RECOGNISED = 11
DIAG_MECHANISM_REQUIRED = 12
DIAG_AUTHENTICATION_FAILURE = 13
DIAG_AUTHENTICATION_REQUIRED = 14

MECHANISMS = {"none": 0, "low": 1, "high_gmac": 5}
SC_AUTHENTICATED = 0x10

# xDLMS APDU tags
AARQ, AARE, RLRQ, RLRE = 0x60, 0x61, 0x62, 0x63
GET_REQUEST, SET_REQUEST, ACTION_REQUEST = 0xC0, 0xC1, 0xC3
GET_RESPONSE, ACTION_RESPONSE = 0xC4, 0xC7
GLO_OFFSET = 8  # glo-get-request 0xC8 = get-request 0xC0 + 8, responses likewise
INITIATE_REQUEST, GLO_INITIATE_REQUEST, GLO_INITIATE_RESPONSE = 0x01, 0x21, 0x28
EXCEPTION_RESPONSE = 0xD8
GENERAL_GLO_CIPHERING = 0xDB
CONFORMANCE_SUPPORTED = 0x00181D  # get, action, selective access, block transfer with get, ...


def obis_bytes(obis: str) -> bytes:
    return bytes(int(p) for p in obis.split("."))


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(content)) + content


class ProtocolViolation(ValueError):
    """The client sent something that is not a valid request; the association is dropped."""


SC_AUTHENTICATED_ENCRYPTED = 0x30


def gmac_tag(key: bytes, system_title: bytes, counter: int, auth_key: bytes, data: bytes) -> bytes:
    """DLMS suite 0 authentication tag: GMAC over SC || AK || data, 12 octets."""
    nonce = system_title + counter.to_bytes(4, "big")
    return AESGCM(key).encrypt(nonce, b"", bytes([SC_AUTHENTICATED]) + auth_key + data)[:12]


def gcm_encrypt(key: bytes, system_title: bytes, counter: int, auth_key: bytes, plain: bytes) -> bytes:
    """Suite 0 authenticated encryption (SC 0x30): ciphertext || 12-octet tag, AAD = SC || AK."""
    nonce = system_title + counter.to_bytes(4, "big")
    out = AESGCM(key).encrypt(nonce, plain, bytes([SC_AUTHENTICATED_ENCRYPTED]) + auth_key)
    return out[:-16] + out[-16:-4]


def gcm_decrypt(key: bytes, system_title: bytes, counter: int, auth_key: bytes, data: bytes) -> bytes:
    """Inverse of :func:`gcm_encrypt`; ValueError when the tag does not verify."""
    nonce = system_title + counter.to_bytes(4, "big")
    ciphertext, tag = data[:-12], data[-12:]
    dec = Cipher(algorithms.AES(key), modes.GCM(nonce, tag, min_tag_length=12)).decryptor()
    dec.authenticate_additional_data(bytes([SC_AUTHENTICATED_ENCRYPTED]) + auth_key)
    try:
        return dec.update(ciphertext) + dec.finalize()
    except InvalidTag:
        raise ValueError("authentication tag wrong") from None


@dataclass(frozen=True, slots=True)
class ProfileRow:
    time: float
    values: tuple[int, ...]


@dataclass
class Association:
    """State of one client association (one TCP connection)."""

    client_sap: int
    associated: bool = False
    authenticated: bool = False  # HLS pass 3/4 done (or not needed)
    ciphered: bool = False
    security_control: int = SC_AUTHENTICATED  # the client's choice (0x10 or 0x30), mirrored
    client_title: bytes = b""
    stoc: bytes = b""
    ctos: bytes = b""
    max_pdu: int = 0xFFFF


@dataclass
class _Register:
    point: Point
    address: DlmsAddress
    scaler: int
    unit: int


@dataclass
class MeterStats:
    counters: Counter[str] = field(default_factory=Counter)


class MeterApplication:
    """The meter's object model and its answers to xDLMS APDUs.

    ``values`` gives the current engineering value of a point (the shared FeederModel);
    ``clock`` the meter's time (the host clock plus an adjustable drift).
    """

    def __init__(
        self,
        device: Device,
        points: Sequence[Point],
        values: Callable[[str], float],
        clock: Callable[[], float],
        *,
        server_title: bytes = b"MGS\x00\x00\x00\x00\x01",
    ) -> None:
        self.device = device
        self.settings = device.dlms
        self._values = values
        self._clock = clock
        self.server_title = server_title
        self.counters: Counter[str] = Counter()
        self.invocation_counter = 1  # meter's own, monotonic over its life
        self.client_counters: dict[bytes, int] = {}
        self._registers: dict[tuple[bytes, int], _Register] = {}
        for p in points:
            addr = p.address
            if not isinstance(addr, DlmsAddress):
                continue
            scaler, unit = _REGISTER_FORMAT.get(p.quantity, (0, 255))
            self._registers[(obis_bytes(addr.obis), addr.class_id)] = _Register(p, addr, scaler, unit)
        self.clock_obis = obis_bytes(self.settings.clock_obis) if self.settings.clock_obis else None
        lp = self.settings.load_profile
        self.profile_obis = obis_bytes(lp.obis) if lp is not None else None
        self.profile: deque[ProfileRow] = deque(maxlen=lp.depth if lp is not None else 1)
        self.profile_columns = [r for r in self._registers.values() if r.point.quantity.endswith("_energy")]
        self.rows_served = 0
        self._password = self.settings.secret("password") if self.settings.security == "low" else None
        self._ek = self._ak = b""
        if self.settings.security == "high_gmac":
            self._ek = bytes.fromhex(self.settings.secret("block_cipher_key") or "")
            self._ak = bytes.fromhex(self.settings.secret("authentication_key") or "")

    # -- values ------------------------------------------------------------------------

    def raw_value(self, reg: _Register) -> int:
        """The register's integer value: engineering value -> SI -> meter unit / 10^scaler."""
        eng = self._values(reg.point.name)
        si = eng * UNIT_FACTORS.get(reg.point.unit, 1.0)
        return round(si / _SI_BASE.get(reg.unit, 1.0) / (10.0**reg.scaler))

    def capture(self, t: float) -> None:
        """Append one load-profile row (the clock and every energy register) at time ``t``."""
        self.profile.append(ProfileRow(t, tuple(self.raw_value(r) for r in self.profile_columns)))
        self.counters["rows_captured"] += 1

    # -- association -------------------------------------------------------------------

    def handle(self, assoc: Association, apdu: bytes) -> bytes | None:
        """One request APDU -> the reply APDU (None: nothing to send, e.g. undecodable noise).

        Raises :class:`ProtocolViolation` for an APDU it cannot parse (the A-XDR/BER errors
        of any field included), which drops the client.
        """
        try:
            return self._handle(assoc, apdu)
        except AxdrError as exc:  # a length or value inside a field the parser did not wrap
            raise ProtocolViolation(f"APDU {apdu[:1].hex()}: {exc}") from exc

    def _handle(self, assoc: Association, apdu: bytes) -> bytes | None:
        if not apdu:
            raise ProtocolViolation("empty APDU")
        tag = apdu[0]
        self.counters["requests"] += 1
        if tag == AARQ:
            return self._aarq(assoc, apdu)
        if tag == RLRQ:
            assoc.associated = assoc.authenticated = False
            return bytes([RLRE, 0x03, 0x80, 0x01, 0x00])
        if not assoc.associated:
            raise ProtocolViolation(f"APDU {tag:#x} outside an association")
        if assoc.ciphered:
            if tag == GENERAL_GLO_CIPHERING:
                # system title inside the APDU (dlms-cosem uses it, e.g. for HLS pass 3)
                n = apdu[1] if len(apdu) > 1 else 0
                # [DB, n, title(n), length, content]: from the title's last octet on, the
                # layout is that of a glo APDU (one tag octet, then length and content)
                plain = self._unprotect(assoc, apdu[1 + n :])
                reply = self._dispatch(assoc, plain)
                inner = self._protect(assoc, reply, 0)[1:]  # drop the placeholder tag, keep length
                return bytes([GENERAL_GLO_CIPHERING, len(self.server_title)]) + self.server_title + inner
            if tag not in (GET_REQUEST + GLO_OFFSET, ACTION_REQUEST + GLO_OFFSET):
                self.counters["unprotected_refused"] += 1
                return bytes([EXCEPTION_RESPONSE, 0x01, 0x02])  # service-not-allowed
            plain = self._unprotect(assoc, apdu)
            reply = self._dispatch(assoc, plain)
            return self._protect(assoc, reply, reply[0] + GLO_OFFSET)
        return self._dispatch(assoc, apdu)

    def _dispatch(self, assoc: Association, apdu: bytes) -> bytes:
        tag = apdu[0]
        if tag == GET_REQUEST and len(apdu) >= 3 and apdu[1] == 0x01:
            return self._get(assoc, apdu)
        if tag == ACTION_REQUEST and len(apdu) >= 3 and apdu[1] == 0x01:
            return self._action(assoc, apdu)
        self.counters["unsupported_requests"] += 1
        return bytes([EXCEPTION_RESPONSE, 0x01, 0x02])

    def _aarq(self, assoc: Association, apdu: bytes) -> bytes:
        fields = _parse_ber(apdu)
        context = fields.get(0xA1, b"")[-1:] or b"\x01"
        mech = (fields.get(0x8B) or b"\x00")[-1]  # an empty mechanism name is "none" too
        auth_value = fields.get(0xAC, b"")
        if auth_value[:1] == b"\x80":
            n, pos = read_length(auth_value, 1)
            auth_value = auth_value[pos : pos + n]
        title = fields.get(0xA6, b"")
        if title[:1] == b"\x04":
            title = title[2:]
        user = fields.get(0xBE, b"")
        if user[:1] != b"\x04":
            raise ProtocolViolation("AARQ without xDLMS initiate request")
        n, pos = read_length(user, 1)
        initiate = user[pos : pos + n]
        wanted = MECHANISMS[self.settings.security]
        if mech != wanted:
            self.counters["associations_refused"] += 1
            diag = DIAG_MECHANISM_REQUIRED if mech == 0 else DIAG_MECHANISM_NOT_RECOGNISED
            return self._aare(context, 1, diag)
        if wanted == 1 and not hmac.compare_digest(auth_value, (self._password or "").encode()):
            self.counters["associations_refused"] += 1
            self.counters["wrong_password"] += 1
            return self._aare(context, 1, DIAG_AUTHENTICATION_FAILURE)
        if wanted == 5:
            if len(title) != 8:  # the GCM nonce is system title (8 octets) + invocation counter
                self.counters["associations_refused"] += 1
                return self._aare(context, 1, DIAG_CALLING_AP_TITLE_NOT_RECOGNISED)
            assoc.client_title = bytes(title)
            assoc.ctos = bytes(auth_value)
            assoc.ciphered = True
            if initiate[:1] == bytes([GLO_INITIATE_REQUEST]):
                try:
                    initiate = self._unprotect(assoc, initiate)
                except ProtocolViolation:
                    self.counters["associations_refused"] += 1
                    self.counters["bad_key"] += 1
                    return self._aare(context, 1, DIAG_AUTHENTICATION_FAILURE)
        if initiate[:1] != bytes([INITIATE_REQUEST]) or len(initiate) < 12:
            raise ProtocolViolation("bad xDLMS initiate request")
        conformance = int.from_bytes(initiate[-5:-2], "big")
        assoc.max_pdu = int.from_bytes(initiate[-2:], "big") or 0xFFFF
        response = (
            bytes([0x08, 0x00, 0x06, 0x5F, 0x1F, 0x04, 0x00])
            + (conformance & CONFORMANCE_SUPPORTED | 0x001000).to_bytes(3, "big")
            + (0x0400).to_bytes(2, "big")
            + b"\x00\x07"
        )
        assoc.associated = True
        self.counters["associations"] += 1
        if wanted == 5:
            assoc.stoc = os.urandom(16)
            response = self._protect(assoc, response, GLO_INITIATE_RESPONSE)
            return self._aare(context, 0, DIAG_AUTHENTICATION_REQUIRED, response, mech=5, stoc=assoc.stoc)
        assoc.authenticated = True
        return self._aare(context, 0, DIAG_NULL, response, mech=wanted if wanted else None)

    def _aare(
        self,
        context: bytes,
        result: int,
        diag: int,
        user: bytes | None = None,
        *,
        mech: int | None = None,
        stoc: bytes | None = None,
    ) -> bytes:
        body = _tlv(0xA1, _tlv(0x06, bytes([0x60, 0x85, 0x74, 0x05, 0x08, 0x01]) + context))
        body += _tlv(0xA2, bytes([0x02, 0x01, result]))
        body += _tlv(0xA3, _tlv(0xA1, bytes([0x02, 0x01, diag])))
        if stoc is not None:
            body += _tlv(0xA4, _tlv(0x04, self.server_title))
        if mech:
            body += bytes([0x88, 0x02, 0x07, 0x80])
            body += _tlv(0x89, bytes([0x60, 0x85, 0x74, 0x05, 0x08, 0x02, mech]))
        if stoc is not None:
            body += _tlv(0xAA, _tlv(0x80, stoc))
        if user is None:  # refused: confirmed-service-error (initiate, other)
            user = bytes([0x0E, 0x01, 0x06, 0x00])
        body += _tlv(0xBE, _tlv(0x04, user))
        return _tlv(AARE, body)

    # -- ciphering -----------------------------------------------------------------------

    def _protect(self, assoc: Association, apdu: bytes, tag: int) -> bytes:
        self.invocation_counter += 1
        ic = self.invocation_counter
        sc = assoc.security_control
        if sc == SC_AUTHENTICATED_ENCRYPTED:
            body = gcm_encrypt(self._ek, self.server_title, ic, self._ak, apdu)
        else:
            body = apdu + gmac_tag(self._ek, self.server_title, ic, self._ak, apdu)
        content = bytes([sc]) + ic.to_bytes(4, "big") + body
        return bytes([tag]) + encode_length(len(content)) + content

    def _unprotect(self, assoc: Association, apdu: bytes) -> bytes:
        try:
            n, pos = read_length(apdu, 1)
        except AxdrError as exc:
            raise ProtocolViolation(str(exc)) from exc
        content = apdu[pos : pos + n]
        if len(content) < 17 or content[0] not in (SC_AUTHENTICATED, SC_AUTHENTICATED_ENCRYPTED):
            raise ProtocolViolation("unsupported security control (0x10 or 0x30, suite 0)")
        sc = content[0]
        ic = int.from_bytes(content[1:5], "big")
        if sc == SC_AUTHENTICATED_ENCRYPTED:
            try:
                data = gcm_decrypt(self._ek, assoc.client_title, ic, self._ak, content[5:])
            except ValueError:
                self.counters["bad_tags"] += 1
                raise ProtocolViolation("authentication tag wrong (wrong key?)") from None
        else:
            data, mac = content[5:-12], content[-12:]
            if not hmac.compare_digest(mac, gmac_tag(self._ek, assoc.client_title, ic, self._ak, data)):
                self.counters["bad_tags"] += 1
                raise ProtocolViolation("authentication tag wrong (wrong key?)")
        assoc.security_control = sc
        last = self.client_counters.get(assoc.client_title, -1)
        if ic <= last:
            self.counters["replays_refused"] += 1
            raise ProtocolViolation(f"invocation counter {ic} not above {last} (replay)")
        self.client_counters[assoc.client_title] = ic
        return bytes(data)

    # -- services ------------------------------------------------------------------------

    def _action(self, assoc: Association, apdu: bytes) -> bytes:
        if len(apdu) < 12:
            raise ProtocolViolation("ACTION request too short")
        iip = apdu[2]
        class_id = int.from_bytes(apdu[3:5], "big")
        obis, method = apdu[5:11], apdu[11]
        params = None
        if len(apdu) > 12 and apdu[12]:
            try:
                params, _ = decode(apdu, 13)
            except AxdrError as exc:
                raise ProtocolViolation(f"ACTION parameters: {exc}") from exc
        if (class_id, obis, method) != (CLASS_ASSOCIATION_LN, ASSOCIATION_OBIS, 1) or not assoc.ciphered:
            return bytes([ACTION_RESPONSE, 0x01, iip, 0x0B, 0x00])  # object-unavailable
        # HLS pass 3: f(StoC) = SC || IC || GMAC(SC || AK || StoC) from the client
        if not isinstance(params, bytes) or len(params) != 17 or params[0] != SC_AUTHENTICATED:
            return bytes([ACTION_RESPONSE, 0x01, iip, 0x03, 0x00])
        ic = int.from_bytes(params[1:5], "big")
        if not hmac.compare_digest(params[5:], gmac_tag(self._ek, assoc.client_title, ic, self._ak, assoc.stoc)):
            self.counters["hls_failed"] += 1
            return bytes([ACTION_RESPONSE, 0x01, iip, 0x03, 0x00])  # read-write-denied
        assoc.authenticated = True
        self.counters["hls_passed"] += 1
        self.invocation_counter += 1
        ic = self.invocation_counter
        f_ctos = bytes([SC_AUTHENTICATED]) + ic.to_bytes(4, "big")
        f_ctos += gmac_tag(self._ek, self.server_title, ic, self._ak, assoc.ctos)
        return bytes([ACTION_RESPONSE, 0x01, iip, 0x00, 0x01, 0x00]) + encode(f_ctos)

    def _get(self, assoc: Association, apdu: bytes) -> bytes:
        if len(apdu) < 13:
            raise ProtocolViolation("GET request too short")
        iip = apdu[2]
        class_id = int.from_bytes(apdu[3:5], "big")
        obis, attr = bytes(apdu[5:11]), apdu[11]
        selector, params = 0, None
        if apdu[12]:
            if len(apdu) < 15:
                raise ProtocolViolation("selective access without selector and parameters")
            selector = apdu[13]
            try:
                params, _ = decode(apdu, 14)
            except AxdrError as exc:
                raise ProtocolViolation(f"selective access parameters: {exc}") from exc
        head = bytes([GET_RESPONSE, 0x01, iip])
        if not assoc.authenticated:
            self.counters["denied_before_hls"] += 1
            return head + bytes([0x01, DAR_READ_WRITE_DENIED])
        try:
            data = self._attribute(class_id, obis, attr, selector, params)
        except _Dar as dar:
            self.counters[f"dar_{dar.code}"] += 1
            return head + bytes([0x01, dar.code])
        self.counters["gets"] += 1
        return head + b"\x00" + data

    def _attribute(self, class_id: int, obis: bytes, attr: int, selector: int, params: object) -> bytes:
        if attr == 1:
            return encode(obis)
        if obis == self.clock_obis:
            if class_id != CLASS_CLOCK:
                raise _Dar(DAR_OBJECT_CLASS_INCONSISTENT)
            if attr == 2:
                return encode(to_cosem_datetime(self._clock()))
            if attr == 3:
                return encode(Typed(0x10, 0))  # time zone
            raise _Dar(DAR_OBJECT_UNAVAILABLE)
        if obis == self.profile_obis:
            if class_id != CLASS_PROFILE:
                raise _Dar(DAR_OBJECT_CLASS_INCONSISTENT)
            return self._profile_attribute(attr, selector, params)
        if obis == ASSOCIATION_OBIS and class_id == CLASS_ASSOCIATION_LN:
            raise _Dar(DAR_READ_WRITE_DENIED)
        for cid in (CLASS_REGISTER, CLASS_EXT_REGISTER, CLASS_DATA):
            reg = self._registers.get((obis, cid))
            if reg is None:
                continue
            if cid != class_id:
                raise _Dar(DAR_OBJECT_CLASS_INCONSISTENT)
            if attr == 2:
                return encode(self.raw_value(reg))
            if attr == 3 and cid != CLASS_DATA:
                return encode(Structure((Typed(0x0F, reg.scaler), Enum(reg.unit))))
            if attr == 5 and cid == CLASS_EXT_REGISTER:
                return encode(to_cosem_datetime(self._clock()))
            raise _Dar(DAR_OBJECT_UNAVAILABLE)
        raise _Dar(DAR_OBJECT_UNDEFINED)

    def _capture_objects(self) -> list[Structure]:
        clock = self.clock_obis or obis_bytes("0.0.1.0.0.255")
        cols = [Structure((Typed(0x12, CLASS_CLOCK), clock, Typed(0x0F, 2), Typed(0x12, 0)))]
        for r in self.profile_columns:
            cols.append(
                Structure((Typed(0x12, r.address.class_id), obis_bytes(r.address.obis), Typed(0x0F, 2), Typed(0x12, 0)))
            )
        return cols

    def _profile_attribute(self, attr: int, selector: int, params: object) -> bytes:
        lp = self.settings.load_profile
        assert lp is not None
        if attr == 3:
            return encode(self._capture_objects())
        if attr == 4:
            return encode(Typed(0x06, round(lp.capture_period_s)))
        if attr == 7:
            return encode(Typed(0x06, len(self.profile)))
        if attr == 8:
            return encode(Typed(0x06, lp.depth))
        if attr != 2:
            raise _Dar(DAR_OBJECT_UNAVAILABLE)
        rows = list(self.profile)
        if selector == 1:
            if not isinstance(params, Structure) or len(params.items) < 3:
                raise _Dar(DAR_OTHER)
            start, end = (_time_of(v) for v in params.items[1:3])
            rows = [r for r in rows if (start is None or r.time >= start) and (end is None or r.time <= end)]
        elif selector == 2:
            if not isinstance(params, Structure) or len(params.items) < 2:
                raise _Dar(DAR_OTHER)
            first, last = params.items[0], params.items[1]
            if not isinstance(first, int) or not isinstance(last, int):
                raise _Dar(DAR_OTHER)
            rows = rows[max(first - 1, 0) : (last or len(rows))]
        elif selector != 0:
            raise _Dar(DAR_SCOPE_OF_ACCESS_VIOLATED)
        self.rows_served += len(rows)
        self.counters["profile_reads"] += 1
        return encode(
            [Structure((to_cosem_datetime(r.time), *(Typed(0x06, v & 0xFFFFFFFF) for v in r.values))) for r in rows]
        )


class _Dar(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _time_of(value: object) -> float | None:
    if isinstance(value, bytes) and len(value) == 12:
        try:
            return from_cosem_datetime(value)
        except AxdrError:  # a date that does not exist: the client's error, not the meter's
            raise _Dar(DAR_OTHER) from None
    return None


def _parse_ber(apdu: bytes) -> dict[int, bytes]:
    """The first-level TLVs of an AARQ/AARE: tag -> content."""
    try:
        n, pos = read_length(apdu, 1)
        end = min(pos + n, len(apdu))
        out: dict[int, bytes] = {}
        while pos < end:
            tag = apdu[pos]
            n, pos = read_length(apdu, pos + 1)
            content = apdu[pos : pos + n]
            # the application context name wraps one OID TLV: keep the OID
            out[tag] = bytes(content[2:]) if tag == 0xA1 else bytes(content)
            pos += n
        return out
    except AxdrError as exc:
        raise ProtocolViolation(f"AARQ: {exc}") from exc
