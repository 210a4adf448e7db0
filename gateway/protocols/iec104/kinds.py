"""What kind of value an IEC 104 type carries, and which type ids carry each kind.

Why a table of its own: a point is one information object address and one *kind* of value
(a short float, a scaled or normalized measurand, a single or double point, ...), not one
type id. IEC 60870-5-101/104 (7.2.3, the type/cause table) lets an outstation send the same
object untagged in one cause and time-tagged in another, and real ones do exactly that: a
COM600 or REF615 answers a general interrogation (COT 20) with M_ME_NC_1 / M_DP_NA_1 and
reports changes spontaneously with M_ME_TF_1 / M_DP_TB_1. So the receive path of both client
engines accepts a value in any type id of the point's kind, and refuses (counts, logs) one of
another kind; the configured type only says what the simulator sends spontaneously and what
is sent for commands. Both engines and the simulator read this one table.

Every standard monitor type of IEC 60870-5-104 (the CP56Time2a ones; 104 has no CP24 types)
is listed, decodable or not: a type the codec cannot decode yet (step position, bitstring,
integrated totals until the codec learns them) still has its kind here, so adding its layout
to :func:`~gateway.protocols.iec104.codec.decode_monitor` and to the config's
``IEC104_MONITOR_TYPES`` is all it takes for both engines to accept it.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "KIND_OF_TYPE",
    "TYPES_OF_KIND",
    "UNTAGGED_TYPE",
    "ValueKind",
    "is_time_tagged",
    "kind_of",
    "untagged_type",
]


class ValueKind(enum.IntEnum):
    """The information element a type carries; two types of one kind differ only in the
    time tag. Small ints, so the receive loops compare them cheaply."""

    SINGLE = 1  # SIQ
    DOUBLE = 2  # DIQ
    STEP = 3  # VTI + QDS (step position, e.g. a tap changer)
    BITSTRING = 4  # BSI + QDS (32 bits)
    NORMALIZED = 5  # NVA + QDS
    SCALED = 6  # SVA + QDS
    FLOAT = 7  # IEEE 754 short float + QDS
    INTEGRATED_TOTAL = 8  # BCR (counter reading, sequence number, CY/CA/IV)

    @property
    def is_measured(self) -> bool:
        """A number that takes the point's scale and offset (not a state)."""
        return self not in (ValueKind.SINGLE, ValueKind.DOUBLE)


#: type id -> kind, for every standard monitor type of IEC 60870-5-104 (untagged, CP56Time2a)
#: and the command types (what a point configured with a command type carries).
KIND_OF_TYPE: Final[dict[int, ValueKind]] = {
    1: ValueKind.SINGLE,  # M_SP_NA_1
    30: ValueKind.SINGLE,  # M_SP_TB_1
    3: ValueKind.DOUBLE,  # M_DP_NA_1
    31: ValueKind.DOUBLE,  # M_DP_TB_1
    5: ValueKind.STEP,  # M_ST_NA_1
    32: ValueKind.STEP,  # M_ST_TB_1
    7: ValueKind.BITSTRING,  # M_BO_NA_1
    33: ValueKind.BITSTRING,  # M_BO_TB_1
    9: ValueKind.NORMALIZED,  # M_ME_NA_1
    34: ValueKind.NORMALIZED,  # M_ME_TD_1
    11: ValueKind.SCALED,  # M_ME_NB_1
    35: ValueKind.SCALED,  # M_ME_TE_1
    13: ValueKind.FLOAT,  # M_ME_NC_1
    36: ValueKind.FLOAT,  # M_ME_TF_1
    15: ValueKind.INTEGRATED_TOTAL,  # M_IT_NA_1
    37: ValueKind.INTEGRATED_TOTAL,  # M_IT_TB_1
    45: ValueKind.SINGLE,  # C_SC_NA_1
    58: ValueKind.SINGLE,  # C_SC_TA_1
    46: ValueKind.DOUBLE,  # C_DC_NA_1
    59: ValueKind.DOUBLE,  # C_DC_TA_1
    48: ValueKind.NORMALIZED,  # C_SE_NA_1
    61: ValueKind.NORMALIZED,  # C_SE_TA_1
    49: ValueKind.SCALED,  # C_SE_NB_1
    62: ValueKind.SCALED,  # C_SE_TB_1
    50: ValueKind.FLOAT,  # C_SE_NC_1
    63: ValueKind.FLOAT,  # C_SE_TC_1
}

#: the monitor type without time tag of each kind: what an outstation answers a general
#: interrogation with (the simulator's default, ``simulator.gi_types: untagged``)
UNTAGGED_TYPE: Final[dict[ValueKind, int]] = {
    ValueKind.SINGLE: 1,
    ValueKind.DOUBLE: 3,
    ValueKind.STEP: 5,
    ValueKind.BITSTRING: 7,
    ValueKind.NORMALIZED: 9,
    ValueKind.SCALED: 11,
    ValueKind.FLOAT: 13,
    ValueKind.INTEGRATED_TOTAL: 15,
}

_TAGGED: Final = frozenset({30, 31, 32, 33, 34, 35, 36, 37, 58, 59, 61, 62, 63})

#: kind -> its monitor type ids, untagged first
TYPES_OF_KIND: Final[dict[ValueKind, tuple[int, ...]]] = {
    kind: tuple(sorted((t for t, k in KIND_OF_TYPE.items() if k is kind and t < 45), key=lambda t: t in _TAGGED))
    for kind in ValueKind
}

_NAMES: Final = {
    "M_SP_NA_1": 1, "M_SP_TB_1": 30, "M_DP_NA_1": 3, "M_DP_TB_1": 31, "M_ST_NA_1": 5, "M_ST_TB_1": 32,
    "M_BO_NA_1": 7, "M_BO_TB_1": 33, "M_ME_NA_1": 9, "M_ME_TD_1": 34, "M_ME_NB_1": 11, "M_ME_TE_1": 35,
    "M_ME_NC_1": 13, "M_ME_TF_1": 36, "M_IT_NA_1": 15, "M_IT_TB_1": 37,
    "C_SC_NA_1": 45, "C_SC_TA_1": 58, "C_DC_NA_1": 46, "C_DC_TA_1": 59, "C_SE_NA_1": 48, "C_SE_TA_1": 61,
    "C_SE_NB_1": 49, "C_SE_TB_1": 62, "C_SE_NC_1": 50, "C_SE_TC_1": 63,
}  # fmt: skip


def _type_id(type_id: int | str) -> int:
    if isinstance(type_id, str):
        try:
            return _NAMES[type_id]
        except KeyError:
            raise KeyError(f"no value kind for IEC 104 type {type_id!r}") from None
    return int(type_id)


def kind_of(type_id: int | str) -> ValueKind:
    """The kind of a type id (number or name as in the lab config); KeyError for a type
    that carries no point value (system types, unknown ids)."""
    t = _type_id(type_id)
    try:
        return KIND_OF_TYPE[t]
    except KeyError:
        raise KeyError(f"no value kind for IEC 104 type id {t}") from None


def is_time_tagged(type_id: int | str) -> bool:
    """Whether objects of this type carry a CP56Time2a time tag."""
    return _type_id(type_id) in _TAGGED


def untagged_type(type_id: int | str) -> int:
    """The monitor type without time tag of the same kind (M_ME_TF_1 -> M_ME_NC_1)."""
    return UNTAGGED_TYPE[kind_of(type_id)]
