import gzip
import os
import warnings
from pathlib import Path

import pytest
import torch

from fxlocal.training.data import SHIPPED

warnings.filterwarnings("ignore")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One of several test processes on a machine of few cores (CI: 2 workers on 2 cores): a
    # second intra-op thread per process would only contend (the suite is mostly dispatch-bound).
    torch.set_num_threads(1)

# the Fashion-MNIST sample fxlocal ships (4000 training and 1000 test images; the quickstart trains on it)
FASHION_MNIST = SHIPPED / "fashion_mnist_mini"


def _idx(path: Path, count: int, item_bytes: int, header: int) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read(header + count * item_bytes)
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)


@pytest.fixture(scope="session")
def fashion_mnist():
    """The first 512 real Fashion-MNIST training images (the shipped sample), as (N,1,28,28) floats and labels."""
    n = 512
    images = _idx(FASHION_MNIST / "train-images-idx3-ubyte.gz", n, 28 * 28, 16)
    labels = _idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz", n, 1, 8)
    x = images.view(n, 1, 28, 28).float().div(255).sub(0.2860).div(0.3530)
    return x, labels.long()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
