"""Do this machine's cores scale? One single-threaded process alone vs two side by side.

What bounds a CPU pipeline's efficiency (``benchmarks/pipeline.py``): K stages run at once, one
thread each. Compute that stays in a core's cache scales with the cores; ops that stream
tensors larger than the caches share the memory bus. Each op runs for a few seconds; the table
gives its rate alone and, per process, with a second copy running beside it.

    python benchmarks/cores.py
"""

from __future__ import annotations

import subprocess
import sys
import time

SECONDS = 3.0


# Each builds its tensors in the child process (by name: nothing to pickle) and returns the op to time.
def _matmul():
    import torch

    a = torch.randn(256, 256)
    return lambda: a @ a


def _conv():
    import torch

    x, w = torch.randn(16, 16, 28, 28), torch.randn(16, 16, 3, 3)
    return lambda: torch.nn.functional.conv2d(x, w, padding=1)


def _stream():
    import torch

    a = torch.randn(16_000_000)
    return lambda: a.mul_(1.0)


# name -> (what it does, the function that builds it)
OPS = {
    "matmul": ("256×256 float matmul (in cache)", _matmul),
    "conv": ("3×3 conv, batch 16, 16×28×28 (a resnet32 stage at batch 16)", _conv),
    "stream": ("in-place multiply over 64 MB (streams from memory)", _stream),
}


def _rate(name: str) -> float:
    """Runs in a child: the op's rate over SECONDS, after one warm-up call."""
    import torch

    torch.set_num_threads(1)
    op = OPS[name][1]()
    op()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        op()
        n += 1
    return n / (time.perf_counter() - start)


def _run(name: str, copies: int) -> list[float]:
    procs = [
        subprocess.Popen([sys.executable, __file__, "--child", name], stdout=subprocess.PIPE, text=True)
        for _ in range(copies)
    ]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(_rate(sys.argv[2]))
        return
    print("`python benchmarks/cores.py` (one thread per process)\n")
    print("| op | alone /s | two side by side, each /s | per-process ratio |")
    print("|---|---|---|---|")
    for name, (what, _) in OPS.items():
        (alone,) = _run(name, 1)
        both = _run(name, 2)
        print(f"| {what} | {alone:.0f} | {' / '.join(f'{r:.0f}' for r in both)} | {min(both) / alone:.2f} |", flush=True)


if __name__ == "__main__":
    main()
