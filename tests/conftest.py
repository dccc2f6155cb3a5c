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
#:
#: One rule for every test that reads MNIST (they all take the ``mnist_root`` fixture): when the files
#: are missing, the test FAILS if the run asked for the data (``$GRADSIM_MNIST_ROOT`` set, as .ci/run
#: does, or ``$CI`` true) and is SKIPPED otherwise (a fresh clone without the data), with the reason.
MNIST_ROOT = os.environ.get("GRADSIM_MNIST_ROOT") or os.path.abspath(
    os.path.join(REPO_ROOT, "..", "shared", "data", "mnist")
)


def mnist_required() -> bool:
    """Whether missing MNIST files fail the tests that need them (else they skip)."""
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    return ci or bool(os.environ.get("GRADSIM_MNIST_ROOT"))


@pytest.fixture(autouse=True)
def _seed_and_quiet():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        yield


def mnist_root_or_skip(root: str = MNIST_ROOT) -> str:
    """``root`` if it holds the MNIST files; else skip or fail the calling test by the rule above."""
    if not os.path.isdir(os.path.join(root, "MNIST", "raw")):
        reason = f"the real MNIST files are not under {root} (MNIST/raw); set $GRADSIM_MNIST_ROOT"
        if mnist_required():
            pytest.fail(reason + " ($GRADSIM_MNIST_ROOT or $CI is set, so this run needs them)", pytrace=False)
        pytest.skip(reason)
    return root


@pytest.fixture
def mnist_root():
    """The MNIST folder of every test that reads MNIST (skip or fail by the rule above when missing)."""
    return mnist_root_or_skip()
