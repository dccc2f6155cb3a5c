"""Class distances (paper appendix D.1): LCA level in the ImageNet hierarchy vs Fréchet distance.

* LCA level: :meth:`lightning_gradsim.data.ImageNetHierarchy.lca_level` (see its docs for the DAG rule).
* Fréchet distance between two classes: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` of
  the two classes' embeddings (mean ``mu``, covariance ``S``): the FID formula on the penultimate
  layer (pooled features) of a timm backbone.

**D.1's protocol** is a *pretrained* ResNetV2-50 and 50 random pairs per LCA level. The command
follows it when you have the weights: ``--weights FILE`` (a local ``state_dict``, ``.pth``/``.bin``/
``.safetensors``) or ``--pretrained`` (timm's pretrained weights, read from the local Hugging Face /
timm cache only). Nothing is downloaded at run time. Every departure -- random weights (no weights
given), another backbone, fewer pairs per level asked for or found -- is a *fallback*: printed,
written to ``protocol.md`` beside the results, and put in the scatter plot's labels. Random weights
only test the pipeline: their distances say little about how alike two classes look.

``gradsim distances`` samples class pairs per LCA level, embeds each class's images once, computes
both distances with a progress bar, writes ``distances.csv``, ``protocol.md`` and the LCA-vs-FD
scatter (the paper's Figure 10) as ``lca_vs_fid.png``.

Example::

    gradsim distances --root /data/imagenet --hierarchy wordnet.is_a.txt --weights resnetv2_50.safetensors
    fd = frechet_distance(features_a, features_b)   # (N, D) tensors
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..cli_checks import UsageError, check_device, check_out_dir, check_path, command_parser, int_at_least, user_errors
from .csv_rows import write_csv

__all__ = [
    "frechet_distance",
    "gaussian_frechet_distance",
    "class_features",
    "class_distances",
    "d1_fallbacks",
    "DistancesResult",
    "main",
]


def gaussian_frechet_distance(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Fréchet distance between Gaussians ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)`` (float64)."""
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    # tr((A B)^{1/2}) = sum of square roots of the eigenvalues of A B, which are real and >= 0
    eig = torch.linalg.eigvals(cov_a @ cov_b)
    trace_sqrt = eig.real.clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt
    return float(value.clamp(min=0))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two ``(N, D)`` feature sets (N >= 2 each)."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"Need two (N, D) feature matrices with the same D, "
            f"got {tuple(features_a.shape)} and {tuple(features_b.shape)}."
        )
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("Each class needs at least 2 images for a covariance.")
    a, b = features_a.double(), features_b.double()
    (na, dim), nb = a.shape, len(b)
    if na * nb > dim * dim:
        return gaussian_frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    # Fewer images than dimensions (e.g. 50 images, 2048 features): with S = X^T X / (n - 1) for the
    # centred X, the non-zero eigenvalues of S_a S_b are the squared singular values of
    # X_a X_b^T / sqrt((n_a - 1)(n_b - 1)), so tr((S_a S_b)^{1/2}) is their sum: an n_a x n_b problem.
    ac, bc = a - a.mean(0), b - b.mean(0)
    trace_sqrt = torch.linalg.svdvals(ac @ bc.T).sum() / math.sqrt((na - 1) * (nb - 1))
    value = (
        (a.mean(0) - b.mean(0)).pow(2).sum() + ac.pow(2).sum() / (na - 1) + bc.pow(2).sum() / (nb - 1) - 2 * trace_sqrt
    )
    return float(value.clamp(min=0))


