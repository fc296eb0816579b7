"""The base of the result records that commands return (merge, diff, convert, ...)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Result:
    """A frozen record; :meth:`as_dict` (or :meth:`to_dict`, the same) gives what ``--json`` prints."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_dict(self) -> dict[str, Any]:
        """The record as a dict (what ``--json`` prints)."""
        return asdict(self)
