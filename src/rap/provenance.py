"""What every result file records: the machine, the software, the date and the exact command.

A number without these cannot be re-measured or compared, so benchmarks, profiles and KV evaluations
all stamp their JSON from here.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch


def device_line(device: torch.device | str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3, 79 GiB, 132 SMs' or 'CPU (x86_64, 2 cores), no GPU'."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no GPU"


def versions() -> dict:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "cuda": torch.version.cuda if torch.cuda.is_available() else None}
    from importlib.metadata import PackageNotFoundError, version

    for dist, key in (("rap-runtime", "rap"), ("torchao", "torchao"), ("gemlite", "gemlite")):
        try:  # rap from a source tree that is not installed, or a kernel library this run lacks
            found[key] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def command_line() -> str:
    """The command as typed: `rap ...` for the console script, else `python script.py ...`."""
    if Path(sys.argv[0]).name == "rap":
        return " ".join(["rap", *sys.argv[1:]])
    return " ".join([Path(sys.executable).name, *sys.argv])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def environment(device: torch.device | str | None = None) -> dict:
    return {"device": device_line(device), "date": now(), "command": command_line(), "versions": versions()}
