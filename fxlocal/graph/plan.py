"""``Plan``: the seam between graph analysis and everything after it.

Plain data: per block, the module paths it covers, its parameters, GFLOPs and activation MiB
(per sample, forward+backward, measured on fake tensors), its aux head's size, and the cut node
it ends at. A Plan prints as a table, round-trips through JSON and can be re-applied to the same
architecture (``convert(model, plan=Plan.load(path))``): cuts are fx node names, which are stable
for the same architecture and input size.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import PartitionError

__all__ = ["BlockPlan", "Plan", "atomic_write_bytes"]


@dataclass
class BlockPlan:
    index: int
    module_paths: list[str]
    params: int
    gflops: float  # forward + backward, per sample
    activation_mib: float  # saved for backward, per sample
    head_params: int = 0
    head_gflops: float = 0.0
    head_activation_mib: float = 0.0  # saved for backward by the head, per sample
    cost: float = 0.0  # the balanced metric, block + head
    cut_node: str | None = None  # fx node the block ends after (None for the last block)
    cut_shape: list[int] | None = None  # per-sample shape of the tensor at that cut
    head: str = ""  # one-line description of the aux head


@dataclass
class Plan:
    model: str
    input_size: list[int]
    k: int
    balance: str
    aux: str
    num_candidates: int
    blocks: list[BlockPlan] = field(default_factory=list)

    @property
    def cuts(self) -> list[str]:
        return [b.cut_node for b in self.blocks[:-1] if b.cut_node]

    @property
    def imbalance(self) -> float:
        """max / mean of the balanced cost over blocks (1.0 is perfect)."""
        costs = [b.cost for b in self.blocks]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "cuts": self.cuts, "imbalance": self.imbalance}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """The Plan of :meth:`to_dict`'s output; anything else is a :class:`PartitionError`."""
        hint = "write one with fxlocal convert --save-plan"
        if not isinstance(data, dict):
            raise PartitionError(f"not an fxlocal plan: it holds a JSON {type(data).__name__}, not an object; {hint}")
        blocks = data.get("blocks", [])
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise PartitionError(f"not an fxlocal plan: 'blocks' is not a list of objects; {hint}")
        try:
            fields = {k: v for k, v in data.items() if k not in ("cuts", "imbalance")}
            fields["blocks"] = [BlockPlan(**b) for b in blocks]
            plan = cls(**fields)
        except TypeError as exc:
            raise PartitionError(f"not an fxlocal plan: {exc}; {hint}") from exc
        if not isinstance(plan.k, int) or plan.k < 1 or len(plan.blocks) != plan.k:
            raise PartitionError(f"not an fxlocal plan: k={plan.k!r} with {len(plan.blocks)} blocks; {hint}")
        return plan

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PartitionError(f"not an fxlocal plan (invalid JSON: {exc}); write one with fxlocal convert --save-plan") from exc

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        try:
            return cls.from_json(Path(path).read_text())
        except OSError as exc:
            raise PartitionError(f"cannot read plan {path}: {exc.strerror}") from exc

    def __str__(self) -> str:
        lines = [
            f"Plan {self.model or '<model>'}: K={self.k}, balance={self.balance}, aux={self.aux}, "
            f"input={tuple(self.input_size)}, imbalance={self.imbalance:.3f}"
        ]
        for b in self.blocks:
            lines.append(
                f"  block {b.index}: {_short_paths(b.module_paths)} | params {b.params / 1e6:.2f}M | "
                f"{b.gflops:.2f} GFLOPs | act {b.activation_mib:.1f} MiB | cut {b.cut_node or '-'}"
            )
        return "\n".join(lines)


def _short_paths(paths: list[str], limit: int = 4) -> str:
    if len(paths) <= limit:
        return ", ".join(paths)
    return f"{paths[0]} … {paths[-1]} ({len(paths)} modules)"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
