import os
import warnings

import pytest
import torch

# The CI machine has 2 cores; keep each test process on one thread so parallel work stays predictable.
torch.set_num_threads(1)
os.environ.setdefault("PYTHONWARNINGS", "ignore")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The real MNIST test split (torchvision layout); CI has it at ../shared/data/mnist too.
MNIST_ROOT = os.environ.get("GRADSIM_MNIST_ROOT", os.path.join(REPO_ROOT, "..", "shared", "data", "mnist"))


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        yield


@pytest.fixture
def mnist_root():
    return MNIST_ROOT
