"""Where a benchmark's rows came from, and appending them to a JSON-lines file.

Every benchmark row is recorded with the commit it ran on (``+dirty`` when the tree had
uncommitted changes), the versions of torch, torchvision and timm, and the device, so that a
figure quoted in the docs can be traced to the code and machine that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _commit() -> str:
    """The checkout's commit, ``+dirty`` if tracked files (other than ``benchmarks/results/``, where
    benchmarks record, and ``docs/zoo.md``, which the zoo sweep renders) differ from it; ``$FXLOCAL_COMMIT`` where
    it is set (a copy of the tree without its ``.git``, as the GPU machine gets); else ``unknown``."""
    if os.environ.get("FXLOCAL_COMMIT"):
        return os.environ["FXLOCAL_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        # the results a benchmark appends to are not the code it ran: a run that recorded rows
        # leaves the next one clean
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results",
                                ":!docs/zoo.md"],  # the zoo sweep renders it: its next piece is the same code
                               cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: str | torch.device) -> str:
    """``"NVIDIA H200"`` for a CUDA device, the processor and thread count for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU {cpu}, {threads} thread{'s' if threads != 1 else ''}"


def provenance(device: str | torch.device = "cpu") -> dict:
    """The commit, library versions, device and time of a benchmark run."""
    import timm
    import torchvision

    return {
        "commit": _commit(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "host": os.uname().nodename,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """Append ``rows`` to the JSON-lines file ``path`` (created with its folder if missing),
    flushed and synced, so that an interrupted run keeps every row it finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
