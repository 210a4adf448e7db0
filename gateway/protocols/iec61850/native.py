"""ctypes view of the libiec61850 shared object that pyiec61850-ng bundles.

Why not the SWIG wrappers: report and control callbacks run on libiec61850's own threads and
need the GIL, while most SWIG wrappers (``ControlObjectClient_operate``, browse calls,
``IedServer_update*``) keep the GIL during a blocking C call. A Python thread calling one of
them while a report arrives can hang forever (measured, see docs/protocol-notes.md).
ctypes releases the GIL around every foreign call and takes it in every callback, so all
libiec61850 calls of the adapter and the simulator go through this module, and ownership is
plain C: whatever a function returns that the caller owns is freed here explicitly.

Only ``gateway/protocols/iec61850`` and ``gateway/iedsim/iec61850`` import this module.
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import c_bool, c_char_p, c_float, c_int, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p
from typing import Any

__all__ = [
    "FC",
    "IED_ERRORS",
    "CommandTermHandler",
    "ConnectionClosedHandler",
    "ControlHandler",
    "LastApplError",
    "PerformCheckHandler",
    "ReportHandler",
    "lib",
]

#: Functional constraints by name (libiec61850 FunctionalConstraint enum).
FC = {"ST": 0, "MX": 1, "SP": 2, "SV": 3, "CF": 4, "DC": 5, "SG": 6, "SE": 7, "SR": 8, "OR": 9, "BL": 10,
      "EX": 11, "CO": 12, "US": 13, "MS": 14, "RP": 15, "BR": 16, "LG": 17, "GO": 18}

#: IedClientError values worth a name in a log line.
IED_ERRORS = {
    0: "ok", 1: "not connected", 2: "already connected", 3: "connection lost", 4: "service not supported",
    5: "connection rejected", 6: "outstanding call limit", 10: "invalid argument", 11: "enable report failed:"
    " data set mismatch", 20: "timeout", 21: "access denied", 22: "object does not exist", 23: "object exists",
    24: "object access unsupported", 25: "type inconsistent", 26: "temporarily unavailable", 27: "object undefined",
    28: "invalid address", 29: "hardware fault", 30: "type unsupported", 31: "object attribute inconsistent",
    32: "object value invalid", 33: "object invalidated", 34: "malformed message", 98: "service not implemented",
    99: "unknown",
}


class LastApplError(ctypes.Structure):
    """``LastApplError`` returned by value from ``ControlObjectClient_getLastApplError``."""

    _fields_ = [("ctlNum", c_int), ("error", c_int), ("addCause", c_int)]


ReportHandler = ctypes.CFUNCTYPE(None, c_void_p, c_void_p)
ConnectionClosedHandler = ctypes.CFUNCTYPE(None, c_void_p, c_void_p)
CommandTermHandler = ctypes.CFUNCTYPE(None, c_void_p, c_void_p)
ControlHandler = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p, c_bool)
PerformCheckHandler = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p, c_bool, c_bool)

P = c_void_p
_SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    # client connection
    "IedConnection_create": (P, ()),
    "IedConnection_destroy": (None, (P,)),
    "IedConnection_connect": (None, (P, P, c_char_p, c_int)),
    "IedConnection_close": (None, (P,)),
    "IedConnection_abort": (None, (P, P)),
    "IedConnection_getState": (c_int, (P,)),
    "IedConnection_setConnectTimeout": (None, (P, c_uint32)),
    "IedConnection_setRequestTimeout": (None, (P, c_uint32)),
    "IedConnection_installConnectionClosedHandler": (None, (P, ConnectionClosedHandler, P)),
    "IedConnection_readObject": (P, (P, P, c_char_p, c_int)),
    "IedConnection_getLogicalDeviceVariables": (P, (P, P, c_char_p)),
    "IedConnection_getLogicalDeviceList": (P, (P, P)),
    # reports
    "IedConnection_getRCBValues": (P, (P, P, c_char_p, P)),
    "IedConnection_setRCBValues": (None, (P, P, P, c_uint32, c_bool)),
    "IedConnection_installReportHandler": (None, (P, c_char_p, c_char_p, ReportHandler, P)),
    "IedConnection_uninstallReportHandler": (None, (P, c_char_p)),
    "ClientReportControlBlock_destroy": (None, (P,)),
    "ClientReportControlBlock_isBuffered": (c_bool, (P,)),
    "ClientReportControlBlock_getRptId": (c_char_p, (P,)),
    "ClientReportControlBlock_getDataSetReference": (c_char_p, (P,)),
    "ClientReportControlBlock_setRptEna": (None, (P, c_bool)),
    "ClientReportControlBlock_setGI": (None, (P, c_bool)),
    "ClientReportControlBlock_setTrgOps": (None, (P, c_int)),
    "ClientReportControlBlock_setOptFlds": (None, (P, c_int)),
    "ClientReportControlBlock_setIntgPd": (None, (P, c_uint32)),
    "ClientReportControlBlock_setEntryId": (None, (P, P)),
    "ClientReportControlBlock_setPurgeBuf": (None, (P, c_bool)),
    "ClientReportControlBlock_setResvTms": (None, (P, ctypes.c_int16)),
    "ClientReport_getDataSetValues": (P, (P,)),
    "ClientReport_getReasonForInclusion": (c_int, (P, c_int)),
    "ClientReport_getEntryId": (P, (P,)),
    "ClientReport_hasTimestamp": (c_bool, (P,)),
    "ClientReport_getTimestamp": (c_uint64, (P,)),
    "ClientReport_getRcbReference": (c_char_p, (P,)),
    # data set directory of the server (browse)
    "IedConnection_getDataSetDirectory": (P, (P, P, c_char_p, P)),
    # controls
    "ControlObjectClient_create": (P, (c_char_p, P)),
    "ControlObjectClient_destroy": (None, (P,)),
    "ControlObjectClient_getControlModel": (c_int, (P,)),
    "ControlObjectClient_setOrigin": (None, (P, c_char_p, c_int)),
    "ControlObjectClient_setInterlockCheck": (None, (P, c_bool)),
    "ControlObjectClient_select": (c_bool, (P,)),
    "ControlObjectClient_selectWithValue": (c_bool, (P, P)),
    "ControlObjectClient_operate": (c_bool, (P, P, c_uint64)),
    "ControlObjectClient_getLastApplError": (LastApplError, (P,)),
    "ControlObjectClient_getLastError": (c_int, (P,)),
    "ControlObjectClient_setCommandTerminationHandler": (None, (P, CommandTermHandler, P)),
    # values
    "MmsValue_getType": (c_int, (P,)),
    "MmsValue_getArraySize": (c_uint32, (P,)),
    "MmsValue_getElement": (P, (P, c_int)),
    "MmsValue_toFloat": (c_float, (P,)),
    "MmsValue_toDouble": (ctypes.c_double, (P,)),
    "MmsValue_toInt64": (ctypes.c_int64, (P,)),
    "MmsValue_toUint32": (c_uint32, (P,)),
    "MmsValue_getBoolean": (c_bool, (P,)),
    "MmsValue_getBitStringSize": (c_int, (P,)),
    "MmsValue_getUtcTimeInMs": (c_uint64, (P,)),
    "MmsValue_getOctetStringSize": (c_int, (P,)),
    "MmsValue_getOctetStringBuffer": (P, (P,)),
    "MmsValue_newOctetString": (P, (c_int, c_int)),
    "MmsValue_setOctetString": (None, (P, ctypes.c_char_p, c_int)),
    "MmsValue_newBoolean": (P, (c_bool,)),
    "MmsValue_newFloat": (P, (c_float,)),
    "MmsValue_newIntegerFromInt32": (P, (ctypes.c_int32,)),
    "MmsValue_newUnsignedFromUint32": (P, (c_uint32,)),
    "MmsValue_newVisibleString": (P, (c_char_p,)),
    "MmsValue_delete": (None, (P,)),
    "Quality_fromMmsValue": (c_uint16, (P,)),
    "Dbpos_fromMmsValue": (c_int, (P,)),
    "LinkedList_getNext": (P, (P,)),
    "LinkedList_destroy": (None, (P,)),
    # server model
    "IedModel_create": (P, (c_char_p,)),
    "IedModel_destroy": (None, (P,)),
    "IedModel_getModelNodeByObjectReference": (P, (P, c_char_p)),
    "LogicalDevice_create": (P, (c_char_p, P)),
    "LogicalNode_create": (P, (c_char_p, P)),
    "CDC_MV_create": (P, (c_char_p, P, c_uint32, c_bool)),
    "CDC_WYE_create": (P, (c_char_p, P, c_uint32)),
    "CDC_DPC_create": (P, (c_char_p, P, c_uint32, c_uint32)),
    "CDC_SPS_create": (P, (c_char_p, P, c_uint32)),
    "CDC_ENS_create": (P, (c_char_p, P, c_uint32)),
    "CDC_ENC_create": (P, (c_char_p, P, c_uint32, c_uint32)),
    "CDC_APC_create": (P, (c_char_p, P, c_uint32, c_uint32, c_bool)),
    "DataObject_create": (P, (c_char_p, P, c_int)),
    "DataAttribute_create": (P, (c_char_p, P, c_int, c_int, c_uint8, c_int, c_uint32)),
    "DataAttribute_setValue": (None, (P, P)),
    "DataSet_create": (P, (c_char_p, P)),
    "DataSetEntry_create": (P, (P, c_char_p, c_int, c_char_p)),
    "ReportControlBlock_create": (P, (c_char_p, P, c_char_p, c_bool, c_char_p, c_uint32, c_uint8, c_uint8, c_uint32,
                                      c_uint32)),
    # server
    "IedServer_create": (P, (P,)),
    "IedServer_destroy": (None, (P,)),
    "IedServer_start": (None, (P, c_int)),
    "IedServer_startThreadless": (None, (P, c_int)),
    "IedServer_stopThreadless": (None, (P,)),
    "IedServer_processIncomingData": (None, (P,)),
    "IedServer_performPeriodicTasks": (None, (P,)),
    "IedServer_stop": (None, (P,)),
    "IedServer_isRunning": (c_bool, (P,)),
    "IedServer_setLocalIpAddress": (None, (P, c_char_p)),
    "IedServer_lockDataModel": (None, (P,)),
    "IedServer_unlockDataModel": (None, (P,)),
    "IedServer_updateFloatAttributeValue": (None, (P, P, c_float)),
    "IedServer_updateInt32AttributeValue": (None, (P, P, c_int)),
    "IedServer_updateBooleanAttributeValue": (None, (P, P, c_bool)),
    "IedServer_updateDbposValue": (None, (P, P, c_int)),
    "IedServer_updateUTCTimeAttributeValue": (None, (P, P, c_uint64)),
    "IedServer_updateQuality": (None, (P, P, c_uint16)),
    "IedServer_updateCtlModel": (None, (P, P, c_int)),
    "IedServer_setControlHandler": (None, (P, P, ControlHandler, P)),
    "IedServer_setPerformCheckHandler": (None, (P, P, PerformCheckHandler, P)),
    "IedServer_getNumberOfOpenConnections": (c_int, (P,)),
    "ControlAction_setAddCause": (None, (P, c_int)),
    "ControlAction_isSelect": (c_bool, (P,)),
    "ControlAction_getOrIdent": (P, (P,)),
    # TLS (libiec61850's own mbedtls; see tls.py)
    "TLSConfiguration_create": (P, ()),
    "TLSConfiguration_destroy": (None, (P,)),
    "TLSConfiguration_setClientMode": (None, (P,)),
    "TLSConfiguration_setOwnCertificateFromFile": (c_bool, (P, c_char_p)),
    "TLSConfiguration_setOwnKeyFromFile": (c_bool, (P, c_char_p, c_char_p)),
    "TLSConfiguration_addCACertificateFromFile": (c_bool, (P, c_char_p)),
    "TLSConfiguration_setChainValidation": (None, (P, c_bool)),
    "TLSConfiguration_setAllowOnlyKnownCertificates": (None, (P, c_bool)),
    "TLSConfiguration_setMinTlsVersion": (None, (P, c_int)),
    "IedConnection_createWithTlsSupport": (P, (P,)),
    "IedServer_createWithTlsSupport": (P, (P, P)),
    "LibIEC61850_getVersionString": (c_char_p, ()),
}


@functools.cache
def _load() -> ctypes.CDLL:
    import pyiec61850.pyiec61850 as swig  # the wheel ships libiec61850 inside its extension module

    so = ctypes.CDLL(swig._pyiec61850.__file__)
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(so, name)
        fn.restype = restype
        fn.argtypes = list(argtypes)
    return so


class _Lib:
    """Attribute access loads the shared object once and returns the typed C function."""

    def __getattr__(self, name: str) -> Any:
        if name not in _SIGNATURES:
            raise AttributeError(f"{name} has no declared signature in gateway.protocols.iec61850.native")
        return getattr(_load(), name)


lib: Any = _Lib()


def linked_strings(head: int | None) -> list[str]:
    """The strings of a libiec61850 ``LinkedList`` of ``char*``; frees the list."""
    out: list[str] = []
    if not head:
        return out
    node = lib.LinkedList_getNext(head)
    while node:
        data = ctypes.cast(node, ctypes.POINTER(c_void_p))[0]
        if data:
            out.append(ctypes.string_at(data).decode("utf-8", "replace"))
        node = lib.LinkedList_getNext(node)
    lib.LinkedList_destroy(head)
    return out


def octets(value: int | None) -> bytes:
    """Bytes of an MMS octet string (e.g. a report's EntryID); b'' for NULL."""
    if not value:
        return b""
    size = lib.MmsValue_getOctetStringSize(value)
    buf = lib.MmsValue_getOctetStringBuffer(value)
    return ctypes.string_at(buf, size) if buf and size > 0 else b""
