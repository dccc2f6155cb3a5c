"""The gate across processes (``torch.distributed``; no Lightning): collectives and the sync modes.

One registry, :data:`~lightning_gradsim.parallel.registry.SYNC_MODES`, names every way to keep the
processes of a run in step — the gradient transform each mode adds to a step and what the mode
refuses. One module per mode: ``ddp_global`` (:class:`AllReduce`), ``ddp_sharded``
(:class:`ReduceScatter`), ``ddp_local`` (:class:`AllReduceCombined`), ``fsdp2`` (:class:`FSDPShards`).
A new sync mode is one module here and one registry entry.

>>> sorted(SYNC_MODES)
['fsdp2', 'global', 'local', 'sharded']
"""

from __future__ import annotations

from .collectives import all_gather, all_reduce_mean, broadcast_buffers, reduce_scatter, world_size
from .ddp_global import AllReduce
from .ddp_local import AllReduceCombined
from .ddp_sharded import ReduceScatter
from .fsdp2 import FSDPShards
from .registry import SYNC_MODES, SyncMode, check_sync_buffers, check_sync_mode

__all__ = [
    "SYNC_MODES",
    "SyncMode",
    "check_sync_mode",
    "check_sync_buffers",
    "AllReduce",
    "AllReduceCombined",
    "ReduceScatter",
    "FSDPShards",
    "world_size",
    "all_reduce_mean",
    "broadcast_buffers",
    "reduce_scatter",
    "all_gather",
]
