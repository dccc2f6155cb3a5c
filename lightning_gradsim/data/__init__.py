"""Datamodules and datasets of the paper's experiments.

Example::

    from lightning_gradsim.data import ClassPairDataModule, ImageNetHierarchy, RotatedDigitsDataModule
"""

from .digits import RotatedDigitsDataModule

__all__ = ["RotatedDigitsDataModule"]
