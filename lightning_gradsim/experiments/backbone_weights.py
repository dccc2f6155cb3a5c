"""Backbones with pretrained weights from LOCAL files only (nothing is downloaded).

:func:`load_backbone` builds a timm backbone without classifier (or ``tiny_cnn``) and loads, in
this order: a weights file you name (``.safetensors``, or a ``torch.save`` file holding a
``state_dict``, possibly under ``"state_dict"``/``"model"``), or with ``pretrained=True`` timm's
pretrained weights *if they are already in the local Hugging Face cache* (or timm's old
torch-hub cache). Missing weights are a clear error, never a silent download; a file that does not
fit the backbone (any backbone tensor missing or of another shape) is an error too.

Example::

    model, info = load_backbone("resnetv2_50", weights="resnetv2_50_a1h_in1k.safetensors")
    info.trained, info.source            # True, 'file resnetv2_50_a1h_in1k.safetensors'
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightsInfo", "load_backbone", "find_cached_weights", "read_state_dict"]


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from: ``trained`` (False: random init), ``source`` (text),
    and the input ``mean``/``std``/``input_size`` its pretrained configuration expects."""

    trained: bool
    source: str
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # one per input channel
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    input_size: int = 64


def find_cached_weights(name: str) -> str | None:
    """Path of timm's pretrained weights for ``name`` in the local caches, or ``None`` (no network)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        hub_filename: str | None = getattr(cfg, "hf_hub_filename", None)
        names = [hub_filename] if hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if cfg.url:  # a URL, or timm's (URL, file name) pair
        filename = cfg.url[1] if isinstance(cfg.url, tuple) else os.path.basename(cfg.url)
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if path.is_file():
            return str(path)
    return None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from ``.safetensors`` or a ``torch.save`` file (``state_dict``/``model`` keys unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file at {path}; pass a local state_dict (.pth/.bin/.safetensors).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict.")
    return state


def _pretrained_info(name: str) -> WeightsInfo:
    info = WeightsInfo(False, "random init")
    if name != "tiny_cnn":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        if cfg is not None:
            info = WeightsInfo(False, "random init", tuple(cfg.mean), tuple(cfg.std), int(cfg.input_size[-1]))
    return info


def load_backbone(name: str, weights: str | None = None, pretrained: bool = False) -> tuple[nn.Module, WeightsInfo]:
    """``(model, info)``: backbone ``name`` without classifier, with local weights if asked for.

    With weights, the network is built on the ``meta`` device (no random initialisation to pay for)
    and its tensors are taken from the file.
    """
    from ..models import build_trunk

    info = _pretrained_info(name)
    if weights is None and not pretrained:
        return build_trunk(name, in_chans=3)[0], info
    if weights is None:
        weights = find_cached_weights(name)
        if weights is None:
            raise FileNotFoundError(
                f"No pretrained weights of {name!r} in the local Hugging Face/timm cache, and nothing is downloaded "
                "here. Download them once yourself (e.g. timm.create_model(name, pretrained=True) on a machine "
                "with network) or pass --weights <local file>."
            )
        source = f"pretrained (local cache {weights})"
    else:
        source = f"file {weights}"
    state = read_state_dict(weights)
    with torch.device("meta"):
        model = build_trunk(name, in_chans=3)[0]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise ValueError(
            f"{weights} does not fit backbone {name!r}: {len(missing)} tensor(s) missing (e.g. {missing[:3]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:3]}). Is it a {name} checkpoint?"
        )
    model.load_state_dict({k: state[k] for k in own}, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        # a tensor outside the state_dict (non-persistent buffer): build for real, then load
        model = build_trunk(name, in_chans=3)[0]
        model.load_state_dict({k: state[k] for k in own})
    return model, WeightsInfo(True, source, info.mean, info.std, info.input_size)
