"""ImageNetHierarchy: LCA levels hand-computed on a tiny hierarchy, read from is_a text and from meta.mat."""

from __future__ import annotations

import pytest

from lightning_gradsim.data import ImageNetHierarchy

from .._imagenet_fixtures import make_is_a, make_meta_mat

TRIMARAN, CATAMARAN, HUSKY, MALAMUTE, LIGHT = "n04483307", "n02981792", "n02110185", "n02110063", "n06874185"


@pytest.fixture(params=["is_a", "meta_mat"])
def hierarchy(request, tmp_path):
    if request.param == "is_a":
        return ImageNetHierarchy.from_file(make_is_a(tmp_path / "wordnet.is_a.txt"))
    return ImageNetHierarchy.from_file(make_meta_mat(tmp_path / "meta.mat"))


def test_lca_levels_by_hand(hierarchy):
    h = hierarchy
    assert h.lca_level(TRIMARAN, TRIMARAN) == 0
    assert h.lca_level(TRIMARAN, CATAMARAN) == 1  # shared parent "boat"
    assert h.lca_level(HUSKY, MALAMUTE) == 1  # shared parent "dog"
    assert h.lca_level(TRIMARAN, HUSKY) == 3  # entity: 2 up from trimaran, 3 up from husky -> max 3
    assert h.lca_level(HUSKY, TRIMARAN) == 3  # symmetric
    assert h.lca_level(TRIMARAN, LIGHT) == 2
    # DAG: catamaran has a second parent, entity itself, so it is 1 (not 2) below entity
    assert h.lca_level(CATAMARAN, LIGHT) == 1
    assert h.lowest_common_ancestor(TRIMARAN, CATAMARAN) == ("n02858304", 1)
    assert h.is_leaf(TRIMARAN) and not h.is_leaf("n02858304")
    assert set(h.leaves()) == {TRIMARAN, CATAMARAN, HUSKY, MALAMUTE, LIGHT}


def test_sample_pairs_per_level(hierarchy):
    pairs = hierarchy.sample_pairs(hierarchy.leaves(), per_level=5, seed=0)
    assert {lv: len(p) for lv, p in pairs.items()} == {1: 3, 2: 1, 3: 5}
    for level, items in pairs.items():
        assert all(hierarchy.lca_level(a, b) == level for a, b in items)


def test_hierarchy_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet.is_a.txt"):
        ImageNetHierarchy.from_file(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("n1 n2 n3\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        ImageNetHierarchy.from_file(bad)
    h = ImageNetHierarchy([("a", "b"), ("c", "d")])
    with pytest.raises(ValueError, match="no common ancestor"):
        h.lca_level("b", "d")
    with pytest.raises(KeyError, match="not in the hierarchy"):
        h.lca_level("b", "zzz")
