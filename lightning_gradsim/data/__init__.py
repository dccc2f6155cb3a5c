"""Datamodules and datasets of the paper's experiments.

Example::

    from lightning_gradsim.data import ClassPairDataModule, ImageNetHierarchy, RotatedDigitsDataModule
"""

from ._common import REFERENCE_FRACTION
from .celeba import CelebADataModule, CelebAMultiTask
from .class_pair import BinaryTaskDataset, ClassPairDataModule, balanced_negatives
from .digits import RotatedDigitsDataModule, rotate_images
from .hierarchy import ImageNetHierarchy
from .imagenet import PAIR_PRESETS, DownsampledImageNet, read_label_map, resolve_class, scan_image_folder

__all__ = [
    "REFERENCE_FRACTION",
    "ClassPairDataModule",
    "ImageNetHierarchy",
    "RotatedDigitsDataModule",
    "DownsampledImageNet",
    "BinaryTaskDataset",
    "PAIR_PRESETS",
    "balanced_negatives",
    "read_label_map",
    "resolve_class",
    "rotate_images",
    "scan_image_folder",
]
