import os
import warnings

import pytest
import torch

# The CI machine has 2 cores; keep each test process on one thread so parallel work stays predictable.
torch.set_num_threads(1)
os.environ.setdefault("PYTHONWARNINGS", "ignore")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The real MNIST test split (torchvision layout): $GRADSIM_MNIST_ROOT (.ci/run sets it), else the CI
#: machine's copy at ../shared/data/mnist next to the repository. The package itself has no default.
MNIST_ROOT = os.environ.get("GRADSIM_MNIST_ROOT") or os.path.abspath(
    os.path.join(REPO_ROOT, "..", "shared", "data", "mnist")
)


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
