"""What a training run reports and writes besides checkpoints: progress to a :class:`Reporter`
(the CLI draws it; library code prints nothing), ``metrics.jsonl`` (and TensorBoard when it is
installed), ``curves.png``, and the output folder, checked before anything is written."""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FxLocalError
from ..graph.plan import atomic_write_bytes
from ..local_model import LocalModel
from .recipe import Recipe


class OutputDirError(FxLocalError, OSError):
    """The recipe's output_dir cannot be created or written."""


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail early, creating nothing, when ``path`` cannot become a folder this process writes to.

    Args:
        path: the recipe's output_dir (it need not exist yet).

    Returns:
        ``path`` as a Path.

    Raises:
        OutputDirError: the nearest existing ancestor is a file, or a file cannot be made in it.
    """
    out = Path(path).absolute()
    existing = out
    while not existing.exists():
        existing = existing.parent
    hint = "set another with --output DIR"
    if not existing.is_dir():
        raise OutputDirError(f"cannot make output_dir {path}: {existing} is a file, not a folder; {hint}")
    try:  # a probe that leaves nothing behind: permissions, read-only mounts, a full disk
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise OutputDirError(f"cannot write in output_dir {path} ({existing}: {exc.strerror}); {hint}") from None
    return Path(path)


def make_output_dir(path: Path) -> None:
    """Create the output folder once the run is known to start (nothing is written before)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot make output_dir {path} ({exc.strerror}); set another with --output DIR") from None


class Reporter:
    """Receives progress; the default ignores it. The CLI subclasses it to draw progress bars."""

    def run_start(self, recipe: Recipe, local: LocalModel, start_epoch: int, steps_per_epoch: int) -> None: ...

    def step(self, epoch: int, step: int, losses: list[float], images_per_s: float) -> None: ...

    def epoch_end(self, record: dict) -> None: ...


@dataclass
class TrainResult:
    """What :func:`~fxlocal.training.fit` returns: the output folder, the epochs done, each epoch's record."""
    output_dir: Path
    epochs_done: int
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    reporting: bool = True  # this process reported progress and wrote the metrics (one per run)


def log_metrics(out_dir: Path, writer, record: dict) -> None:
    """Append an epoch's record to ``metrics.jsonl`` (and TensorBoard when ``writer`` is one)."""
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        _log_tensorboard(writer, record)


def tensorboard(out_dir: Path):
    """A TensorBoard writer in ``out_dir/tensorboard``, or None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _log_tensorboard(writer, record: dict) -> None:
    for key, value in record.items():
        if isinstance(value, list):
            for i, v in enumerate(value):
                writer.add_scalar(f"{key}/block{i}", v, record["epoch"])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, record["epoch"])


def plot_curves(history: list[dict], path: Path) -> None:
    """Draw each block's training loss and the test accuracy per epoch to ``path`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for b in range(len(history[0]["train_loss"])):
        ax1.plot(epochs, [r["train_loss"][b] for r in history], label=f"block {b}")
    ax1.set(xlabel="epoch", ylabel="train loss", title="local losses")
    ax1.legend()
    tested = [r for r in history if "test_top1" in r]
    ax2.plot([r["epoch"] for r in tested], [r["test_top1"] for r in tested], marker="o", label="model top-1")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="test accuracy")
    ax2.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
