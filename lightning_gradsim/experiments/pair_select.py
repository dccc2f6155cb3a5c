"""Pick a near and a far class pair by the Fréchet distance of class features (paper appendix D.1).

The paper embeds each class's images with a pretrained ResNetV2-50 and takes the FID formula
between two classes' embeddings. Without pretrained weights (nothing is downloaded here), the
stand-in features for small grayscale images such as MNIST are:

* ``"pixels"`` (default): the images' pixels projected on the top ``dim`` principal components
  of all training images (every class together). MNIST digits are centred and size-normalised,
  so pixel space is a meaningful appearance space for them; the projection keeps the covariance
  estimable (a class has hundreds of images, pixel space has 784 dimensions).
* ``"random_conv"``: a fixed, seeded bank of 32 random 5x5 filters (stride 2), ReLU, average pooling to a 4x4 grid, then
  the same projection -- a check that the choice of pixels does not decide the pairs.

Neither is the paper's Inception/ResNetV2 embedding. The near pair is the pair with the smallest
distance, the far pair the one with the largest (ties: the first in sorted order); the class with the
smaller label of a pair is the main task, the other the auxiliary task.

Example:

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> feats = {c: torch.randn(200, 2, generator=g, dtype=torch.float64) + shift
...          for c, shift in (("a", 0.0), ("b", 0.2), ("c", 5.0))}
>>> choice = pick_pairs(feats)
>>> choice.near, choice.far
(('a', 'b'), ('a', 'c'))
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .distances import frechet_distance

__all__ = ["PairChoice", "pick_pairs", "class_feature_sets", "FEATURES"]

FEATURES = ("pixels", "random_conv")


@dataclass(frozen=True)
class PairChoice:
    """The picked pairs and every pair's distance (``distances[(a, b)]``, ``a < b`` in sorted order)."""

    near: tuple[str, str]
    far: tuple[str, str]
    distances: dict[tuple[str, str], float]
    features: str = "given"

    def ranked(self) -> list[tuple[tuple[str, str], float]]:
        """All pairs from nearest to farthest."""
        return sorted(self.distances.items(), key=lambda kv: (kv[1], kv[0]))


def pick_pairs(features: Mapping[str, Tensor], features_name: str = "given") -> PairChoice:
    """Fréchet distance of every pair of classes (``{class: (N, D) features}``); nearest and farthest pair."""
    classes = sorted(features, key=_label_key)
    if len(classes) < 3:
        raise ValueError(f"Picking a near and a far pair needs at least 3 classes, got {classes}.")
    distances = {(a, b): frechet_distance(features[a], features[b]) for a, b in itertools.combinations(classes, 2)}
    order = {k: i for i, k in enumerate(distances)}  # ties: the first pair in sorted class order
    near = min(distances, key=lambda k: (distances[k], order[k]))
    far = min(distances, key=lambda k: (-distances[k], order[k]))
    return PairChoice(near, far, distances, features_name)


def _label_key(c: str) -> tuple[int, str]:
    # digits sort numerically ("2" < "10"), everything else as text
    return (int(c), c) if c.isdigit() else (1 << 30, c)


def class_feature_sets(
    images: Tensor, labels: Sequence[str] | Tensor, kind: str = "pixels", dim: int = 32, seed: int = 0
) -> dict[str, Tensor]:
    """``{class: (N_c, dim) float64 features}`` of ``images`` ``(N, C, H, W)`` (see the module docs)."""
    if kind not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {kind!r}.")
    x = images.double().flatten(1) if kind == "pixels" else _random_conv(images, seed)
    x = x - x.mean(0)
    # principal directions of all images together (eigh of the covariance: deterministic)
    evals, evecs = torch.linalg.eigh(x.T @ x / max(1, len(x) - 1))
    z = x @ evecs[:, -min(dim, x.shape[1]) :].flip(-1)
    labels = [str(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    names = sorted(set(labels), key=_label_key)
    index = {c: torch.tensor([i for i, v in enumerate(labels) if v == c]) for c in names}
    return {c: z[index[c]] for c in names}


@torch.no_grad()
def _random_conv(images: Tensor, seed: int, filters: int = 32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(filters, images.shape[1], 5, 5, generator=g)
    w = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    out = []
    for i in range(0, len(images), 1024):
        h = F.relu(F.conv2d(images[i : i + 1024].float(), w, stride=2, padding=2))
        out.append(F.adaptive_avg_pool2d(h, 4).flatten(1))
    return torch.cat(out).double()
