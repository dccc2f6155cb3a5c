"""Class distances (paper appendix D.1): LCA level in the ImageNet hierarchy vs Fréchet distance.

* LCA level: :meth:`lightning_gradsim.data.ImageNetHierarchy.lca_level` (see its docs for the DAG rule).
* Fréchet distance between two classes: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` of
  the two classes' embeddings (mean ``mu``, covariance ``S``) under any timm backbone -- the FID
  formula with a custom feature extractor. Weights are random unless ``--pretrained`` (which lets
  timm download them) or ``--checkpoint`` (a local ``state_dict`` file) is given: nothing is
  fetched silently, and random features are only useful for testing the pipeline.

``gradsim distances`` samples class pairs per LCA level, embeds each class's images once, computes
both distances with a progress bar, writes ``distances.csv`` and draws the LCA-vs-FD scatter
(the paper's Figure 10) as ``lca_vs_fid.png``.

Example::

    gradsim distances --root /data/imagenet --hierarchy wordnet.is_a.txt --pretrained --per-level 10
    fd = frechet_distance(features_a, features_b)   # (N, D) tensors
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["frechet_distance", "gaussian_frechet_distance", "class_features", "class_distances", "main"]


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
            f"Need two (N, D) feature matrices with the same D, got {tuple(features_a.shape)} and {tuple(features_b.shape)}."
        )
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError("Each class needs at least 2 images for a covariance.")
    a, b = features_a.double(), features_b.double()
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


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
) -> dict[str, Tensor]:
    from ..data.class_pair import IMAGENET_MEAN, IMAGENET_STD, _ArrayPool, _FolderPool
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
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = {}
    for w in sorted(wnids):
        idx = np.flatnonzero(pool.labels == w)
        if len(idx) < 2:
            raise ValueError(f"Class {w} has {len(idx)} image(s) under {root}; need at least 2.")
        idx = rng.permutation(idx)[:per_class]
        out[w] = (torch.stack([pool.load(int(i)) for i in idx]) - mean) / std
    return out


def class_distances(
    root: str,
    hierarchy: str,
    source: str = "imagefolder",
    map_file: str | None = None,
    backbone: str = "resnetv2_18",
    pretrained: bool = False,
    checkpoint: str | None = None,
    per_level: int = 5,
    levels: Sequence[int] | None = None,
    images_per_class: int = 50,
    image_size: int = 64,
    split: str = "train",
    seed: int = 0,
    out_dir: str | os.PathLike = "runs/distances",
    device: str = "cpu",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Sample pairs per LCA level among the classes present under ``root``; write CSV and PNG; return rows."""
    from tqdm.auto import tqdm

    from ..data import ImageNetHierarchy
    from ..data.imagenet import class_name, scan_image_folder
    from ..models import build_trunk

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
    wanted = {w for items in pairs.values() for pair in items for w in pair}
    images = _load_class_images(root, source, map_file, wanted, images_per_class, image_size, seed, split)
    model, _ = build_trunk(backbone, in_chans=3, pretrained=pretrained)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        missing, _unexpected = model.load_state_dict(state.get("state_dict", state), strict=False)
        if len(missing) == len(list(model.state_dict())):
            raise ValueError(f"{checkpoint} holds no weight of backbone {backbone!r}.")
    feats = {
        w: class_features(model, x, device=device)
        for w, x in tqdm(images.items(), desc="embedding classes", disable=not progress)
    }
    rows = []
    flat = [(lv, a, b) for lv, items in pairs.items() for a, b in items]
    for level, a, b in tqdm(flat, desc="pair distances", disable=not progress):
        rows.append(
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
    with open(out / "distances.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _scatter(rows, out / "lca_vs_fid.png", backbone, pretrained or checkpoint is not None)
    return rows


def _scatter(rows: list[dict[str, Any]], path: Path, backbone: str, trained: bool) -> None:
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
    ax.set_title("class pairs: LCA level vs Fréchet distance", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``gradsim distances --root DIR --hierarchy FILE [...]``"""
    p = argparse.ArgumentParser(
        prog="gradsim distances", description="LCA level vs Fréchet distance of ImageNet class pairs (paper Fig. 10)."
    )
    p.add_argument("--root", required=True, help="ImageNet folder (ImageFolder layout) or downsampled-ImageNet folder")
    p.add_argument("--hierarchy", required=True, help="wordnet.is_a.txt or the devkit's meta.mat")
    p.add_argument("--source", default="imagefolder", choices=["imagefolder", "downsampled"])
    p.add_argument("--map-file", help="map_clsloc.txt or meta.mat (downsampled source)")
    p.add_argument("--split", default="train", help="sub-folder / split whose images are embedded")
    p.add_argument("--backbone", default="resnetv2_18", help="timm model name (or tiny_cnn)")
    p.add_argument("--pretrained", action="store_true", help="let timm download pretrained weights")
    p.add_argument("--checkpoint", help="local state_dict file for the backbone")
    p.add_argument("--per-level", type=int, default=5)
    p.add_argument("--levels", type=int, nargs="+")
    p.add_argument("--images-per-class", type=int, default=50)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=os.path.join("runs", "distances"))
    args = p.parse_args(argv)
    if not args.pretrained and args.checkpoint is None:
        print(
            "gradsim distances: note: random backbone weights (no --pretrained/--checkpoint); distances only test the pipeline."
        )
    try:
        rows = class_distances(
            args.root,
            args.hierarchy,
            args.source,
            args.map_file,
            args.backbone,
            args.pretrained,
            args.checkpoint,
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
        print(f"gradsim distances: {err}")
        return 2
    for level in sorted({r["lca_level"] for r in rows}):
        vals = [r["frechet_distance"] for r in rows if r["lca_level"] == level]
        print(f"LCA level {level}: {len(vals)} pair(s), mean Fréchet distance {np.mean(vals):.3f}")
    print(f"wrote {os.path.join(args.out_dir, 'distances.csv')} and {os.path.join(args.out_dir, 'lca_vs_fid.png')}")
    return 0
