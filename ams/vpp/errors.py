"""The two ways a VPP computation fails, mapped to the CLI exit codes (2 and 3)."""

from __future__ import annotations


class VppError(Exception):
    """Base of the VPP errors."""


class BadInput(VppError):
    """The portfolio or request file is wrong: the message names the key (CLI exit code 2)."""


class Infeasible(VppError):
    """No schedule meets the request; ``constraint`` names the binding constraint (exit code 3)."""

    def __init__(self, constraint: str, detail: str = "") -> None:
        self.constraint = constraint
        self.detail = detail
        super().__init__(f"infeasible: {constraint}" + (f" ({detail})" if detail else ""))
