"""The exported artifact: a model's weights in the smallest lossless encoding we know.

Size is the byte count of this file, so every saving a technique claims must show up here:
- a tensor that is mostly zeros (pruning) is stored as a bit mask plus its non-zero values;
- a float tensor whose values are all exact in float16 is stored as float16;
- quantized tensors (int8) are stored as torch stores them.
The file is a plain ``torch.save`` archive readable with ``torch.load(weights_only=True)``;
:func:`load_state_dict` turns it back into an ordinary state dict.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = "autoshrink-artifact/1"


def _encode(tensor: torch.Tensor):
    if tensor.is_quantized or not tensor.is_floating_point():
        return tensor
    dense = tensor.detach().cpu().contiguous()
    values_dtype = torch.float16 if _exact_in_half(dense) else dense.dtype
    nonzero = dense != 0
    count = int(nonzero.sum())
    itemsize = torch.empty((), dtype=values_dtype).element_size()
    if dense.numel() // 8 + count * itemsize < dense.numel() * itemsize:
        mask = np.packbits(nonzero.flatten().numpy())
        return {"kind": "bitmask", "shape": list(dense.shape), "dtype": str(dense.dtype),
                "mask": torch.from_numpy(mask), "values": dense[nonzero].to(values_dtype)}
    if values_dtype != dense.dtype:
        return {"kind": "cast", "dtype": str(dense.dtype), "values": dense.to(values_dtype)}
    return dense


def _exact_in_half(tensor: torch.Tensor) -> bool:
    if tensor.dtype != torch.float32 or tensor.numel() == 0:
        return False
    return bool(torch.equal(tensor.to(torch.float16).to(torch.float32), tensor))


def _decode(entry):
    if not isinstance(entry, dict):
        return entry
    dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
    if entry["kind"] == "cast":
        return entry["values"].to(dtype)
    shape = entry["shape"]
    numel = int(np.prod(shape)) if shape else 1
    mask = torch.from_numpy(np.unpackbits(entry["mask"].numpy())[:numel].astype(bool))
    dense = torch.zeros(numel, dtype=dtype)
    dense[mask] = entry["values"].to(dtype)
    return dense.reshape(shape)


def save(model: nn.Module, path: str | os.PathLike) -> int:
    """Write the artifact for ``model`` and return its size in bytes."""
    state_dict = model.state_dict()
    state = {key: _encode(value) if isinstance(value, torch.Tensor) else value
             for key, value in state_dict.items()}
    # module versions: quantized modules need them to read their own state back
    metadata = {key: dict(value) for key, value in getattr(state_dict, "_metadata", {}).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "state": state, "metadata": metadata}, path)
    return path.stat().st_size


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read an artifact back into a state dict (weights only: nothing in it is executed)."""
    with warnings.catch_warnings():  # torch warns about its own quantized-tensor internals
        warnings.simplefilter("ignore")
        payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an autoshrink artifact")
    state = OrderedDict((key, _decode(value)) for key, value in payload["state"].items())
    state._metadata = OrderedDict(payload.get("metadata", {}))
    return state
