"""``gradsim pairs``: the paper's Figure 3 -- single-task, multi-task and the gate on a near and a far class pair.

Section 4.1: main task "is it class A?", auxiliary task "is it class B?", a network whose
convolutional layers are shared and whose heads are per task. For a near pair and a far pair it
trains, for every seed, ``main_only`` (single task), ``sum`` (multi-task) and ``unweighted`` (the
gate, the paper's default), and draws Figure 3: (a) the cosine between the main and auxiliary
gradients on the shared parameters over training, near vs far, from the multi-task runs; (b, c)
main-task test accuracy over steps on the near and the far pair, one curve per method.

All runs (pairs x seeds x methods) train together as one stacked network
(:class:`~lightning_gradsim.experiments.stacked.StackedRuns`); each run draws its own batches
(the same ones for every method of a seed) and starts from its seed's weights.

Sources: ImageNet (``--source imagefolder`` or ``downsampled`` with ``--map-file``; pairs by
``--near A,B --far C,D``, default the paper's trimaran/catamaran and traffic light/rock python;
ResNetV2-18 from timm, random init) and MNIST (``--source mnist``; the pairs are picked by the
Fréchet distance of class features, see :mod:`~lightning_gradsim.experiments.pair_select`; a small
CNN). Writes ``curves.csv``, ``cosine_steps.csv``, ``figure3.png`` and ``summary.md``.

Held-out gates ``unweighted_heldout`` / ``weighted_heldout`` (:mod:`~lightning_gradsim.experiments.heldout`)
measure the cosine against the main head's gradient on a batch of the pair's held-out reference split
(one per run and step); with one in the command every pair is built with the reference split
(``REFERENCE_FRACTION`` of each class's training images), so every method trains on the same images.

Example::

    gradsim pairs --source mnist --root /data/mnist --out runs/pairs_mnist
    gradsim pairs --root /data/imagenet --device cuda --out runs/pairs_imagenet
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..cli_checks import (
    UsageError,
    check_device,
    check_out_dir,
    check_path,
    command_parser,
    float_in,
    int_at_least,
    user_errors,
)
from .heldout import base_method, reference_fraction_for
from .pairs_data import PairData
from .stacked import EpochSampler, Run, StackedRuns

__all__ = ["PairsResult", "train_pairs", "small_cnn_trunk", "main", "DEFAULTS"]

#: per-source defaults (every one "not given in the paper"; see docs/protocols.md, class pairs)
DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": {"model": "small_cnn", "steps": 500, "eval_every": 20, "batch_size": 32, "lr": 1e-3},
    "imagenet": {"model": "resnetv2_18", "steps": 10000, "eval_every": 250, "batch_size": 64, "lr": 1e-3},
}
PAPER_NEAR = ("n04483307", "n02981792")  # trimaran, catamaran
PAPER_FAR = ("n06874185", "n01744401")  # traffic light, rock python


@dataclass
class PairsResult:
    """Evaluation rows (one per pair, method, seed and evaluation step) and per-step rows."""

    rows: list[dict[str, Any]]
    step_rows: list[dict[str, Any]]
    pairs: list[PairData]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def small_cnn_trunk(in_chans: int = 1, width: int = 16) -> tuple[torch.nn.Module, int]:
    """The MNIST stand-in for the paper's ResNetV2-18, with its structure at small scale: three
    3x3 stride-2 convolutions (``width``, 2x, 4x channels) each with BatchNorm and ReLU, global
    average pooling; returns ``(trunk, feature_dim)``. The task heads are linear layers on top.

    >>> trunk, dim = small_cnn_trunk(1)
    >>> tuple(trunk(torch.zeros(2, 1, 28, 28)).shape), dim
    ((2, 64), 64)
    """
    from torch import nn

    layers: list[nn.Module] = []
    c = in_chans
    for out in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(c, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c


def _net_factory(model: str, in_chans: int) -> Callable[[int], torch.nn.Module]:
    from ..models import MultiHeadNet, build_trunk

    def make_net(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        trunk, dim = small_cnn_trunk(in_chans) if model == "small_cnn" else build_trunk(model, in_chans=in_chans)
        return MultiHeadNet(trunk, dim, {"main": 2, "aux": 2})

    return make_net


def train_pairs(
    pairs: Sequence[PairData],
    methods: Sequence[str] = ("main_only", "sum", "unweighted"),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    eval_every: int = 10,
    batch_size: int = 32,
    model: str = "small_cnn",
    optimizer: str = "adam",
    lr: float = 1e-3,
    gate: dict[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> PairsResult:
    """Train every (pair, seed, method) run together; evaluate the main task's test accuracy every
    ``eval_every`` steps (and at step 0 and the last step)."""
    from tqdm.auto import tqdm

    if steps < 1 or eval_every < 1 or batch_size < 1:
        raise ValueError(f"steps, eval_every and batch_size must be >= 1; got {steps}, {eval_every}, {batch_size}.")
    runs = [Run(g, s, m) for m in methods for g in range(len(pairs)) for s in seeds]  # method-major: views per method
    in_chans = int(pairs[0].main.x.shape[1])
    stack = StackedRuns(_net_factory(model, in_chans), runs, optimizer=optimizer, lr=lr, gate=gate, device=device)
    data = [{t: getattr(p, t) for t in ("main", "aux", "test")} for p in pairs]
    for d in data:
        for t in d.values():
            t.x, t.y = t.x.to(stack.device), t.y.to(stack.device)
    samplers = {
        (g, s, task): EpochSampler(len(data[g][task]), batch_size, 1_000_003 * s + 101 * g + (task == "aux"))
        for g in range(len(pairs))
        for s in seeds
        for task in ("main", "aux")
    }
    heldout = any(base_method(m)[1] for m in methods)
    if heldout:
        if any(p.reference is None for p in pairs):
            raise ValueError("A held-out method needs every pair's reference split (build it with reference_fraction).")
        for d, p in zip(data, pairs):
            assert p.reference is not None
            d["reference"] = p.reference
            p.reference.x, p.reference.y = p.reference.x.to(stack.device), p.reference.y.to(stack.device)
        for g in range(len(pairs)):
            for s in seeds:
                samplers[(g, s, "reference")] = EpochSampler(
                    len(data[g]["reference"]), batch_size, 1_000_003 * s + 101 * g + 2
                )
    groups = {
        g: torch.tensor([i for i, r in enumerate(runs) if r.group == g], device=stack.device) for g in range(len(pairs))
    }
    rows: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    since: list[tuple[Tensor, Tensor, Tensor]] = []
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        cos = torch.stack([c for c, _, _ in since]).double().mean(0).tolist() if since else None
        opened = torch.stack([o for _, o, _ in since]).double().mean(0).tolist() if since else None
        loss = torch.stack([m for _, _, m in since]).double().mean(0).tolist() if since else None
        for g, idx in groups.items():
            acc = stack.accuracy(data[g]["test"].x, data[g]["test"].y, index=idx).tolist()
            for a, i in zip(acc, idx.tolist()):
                r = runs[i]
                rows.append(
                    {
                        "pair": pairs[g].label,
                        "kind": pairs[g].kind,
                        "method": r.method,
                        "seed": r.seed,
                        "step": step,
                        "test_accuracy": a,
                        "cosine": None if cos is None else cos[i],
                        "open_fraction": None if opened is None else opened[i],
                        "train_main_loss": None if loss is None else loss[i],
                    }
                )
        since.clear()

    evaluate(0)
    for step in tqdm(range(1, steps + 1), desc="pairs: training all runs", disable=not progress):
        picks = {key: s.next() for key, s in samplers.items()}
        batches = []
        for task in ("main", "aux", "reference") if heldout else ("main", "aux"):
            idx = [picks[(r.group, r.seed, task)] for r in runs]
            x = torch.stack([data[r.group][task].x[i.to(stack.device)] for r, i in zip(runs, idx)])
            y = torch.stack([data[r.group][task].y[i.to(stack.device)] for r, i in zip(runs, idx)])
            batches.append((x, y))
        st = stack.step(batches[0], batches[1], batches[2] if heldout else None)
        cos, opened = st.cosine.detach().cpu(), st.gate_open.detach().cpu()
        since.append((cos, opened, st.main_loss.detach().cpu()))
        for i, r in enumerate(runs):
            step_rows.append(
                {
                    "pair": pairs[r.group].label,
                    "kind": pairs[r.group].kind,
                    "method": r.method,
                    "seed": r.seed,
                    "step": step,
                    "cosine": float(cos[i]),
                    "gate_open": int(opened[i]),
                }
            )
        if step % eval_every == 0 or step == steps:
            evaluate(step)
    return PairsResult(rows, step_rows, list(pairs), time.perf_counter() - start)


def _parse_pair(text: str, flag: str) -> tuple[str, str]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"{flag} takes two classes separated by a comma, e.g. {flag} trimaran,catamaran; got {text!r}."
        )
    return parts[0], parts[1]


def _build_pairs(args: argparse.Namespace, reference_fraction: float = 0.0) -> tuple[list[PairData], list[str], Any]:
    from .pairs_data import imagenet_pair, load_mnist, mnist_pair

    if reference_fraction:
        notes_ref = (
            f"held-out reference split: {reference_fraction:.0%} of each class's training images, cut for every "
            "method of this command (a held-out method is in it); no method trains on it"
        )

    notes: list[str] = [notes_ref] if reference_fraction else []
    choice = None
    if args.source == "mnist":
        x_tr, y_tr, x_te, y_te, note = load_mnist(args.root)
        notes.append(note)
        if args.near and args.far:
            near, far = _parse_pair(args.near, "--near"), _parse_pair(args.far, "--far")
            notes.append("near and far pairs given by hand (--near/--far), not picked")
        else:
            if args.near or args.far:
                raise ValueError("With --source mnist give both --near and --far, or neither (then both are picked).")
            from .pair_select import class_feature_sets, pick_pairs

            choice = pick_pairs(class_feature_sets(x_tr, y_tr, args.features), args.features)
            near, far = choice.near, choice.far
            other = "random_conv" if args.features == "pixels" else "pixels"
            check = pick_pairs(class_feature_sets(x_tr, y_tr, other), other)
            agree = "the same pairs" if (check.near, check.far) == (near, far) else "DIFFERENT pairs"
            notes.append(
                f"check: `{other}` features pick near {'/'.join(check.near)} and far {'/'.join(check.far)} ({agree})"
            )
        pairs = [
            mnist_pair(
                x_tr,
                y_tr,
                x_te,
                y_te,
                *pair,
                kind=kind,
                max_per_class=args.max_per_class,
                reference_fraction=reference_fraction,
            )  # fmt: skip
            for pair, kind in ((near, "near"), (far, "far"))
        ]
        return pairs, notes, choice
    near = _parse_pair(args.near, "--near") if args.near else PAPER_NEAR
    far = _parse_pair(args.far, "--far") if args.far else PAPER_FAR
    kw = dict(
        source=args.source,
        map_file=args.map_file,
        image_size=args.image_size,
        max_per_class=args.max_per_class,
        reference_fraction=reference_fraction,
    )
    pairs = [imagenet_pair(args.root, *near, kind="near", **kw), imagenet_pair(args.root, *far, kind="far", **kw)]
    notes.append(f"ImageNet ({args.source}) under {args.root}, images {args.image_size}x{args.image_size}")
    return pairs, notes, choice


@user_errors("gradsim pairs")
def main(argv: list[str] | None = None) -> int:
    """``gradsim pairs [--source mnist|imagefolder|downsampled] --root DIR [...]``"""
    p = command_parser(
        prog="gradsim pairs",
        description="Paper Figure 3: single-task / multi-task / gate on a near and a far class pair.",
    )
    p.add_argument("--source", default="imagefolder", choices=["imagefolder", "downsampled", "mnist"])
    p.add_argument(
        "--root",
        required=True,
        help="ImageNet folder (train/ val/ of WNID folders), downsampled files, or MNIST folder holding MNIST/raw",
    )
    p.add_argument("--map-file", help="map_clsloc.txt or meta.mat (downsampled ImageNet)")
    p.add_argument("--near", help="A,B: near pair (ImageNet default trimaran,catamaran; MNIST default: picked)")
    p.add_argument("--far", help="C,D: far pair (ImageNet default traffic light,rock python; MNIST default: picked)")
    p.add_argument(
        "--features",
        default="pixels",
        choices=["pixels", "random_conv"],
        help="MNIST: class features for picking the pairs",
    )
    p.add_argument(
        "--methods",
        default="main_only,sum,unweighted",
        help="comma-separated methods (any registered, or unweighted_heldout / weighted_heldout)",
    )
    p.add_argument("--seeds", type=int_at_least(1), default=3, help="seeds 0..N-1")
    p.add_argument("--steps", type=int_at_least(1))
    p.add_argument("--eval-every", type=int_at_least(1))
    p.add_argument("--batch-size", type=int_at_least(1), help="images per task per step")
    p.add_argument("--lr", type=float_in(0, low_open=True))
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "rmsprop"])
    p.add_argument(
        "--model", help="small_cnn, tiny_cnn or a timm name (default: small_cnn for MNIST, resnetv2_18 for ImageNet)"
    )
    p.add_argument("--aux-weight", type=float_in(0), default=1.0)
    p.add_argument("--threshold", type=float_in(-1, 1), default=0.0)
    p.add_argument("--image-size", type=int_at_least(8), default=64, help="ImageNet image side")
    p.add_argument("--max-per-class", type=int_at_least(2), help="use at most this many images per class (quick runs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join("runs", "pairs"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    check_path(args.root, "--root", "any")
    check_path(args.map_file, "--map-file")
    check_device(args.device)
    check_out_dir(args.out, "--out")
    start = time.perf_counter()
    d = DEFAULTS["mnist" if args.source == "mnist" else "imagenet"]
    settings = {k: getattr(args, k) if getattr(args, k) is not None else d[k] for k in d}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        from ..methods import list_methods

        unknown = [m for m in methods if base_method(m)[0] not in list_methods()]
        if unknown or not methods:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(list_methods())}.")
        pairs, notes, choice = _build_pairs(args, reference_fraction_for(methods))
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    for pair in pairs:
        print(
            f"{pair.kind} pair: main '{pair.main_name}' ({pair.main_class}) "
            f"vs aux '{pair.aux_name}' ({pair.aux_class}); "
            f"{len(pair.main)} main / {len(pair.aux)} aux training images, {len(pair.test)} test images"
        )
    result = train_pairs(
        pairs,
        methods,
        list(range(args.seeds)),
        settings["steps"],
        settings["eval_every"],
        settings["batch_size"],
        settings["model"],
        args.optimizer,
        settings["lr"],
        {"aux_weight": args.aux_weight, "threshold": args.threshold},
        args.device,
        not args.no_progress,
    )
    result.notes = notes
    from .pairs_report import write_outputs

    config = {
        **settings,
        "source": args.source,
        "methods": methods,
        "seeds": args.seeds,
        "optimizer": args.optimizer,
        "aux_weight": args.aux_weight,
        "threshold": args.threshold,
        "device": args.device,
        "features": args.features,
        "image_size": args.image_size if args.source != "mnist" else None,
        "max_per_class": args.max_per_class,
    }
    summary = write_outputs(result, args.out, config, choice, start)
    print(summary)
    return 0