@torch.no_grad()
def class_features(model: nn.Module, images: Tensor, batch_size: int = 64, device: str = "cpu") -> Tensor:
    """Embeddings ``(N, D)`` of ``images`` ``(N, C, H, W)``, in eval mode."""
    model = model.eval().to(device)
    return torch.cat(
        [
            model(images[i : i + batch_size].to(device)).flatten(1).double().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


def _load_class_images(
    root: str,
    source: str,
    map_file: str | None,
    wnids: set[str],
    per_class: int,
    image_size: int,
    seed: int,
    split: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Tensor]:
    from ..data.class_pair import _ArrayPool, _FolderPool
    from ..data.imagenet import DownsampledImageNet

    rng = np.random.default_rng(seed)
    if source == "imagefolder":
        pool: Any = _FolderPool(os.path.join(root, split), image_size)
    elif source == "downsampled":
        if map_file is None:
            raise ValueError(
                "--source downsampled needs --map-file <map_clsloc.txt or meta.mat> (labels follow the devkit order)."
            )
        ds = DownsampledImageNet(
            root, "train" if split == "train" else "val", map_file, keep=lambda w: np.isin(w, list(wnids))
        )
        pool = _ArrayPool(ds.data, ds.wnids, image_size)
    else:
        raise ValueError(f"source must be 'imagefolder' or 'downsampled', got {source!r}.")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = {}
    for w in sorted(wnids):
        idx = np.flatnonzero(pool.labels == w)
        if len(idx) < 2:
            raise ValueError(f"Class {w} has {len(idx)} image(s) under {root}; need at least 2.")
        idx = rng.permutation(idx)[:per_class]
        out[w] = (torch.stack([pool.load(int(i)) for i in idx]) - m) / s
    return out


#: appendix D.1's protocol
D1_BACKBONE = "resnetv2_50"
D1_PAIRS_PER_LEVEL = 50


@dataclass
class DistancesResult:
    """Rows of ``distances.csv`` and the departures from D.1 (empty when the run follows it)."""

    rows: list[dict[str, Any]]
    fallbacks: list[str]
    weights: str


def d1_fallbacks(backbone: str, trained: bool, per_level: int, found: dict[int, int]) -> list[str]:
    """Departures from appendix D.1 (pretrained ResNetV2-50, 50 pairs per LCA level), one line each.

    >>> d1_fallbacks("resnetv2_50", True, 50, {1: 50, 2: 50})
    []
    >>> d1_fallbacks("tiny_cnn", False, 50, {1: 50, 2: 7})[1]
    "other model: 'tiny_cnn' instead of D.1's pretrained ResNetV2-50 ('resnetv2_50')"
    """
    out = []
    if not trained:
        out.append(
            "random weights: no --weights/--pretrained given, so the embedding is untrained and the Fréchet "
            "distances only test the pipeline (they do not measure how alike the classes look)"
        )
    if backbone != D1_BACKBONE:
        out.append(f"other model: {backbone!r} instead of D.1's pretrained ResNetV2-50 ({D1_BACKBONE!r})")
    if per_level < D1_PAIRS_PER_LEVEL:
        out.append(f"fewer pairs: {per_level} per LCA level asked for instead of D.1's {D1_PAIRS_PER_LEVEL}")
    short = {lv: n for lv, n in found.items() if n < per_level}
    if short:
        out.append(
            "fewer pairs found than asked for (not enough classes) at LCA level(s) "
            + ", ".join(f"{lv}: {n}" for lv, n in sorted(short.items()))
        )
    return out


def _protocol_text(
    result: DistancesResult, backbone: str, per_level: int, found: dict[int, int], images: int, size: int
) -> str:
    lines = [
        "# gradsim distances: protocol of this run",
        "",
        "| appendix D.1 says | this run |",
        "|---|---|",
        f"| pretrained ResNetV2-50, penultimate layer | {backbone}, weights: {result.weights} |",
        f"| 50 random pairs per LCA level | {per_level} asked for; found "
        + ", ".join(f"level {lv}: {n}" for lv, n in sorted(found.items()))
        + " |",
        f"| images per class: not given in the paper | {images} |",
        f"| image size: not given in the paper | {size}x{size} |",
        "",
    ]
    if result.fallbacks:
        lines += ["**Falls back from D.1:**", ""] + [f"* {f}" for f in result.fallbacks]
    else:
        lines.append("Follows D.1 (pretrained ResNetV2-50, 50 pairs per level).")
    return "\n".join(lines) + "\n"


def class_distances(
    root: str,
    hierarchy: str,
    source: str = "imagefolder",
    map_file: str | None = None,
    backbone: str = D1_BACKBONE,
    pretrained: bool = False,
    weights: str | None = None,
    per_level: int = D1_PAIRS_PER_LEVEL,
    levels: Sequence[int] | None = None,
    images_per_class: int = 50,
    image_size: int | None = None,
    split: str = "train",
    seed: int = 0,
    out_dir: str | os.PathLike = "runs/distances",
    device: str = "cpu",
    progress: bool = True,
) -> DistancesResult:
    """Sample pairs per LCA level among the classes present under ``root``; write ``distances.csv``,
    ``protocol.md`` and ``lca_vs_fid.png``. ``image_size=None``: the backbone's pretrained input size."""
    from tqdm.auto import tqdm

    from ..data import ImageNetHierarchy
    from ..data.imagenet import class_name, scan_image_folder
    from .backbone_weights import load_backbone

    model, info = load_backbone(backbone, weights, pretrained)
    size = int(image_size or info.input_size)
    h = ImageNetHierarchy.from_file(hierarchy)
    if source == "imagefolder":
        present = set(scan_image_folder(os.path.join(root, split))[1])
    else:
        from ..data.imagenet import read_label_map

        if map_file is None:
            raise ValueError("--source downsampled needs --map-file <map_clsloc.txt or meta.mat>.")
        present = set(read_label_map(map_file).values())
    classes = sorted(present & h.nodes)
    if len(classes) < 2:
        raise ValueError(f"Fewer than 2 classes of {root} are in the hierarchy {hierarchy}; are they WNIDs?")
    pairs = h.sample_pairs(classes, per_level, levels, seed)
    found = {lv: len(items) for lv, items in pairs.items()}
    result = DistancesResult([], d1_fallbacks(backbone, info.trained, per_level, found), info.source)
    wanted = {w for items in pairs.values() for pair in items for w in pair}
    images = _load_class_images(
        root, source, map_file, wanted, images_per_class, size, seed, split, info.mean, info.std
    )
    feats = {
        w: class_features(model, x, device=device)
        for w, x in tqdm(images.items(), desc="embedding classes", disable=not progress)
    }
    flat = [(lv, a, b) for lv, items in pairs.items() for a, b in items]
    for level, a, b in tqdm(flat, desc="pair distances", disable=not progress):
        result.rows.append(
            {
                "wnid_a": a,
                "name_a": class_name(a),
                "wnid_b": b,
                "name_b": class_name(b),
                "lca_level": level,
                "frechet_distance": frechet_distance(feats[a], feats[b]),
            }
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "distances.csv", result.rows)
    (out / "protocol.md").write_text(_protocol_text(result, backbone, per_level, found, images_per_class, size))
    _scatter(result.rows, out / "lca_vs_fid.png", backbone, info.trained, bool(result.fallbacks))
    return result


def _scatter(rows: list[dict[str, Any]], path: Path, backbone: str, trained: bool, fallback: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    x = np.array([r["lca_level"] for r in rows], float)
    y = np.array([r["frechet_distance"] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter(x + rng.uniform(-0.12, 0.12, len(x)), y, s=14, alpha=0.7)
    ax.set_xlabel("LCA level (WordNet)")
    ax.set_ylabel(f"Fréchet distance ({backbone}{'' if trained else ', random weights'})")
    title = "class pairs: LCA level vs Fréchet distance"
    ax.set_title(title + (" (falls back from D.1: see protocol.md)" if fallback else ""), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@user_errors("gradsim distances")
def main(argv: list[str] | None = None) -> int:
    """``gradsim distances --root DIR --hierarchy FILE [--weights FILE | --pretrained] [...]``"""
    p = command_parser(
        prog="gradsim distances",
        description="LCA level vs Fréchet distance of ImageNet class pairs (paper app. D.1, Fig. 10).",
    )
    p.add_argument("--root", required=True, help="ImageNet folder (ImageFolder layout) or downsampled-ImageNet folder")
    p.add_argument("--hierarchy", required=True, help="wordnet.is_a.txt or the devkit's meta.mat")
    p.add_argument("--source", default="imagefolder", choices=["imagefolder", "downsampled"])
    p.add_argument("--map-file", help="map_clsloc.txt or meta.mat (downsampled source)")
    p.add_argument("--split", default="train", help="sub-folder / split whose images are embedded")
    p.add_argument("--backbone", default=D1_BACKBONE, help=f"timm model name (or tiny_cnn); D.1: {D1_BACKBONE}")
    p.add_argument(
        "--weights", "--checkpoint", dest="weights", help="local weights file of the backbone (.pth/.bin/.safetensors)"
    )
    p.add_argument(
        "--pretrained", action="store_true", help="timm's pretrained weights from the LOCAL cache (never downloaded)"
    )
    p.add_argument(
        "--per-level",
        type=int_at_least(1),
        default=D1_PAIRS_PER_LEVEL,
        help=f"pairs per LCA level (D.1: {D1_PAIRS_PER_LEVEL})",
    )
    p.add_argument("--levels", type=int_at_least(1), nargs="+")
    p.add_argument("--images-per-class", type=int_at_least(2), default=50)
    p.add_argument(
        "--image-size", type=int_at_least(8), help="default: the backbone's pretrained input size (224 for resnetv2_50)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=os.path.join("runs", "distances"))
    args = p.parse_args(argv)
    check_path(args.root, "--root", "dir")
    check_path(args.hierarchy, "--hierarchy")
    check_path(args.map_file, "--map-file")
    check_path(args.weights, "--weights")
    check_device(args.device)
    check_out_dir(args.out_dir, "--out-dir")
    try:
        result = class_distances(
            args.root,
            args.hierarchy,
            args.source,
            args.map_file,
            args.backbone,
            args.pretrained,
            args.weights,
            args.per_level,
            args.levels,
            args.images_per_class,
            args.image_size,
            args.split,
            args.seed,
            args.out_dir,
            args.device,
        )
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    if result.fallbacks:
        print("gradsim distances: FALLS BACK from appendix D.1 (pretrained ResNetV2-50, 50 pairs per LCA level):")
        for line in result.fallbacks:
            print(f"  - {line}")
    else:
        print(f"gradsim distances: follows appendix D.1 ({args.backbone}, weights: {result.weights}).")
    for level in sorted({r["lca_level"] for r in result.rows}):
        vals = [r["frechet_distance"] for r in result.rows if r["lca_level"] == level]
        print(f"LCA level {level}: {len(vals)} pair(s), mean Fréchet distance {np.mean(vals):.3f}")
    print(f"wrote distances.csv, protocol.md and lca_vs_fid.png under {args.out_dir}")
    return 0
