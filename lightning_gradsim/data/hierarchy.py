"""The ImageNet (WordNet) hierarchy and the lowest-common-ancestor level of two classes (paper app. D.1).

Formats read by :meth:`ImageNetHierarchy.from_file`:

* ImageNet's ``wordnet.is_a.txt``: one ``"<parent wnid> <child wnid>"`` per line;
* the ILSVRC2012 devkit's ``meta.mat``: the ``synsets`` struct array (``ILSVRC2012_ID``, ``WNID``,
  ``children`` as ILSVRC2012 IDs), read with scipy.

**LCA level.** A leaf class is level 0. The distance from a class up to an ancestor is the number
of is-a edges on the *shortest* upward path. The LCA level of classes ``a`` and ``b`` is

    ``min over common ancestors c of max(dist(a, c), dist(b, c))``

so two classes sharing a parent have level 1 (trimaran / catamaran), and a class with itself has
level 0. WordNet is a DAG (some synsets have several parents): every parent is followed, and the
common ancestor that is closest in the sense above is the LCA, whichever parent path reaches it.

Example::

    h = ImageNetHierarchy.from_file("wordnet.is_a.txt")
    h.lca_level("n04483307", "n02981792")  # trimaran, catamaran -> 1
"""

from __future__ import annotations

import os
import random
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["ImageNetHierarchy"]


class ImageNetHierarchy:
    """An is-a DAG over WordNet IDs with :meth:`lca_level`.

    Args:
        edges: ``(parent, child)`` pairs.
    """

    def __init__(self, edges: Iterable[tuple[str, str]]) -> None:
        self.parents: dict[str, set[str]] = defaultdict(set)
        self.children: dict[str, set[str]] = defaultdict(set)
        for parent, child in edges:
            if parent == child:
                raise ValueError(f"Self-loop {parent} -> {child} in the hierarchy.")
            self.parents[child].add(parent)
            self.children[parent].add(child)
        self.nodes = set(self.parents) | set(self.children)
        self._up: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ImageNetHierarchy:
        """Read ``wordnet.is_a.txt`` (text) or the devkit's ``meta.mat`` (by extension ``.mat``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No hierarchy file at {path}: pass ImageNet's wordnet.is_a.txt or the ILSVRC2012 devkit's "
                "data/meta.mat."
            )
        if path.suffix.lower() == ".mat":
            return cls.from_meta_mat(path)
        return cls.from_is_a(path)

    @classmethod
    def from_is_a(cls, path: str | os.PathLike) -> ImageNetHierarchy:
        """Read ``"<parent> <child>"`` lines (blank lines and ``#`` comments skipped)."""
        edges = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{path}:{lineno}: expected '<parent wnid> <child wnid>', got {line!r}.")
                edges.append((parts[0], parts[1]))
        if not edges:
            raise ValueError(f"{path} holds no '<parent> <child>' line; is it wordnet.is_a.txt?")
        return cls(edges)

    @classmethod
    def from_meta_mat(cls, path: str | os.PathLike) -> ImageNetHierarchy:
        """Read the ``synsets`` of the ILSVRC2012 devkit's ``meta.mat``."""
        from scipy.io import loadmat

        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        if "synsets" not in mat:
            raise ValueError(f"{path} has no 'synsets' variable; is it the ILSVRC2012 devkit's data/meta.mat?")
        synsets = list(_as_iter(mat["synsets"]))
        by_id = {int(s.ILSVRC2012_ID): str(s.WNID) for s in synsets}
        edges = []
        for s in synsets:
            for child in _as_iter(s.children):
                edges.append((str(s.WNID), by_id[int(child)]))
        return cls(edges)

    # ------------------------------------------------------------------ queries
    def is_leaf(self, wnid: str) -> bool:
        return wnid in self.nodes and not self.children.get(wnid)

    def leaves(self) -> list[str]:
        return sorted(n for n in self.nodes if not self.children.get(n))

    def ancestors(self, wnid: str) -> dict[str, int]:
        """Every ancestor of ``wnid`` (itself included, at 0) with its shortest upward distance."""
        if wnid not in self.nodes:
            raise KeyError(f"{wnid!r} is not in the hierarchy (WNIDs look like 'n04483307').")
        if wnid not in self._up:
            dist = {wnid: 0}
            queue = deque([wnid])
            while queue:
                node = queue.popleft()
                for parent in self.parents.get(node, ()):
                    if parent not in dist:
                        dist[parent] = dist[node] + 1
                        queue.append(parent)
            self._up[wnid] = dist
        return self._up[wnid]

    def lowest_common_ancestor(self, wnid_a: str, wnid_b: str) -> tuple[str, int]:
        """``(ancestor, level)``: the common ancestor minimising ``max(dist_a, dist_b)`` (ties: by WNID)."""
        up_a, up_b = self.ancestors(wnid_a), self.ancestors(wnid_b)
        common = [(max(up_a[c], up_b[c]), c) for c in up_a.keys() & up_b.keys()]
        if not common:
            raise ValueError(f"{wnid_a} and {wnid_b} have no common ancestor; is the hierarchy complete?")
        level, node = min(common)
        return node, level

    def lca_level(self, wnid_a: str, wnid_b: str) -> int:
        """Level of the lowest common ancestor counted up from the leaves (same class: 0; siblings: 1)."""
        return self.lowest_common_ancestor(wnid_a, wnid_b)[1]

    def sample_pairs(
        self,
        wnids: Iterable[str],
        per_level: int,
        levels: Iterable[int] | None = None,
        seed: int = 0,
        max_tries: int = 200_000,
    ) -> dict[int, list[tuple[str, str]]]:
        """Up to ``per_level`` random distinct pairs of ``wnids`` per LCA level (seeded)."""
        pool = sorted(set(wnids))
        if len(pool) < 2:
            raise ValueError("sample_pairs needs at least two classes.")
        wanted = None if levels is None else set(levels)
        rng = random.Random(seed)
        found: dict[int, list[tuple[str, str]]] = defaultdict(list)
        seen: set[tuple[str, str]] = set()
        n_pairs = len(pool) * (len(pool) - 1) // 2
        for _ in range(max_tries):
            if len(seen) >= n_pairs:
                break
            a, b = sorted(rng.sample(pool, 2))
            if (a, b) in seen:
                continue
            seen.add((a, b))
            level = self.lca_level(a, b)
            if (wanted is None or level in wanted) and len(found[level]) < per_level:
                found[level].append((a, b))
            if wanted is not None and all(len(found[lv]) >= per_level for lv in wanted):
                break
        return dict(sorted(found.items()))


def _as_iter(x: object) -> list:
    """scipy's squeeze_me turns 1-element arrays into scalars and empty ones into empty arrays."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return list(x.ravel())
    if isinstance(x, Mapping):
        return [x]
    return [x]
