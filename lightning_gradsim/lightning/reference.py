"""Held-out reference batches for ``GradSimMixin``: the main task's loss on them is what each auxiliary cosine
is measured against (``gate.backward(..., reference_loss=...)``) when the module defines ``reference_loss``.

The batches come from ``trainer.datamodule.reference_dataloader()`` (the class-pair and Table 1 datamodules
carve it from the *training* data with ``reference_fraction > 0``), or from the module's own
``gradsim_reference_dataloader()``. :class:`ReferenceBatches` cycles through the loader, one batch per measured
step, and counts what it drew; a checkpoint keeps the count and a resumed run draws the same batches again
(it replays the loader from its start, so a seeded shuffle repeats).

>>> batches = ReferenceBatches()
>>> [batches.next(lambda: [1, 2, 3]) for _ in range(4)], batches.state_dict()
([1, 2, 3, 1], {'drawn': 4})
>>> resumed = ReferenceBatches()
>>> resumed.load_state_dict({"drawn": 4})
>>> resumed.next(lambda: [1, 2, 3])
2
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["ReferenceBatches", "datamodule_reference_loader"]


class ReferenceBatches:
    """An endless, resumable walk through a reference loader (see the module docstring)."""

    def __init__(self) -> None:
        self.drawn = 0
        self._skip = 0
        self._iterator: Iterator[Any] | None = None
        self._loader: Iterable[Any] | None = None

    def next(self, make_loader: Callable[[], Iterable[Any]]) -> Any:
        """The next batch (the loader is made on first use, and iterated again when it is exhausted)."""
        if self._loader is None:
            self._loader = make_loader()
            for _ in range(self._skip):  # resume: replay what the interrupted run drew
                self._draw()
            self._skip = 0
        self.drawn += 1
        return self._draw()

    def _draw(self) -> Any:
        assert self._loader is not None
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self._loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None
        raise ValueError("The reference loader yields no batch: give it at least one held-out example.")

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.drawn = self._skip = int(state.get("drawn", 0))
        self._iterator = self._loader = None


def datamodule_reference_loader(trainer: Any) -> Iterable[Any]:
    """``trainer.datamodule.reference_dataloader()``, or a clear error that says how to provide one."""
    dm = getattr(trainer, "datamodule", None)
    make = getattr(dm, "reference_dataloader", None)
    if callable(make) and getattr(dm, "reference_fraction", 1.0) > 0:
        loader: Iterable[Any] = make()
        return loader
    raise ValueError(
        "The module defines reference_loss(batch), so the gate measures each auxiliary cosine against a held-out "
        "batch, but there is no reference loader: use a datamodule with reference_fraction > 0 (its "
        "reference_dataloader() holds out that share of the training data), or override "
        "gradsim_reference_dataloader() in the module."
    )
