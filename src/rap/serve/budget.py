"""Budget sources: where the engine reads its memory budget before every batch.

Fixed bytes, a fraction of the device, a live reading of free device memory minus a reserve, or
any callable; `budget_from_spec` parses what users type (`6GiB`, `0.5`, `50%`, `live:1GiB`)
strictly: non-finite, boolean or sub-byte values are refused with one line.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rap.errors import RequestError
from rap.core.memory import format_bytes, parse_bytes

log = logging.getLogger(__name__)


# ==== budget sources ==========================================================================
def _device_total_bytes(device: torch.device, fallback_total_bytes: int | None) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if fallback_total_bytes is not None:
        return fallback_total_bytes
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class FixedBudget:
    """A fixed number of bytes."""

    budget_bytes: int

    def __call__(self) -> int:
        return self.budget_bytes

    def describe(self) -> dict:
        return {"kind": "fixed", "budget_bytes": self.budget_bytes}


@dataclass(frozen=True)
class DeviceFractionBudget:
    """A fraction of the device's total memory (on CPU: of `total_bytes`, else of physical RAM)."""

    fraction_ratio: float
    device: str = "cpu"
    total_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction_ratio <= 1.0:
            raise RequestError(f"a device fraction must be in (0, 1], got {self.fraction_ratio}")

    def __call__(self) -> int:
        return int(self.fraction_ratio * _device_total_bytes(torch.device(self.device), self.total_bytes))

    def describe(self) -> dict:
        return {"kind": "device_fraction", "fraction_ratio": self.fraction_ratio, "device": self.device}


@dataclass(frozen=True)
class LiveBudget:
    """Free device memory, plus what this process's allocator already holds, minus a reserve.

    Another tenant allocating on the same GPU lowers the reading at the next batch. What this
    process holds counts as available because the engine itself decides what stays resident.
    On CPU there is no allocator to read: the reading is `total_bytes - reserve_bytes`
    (`total_bytes` defaults to physical RAM), a stand-in for tests and demos.
    """

    reserve_bytes: int = 0
    device: str = "cpu"
    total_bytes: int | None = None

    def __call__(self) -> int:
        dev = torch.device(self.device)
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            available = free + torch.cuda.memory_reserved(dev)
        else:
            available = _device_total_bytes(dev, self.total_bytes)
        return max(0, available - self.reserve_bytes)

    def describe(self) -> dict:
        return {"kind": "live", "reserve_bytes": self.reserve_bytes, "device": self.device}


@dataclass(frozen=True)
class CallableBudget:
    """Any zero-argument callable returning bytes (a trace replay, a cluster scheduler's hint...)."""

    fn: Callable[[], int]
    name: str = "callable"

    def __call__(self) -> int:
        return int(self.fn())

    def describe(self) -> dict:
        return {"kind": "callable", "name": self.name}


BudgetSource = FixedBudget | DeviceFractionBudget | LiveBudget | CallableBudget


MAX_BUDGET_BYTES = 2**63 - 1
_BUDGET_HELP = "use e.g. 6GiB, 512MB, a whole number of bytes, 0.5 or 50% of the device, live or live:1GiB"


def _strict_bytes(text: str, what: str) -> int:
    """'6GiB' / '1e9' -> bytes; non-finite, negative, fractional-byte or absurd values are errors."""
    try:
        value = parse_bytes(text)
    except (RequestError, OverflowError, ValueError):
        raise RequestError(f"cannot read {text!r} as {what}: {_BUDGET_HELP}") from None
    if not 0 <= value <= MAX_BUDGET_BYTES:
        raise RequestError(f"{what} {text!r} is out of range: {_BUDGET_HELP}")
    return value


def budget_from_spec(spec: Any, device: str = "cpu", total_bytes: int | None = None) -> BudgetSource:
    """What users type after --budget (or PUT /v1/budget) -> a budget source. Strict: anything that
    is not one of these is a RequestError, never a budget of 0 bytes.

    - ``6GiB``, ``512MB``, ``123456789`` or an int >= 1: fixed bytes;
    - ``0.5`` or ``50%``: that fraction of the device's memory (at least one byte of it);
    - ``live`` or ``live:1GiB``: free device memory minus a reserve (default 0, below the device's total);
    - a callable or a budget source: used as is.
    """
    if isinstance(spec, (FixedBudget, DeviceFractionBudget, LiveBudget, CallableBudget)):
        return spec
    if callable(spec):
        return CallableBudget(spec, getattr(spec, "__name__", "callable"))
    if isinstance(spec, bool) or spec is None or not isinstance(spec, (int, float, str)):
        raise RequestError(f"cannot read {spec!r} as a budget: {_BUDGET_HELP}")

    def fraction(value: float) -> DeviceFractionBudget:
        source = DeviceFractionBudget(value, device, total_bytes)
        if source() < 1:
            raise RequestError(f"a budget of {value!r} of the device is less than one byte: {_BUDGET_HELP}")
        return source

    if isinstance(spec, int):
        if not 1 <= spec <= MAX_BUDGET_BYTES:
            raise RequestError(f"a budget in bytes must be in [1, 2**63), got {spec}")
        return FixedBudget(spec)
    if isinstance(spec, float):
        if not math.isfinite(spec) or spec <= 0:
            raise RequestError(f"a budget must be a positive finite number, got {spec!r}")
        if spec <= 1.0:
            return fraction(spec)
        if not spec.is_integer():
            raise RequestError(f"a budget above 1 is bytes and must be a whole number, got {spec!r}: {_BUDGET_HELP}")
        return budget_from_spec(int(spec), device, total_bytes)
    text = spec.strip().lower()
    if text == "live" or text.startswith("live:"):
        reserve = _strict_bytes(text.split(":", 1)[1], "a live budget's reserve") if ":" in text else 0
        source = LiveBudget(reserve, device, total_bytes)
        total = _device_total_bytes(torch.device(device), total_bytes)
        if reserve >= total:
            raise RequestError(f"a reserve of {format_bytes(reserve)} leaves nothing of the device's "
                               f"{format_bytes(total)}: reserve less")
        return source
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            pct = float("nan")
        if not (math.isfinite(pct) and 0 < pct <= 100):
            raise RequestError(f"cannot read {spec!r} as a percentage of the device: use (0, 100]%")
        return fraction(pct / 100.0)
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or number <= 0:
            raise RequestError(f"a budget must be a positive finite number, got {spec!r}")
        if number <= 1.0 and ("." in text or "e" in text):
            return fraction(number)
        if not number.is_integer():
            raise RequestError(f"a budget above 1 is bytes and must be a whole number, got {spec!r}: {_BUDGET_HELP}")
    value = _strict_bytes(text, "a budget")
    if value < 1:
        raise RequestError(f"a budget must be at least one byte, got {spec!r}")
    return FixedBudget(value)
