"""What every ``gradsim`` command checks before it trains: one place, one kind of error.

A user error (a bad flag value, an output folder that cannot be written, a missing file or
extra) is a :class:`UsageError`; the ``gradsim`` dispatcher prints it as one line on stderr,
``gradsim <command>: <what is wrong and how to fix it>``, and exits with status 2 -- never a
traceback, and never after the training. Commands build their parser with :func:`command_parser`
(argparse, whose errors become :class:`UsageError` too), give their flags the checked types below,
and call :func:`check_out_dir` / :func:`check_path` before any work.

>>> parser = command_parser("gradsim demo")
>>> _ = parser.add_argument("--seeds", type=int_at_least(1), default=3)
>>> _ = parser.add_argument("--angles", type=angle_list, default="0,90")
>>> parser.parse_args(["--angles", "0,45,180"]).angles
[0.0, 45.0, 180.0]
>>> parser.parse_args(["--seeds", "0"])
Traceback (most recent call last):
lightning_gradsim.cli_checks.UsageError: argument --seeds: must be an integer >= 1, got '0'
>>> parser.parse_args(["--angles", "400"])
Traceback (most recent call last):
lightning_gradsim.cli_checks.UsageError: argument --angles: angles are degrees in [0, 360), got 400
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = [
    "UsageError",
    "user_errors",
    "command_parser",
    "int_at_least",
    "float_in",
    "angle_list",
    "check_out_dir",
    "check_path",
    "check_device",
    "check_requirements",
    "REQUIREMENTS",
    "EXTRA_OF",
]


class UsageError(Exception):
    """A user error: ``gradsim`` prints it as one line on stderr and exits with status 2."""


def user_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main(argv)``: a :class:`UsageError` becomes one line on stderr,
    ``<prog>: <message>``, and the return value 2 (also when ``main`` is called from Python)."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except UsageError as err:
                print(f"{prog}: {err}", file=sys.stderr, flush=True)
                return 2

        return run

    return wrap


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def command_parser(prog: str, description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``argparse`` parser whose errors raise :class:`UsageError` (one line, exit 2) instead of usage text."""
    return _Parser(prog=prog, description=description, **kwargs)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def float_in(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in the interval (``*_open``: that end excluded).

    >>> float_in(0, 1, high_open=True)("0.5")
    0.5
    """
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    interval = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        bad |= low is not None and (value <= low if low_open else value < low)
        bad |= high is not None and (value >= high if high_open else value > high)
        if bad:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}")
        return value

    return parse


def angle_list(text: str) -> list[float]:
    """An argparse ``type``: comma-separated rotation angles in degrees, each in ``[0, 360)``, no repeats.

    Counter-clockwise rotations; 360 is 0 and a negative angle is ``360 - |angle|``, so one range
    names every rotation once.
    """
    angles = []
    for part in (t.strip() for t in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes comma-separated numbers, e.g. 0,90; got {part!r}") from None
        if not 0 <= value < 360:
            raise argparse.ArgumentTypeError(f"angles are degrees in [0, 360), got {part}")
        angles.append(value)
    if not angles:
        raise argparse.ArgumentTypeError("give at least one angle, e.g. 0,90")
    if len(set(angles)) != len(angles):
        raise argparse.ArgumentTypeError(f"repeated angle in {text!r}")
    return angles


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> str:
    """Create the output folder ``path`` (and its parents) and check that files can be written in it.

    Refuses an existing file, a folder that cannot be created (``/proc/x``) and one without write
    permission -- before any training, so that no result is lost at the end of a run.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is an existing file, not a folder: give a folder for the outputs.")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gradsim-write-check-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(f"{flag} {path!r}: cannot write there ({reason}); give a writable folder.") from None
    return path


def check_path(path: str | os.PathLike[str] | None, flag: str, kind: str = "file") -> str | None:
    """``path`` if it exists as a ``kind`` (``"file"``, ``"dir"`` or ``"any"``); ``None`` stays ``None``."""
    if path is None:
        return None
    path = os.fspath(path)
    ok = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[kind](path)
    if not ok:
        what = {"file": "file", "dir": "folder", "any": "file or folder"}[kind]
        raise UsageError(f"{flag} {path!r}: no such {what}.")
    return path


def check_device(text: str, flag: str = "--device") -> str:
    """``text`` if torch names a device by it and, for an accelerator, one is visible."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {text!r} is not a device; e.g. cpu, cuda, cuda:1, mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index is not None and device.index >= count):
            raise UsageError(f"{flag} {text}: {count} CUDA device(s) visible here; use --device cpu or another index.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} mps: no MPS device here; use --device cpu.")
    return text


#: import name -> (pip requirement, extra of lightning-gradsim that installs it, or None: a core dependency)
EXTRA_OF: dict[str, tuple[str, str | None]] = {
    "torch": ("torch", None),
    "lightning": ("lightning", None),
    "torchvision": ("torchvision", None),
    "torchmetrics": ("torchmetrics", None),
    "timm": ("timm", None),
    "matplotlib": ("matplotlib", None),
    "jsonargparse": ("jsonargparse[signatures]", "experiments"),
    "sklearn": ("scikit-learn", "experiments"),
    "numpy": ("numpy", "experiments"),
    "tqdm": ("tqdm", "experiments"),
    "yaml": ("pyyaml", "experiments"),
    "scipy": ("scipy", "imagenet"),
    "PIL": ("pillow", "imagenet"),
    "gymnasium": ("gymnasium", "rl"),
    "minatar": ("minatar", "atari"),
    "ale_py": ("ale-py", "ale"),
}

_CORE = ("torch", "lightning", "matplotlib")
_EXPERIMENTS = (*_CORE, "numpy", "tqdm")
#: ``gradsim`` command -> the modules it imports while it runs (checked before it starts)
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "fit": (*_EXPERIMENTS, "jsonargparse", "yaml", "torchvision", "torchmetrics", "timm"),
    "validate": (*_EXPERIMENTS, "jsonargparse", "yaml", "torchvision", "torchmetrics", "timm"),
    "test": (*_EXPERIMENTS, "jsonargparse", "yaml", "torchvision", "torchmetrics", "timm"),
    "compare": (*_EXPERIMENTS, "yaml", "sklearn", "torchvision", "torchmetrics", "timm"),
    "distances": (*_EXPERIMENTS, "torchvision", "timm", "scipy", "PIL"),
    "pairs": (*_EXPERIMENTS, "torchvision", "timm", "PIL"),
    "toy": _CORE,
    "gridworld": (*_CORE, "numpy", "tqdm"),
    "table1": (*_EXPERIMENTS, "sklearn", "torchvision"),
    "atari": (*_CORE, "numpy", "tqdm", "minatar"),
    "relatedness": (*_CORE, "tqdm"),
    "figures": _CORE,
    "report": ("matplotlib", "numpy"),  # TensorBoard event files need tensorboard too (said when met)
    "configs": (),
}


def check_requirements(command: str, modules: Sequence[str] | None = None) -> None:
    """Raise :class:`UsageError` naming the package and the extra to install when a module that
    ``gradsim <command>`` needs (:data:`REQUIREMENTS`) cannot be imported; nothing is imported here."""
    missing = []
    for name in REQUIREMENTS.get(command, ()) if modules is None else modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if not missing:
        return
    packages = [EXTRA_OF.get(m, (m, None))[0] for m in missing]
    extras = sorted({e for m in missing if (e := EXTRA_OF.get(m, (m, None))[1]) is not None})
    names = ", ".join(f"{p} (import '{m}')" if p != m else f"'{m}'" for p, m in zip(packages, missing))
    unknown = [p for p, m in zip(packages, missing) if m not in EXTRA_OF]
    if extras:
        fix = f'pip install "lightning-gradsim[{",".join(extras)}]"'
    elif unknown:
        fix = "pip install " + " ".join(packages)
    else:
        fix = "pip install " + " ".join(packages) + " (dependencies of lightning-gradsim)"
    raise UsageError(f"needs {names}, which is not installed: {fix}")


def one_line(message: Any) -> str:
    """A multi-line error message (jsonargparse's, say) as one line: its informative lines joined.

    >>> one_line('Parser key "model":\\n  Does not validate against any of the Union subtypes\\n'
    ...          "  Errors:\\n    - Option 'methodd' is not accepted\\n    - Expected a <class 'NoneType'>")
    'Parser key "model": Option \\'methodd\\' is not accepted'
    """
    noise = ("Does not validate against", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>", "Given value")
    lines = [line.strip().lstrip("- ").strip() for line in str(message).splitlines()]
    kept = [line for line in lines if line and not line.startswith(noise)]
    return " ".join(kept) if kept else str(message).strip()
