"""The exported artifact: a model's weights in the smallest lossless encoding we know.

Size is the byte count of this file, so every saving a technique claims must show up here:
- a tensor that is mostly zeros (pruning) is stored as a bit mask plus its non-zero values;
- a tensor with few distinct values (fixed-point or k-means weights) is stored as a palette of
  those values plus one b-bit index per element, packed;
- a float tensor whose values are all exact in float16 is stored as float16;
- a quantized tensor is stored as its integer values (packed by the same rules) and scales, so
  pruning and int8 quantization compound.
The file is a plain ``torch.save`` archive readable with ``torch.load(weights_only=True)``;
:func:`load_state_dict` turns it back into an ordinary state dict. Since format 2 it holds two
byte tensors: every tensor's bytes one after another (little-endian, as the machines torch
runs on), and a zlib-compressed JSON index of names, shapes and offsets. Format 1 stored each
tensor as an entry of its own, and a zip entry and its record cost about 350 bytes: a 3,500
parameter int8 model took 63 KB, of which 3 KB were its values. Format 1 files still load,
and a study created before format 2 keeps writing them, so its sizes stay comparable.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoshrink.models import is_depthwise

FORMAT = "autoshrink-artifact/2"
LEGACY_FORMAT = "autoshrink-artifact/1"  # one archive entry per tensor


def _encode(value):
    """The smallest lossless stored form of a state-dict value (tensors, tuples of them)."""
    if isinstance(value, tuple):  # quantized linear layers keep (weight, bias) packed together
        return {"kind": "tuple", "items": [_encode(item) for item in value]}
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_quantized:
        return _encode_quantized(value)
    return _pack(value.detach().cpu().contiguous())


def _encode_quantized(tensor: torch.Tensor):
    """int8 values packed like any tensor (pruned weights stay zeros), plus their scales."""
    scheme = tensor.qscheme()
    packed = _pack(tensor.int_repr().contiguous())
    if isinstance(packed, torch.Tensor):  # nothing to gain: keep torch's own, smaller record
        return tensor
    entry = {"kind": "quantized", "values": packed}
    if scheme == torch.per_tensor_affine:
        return entry | {"scale": tensor.q_scale(), "zero_point": tensor.q_zero_point()}
    if scheme == torch.per_channel_affine:
        return entry | {"scales": tensor.q_per_channel_scales(),
                        "zero_points": tensor.q_per_channel_zero_points(),
                        "axis": tensor.q_per_channel_axis()}
    return tensor  # other schemes: stored as torch stores them


MAX_PALETTE_BITS = 8


def _pack(dense: torch.Tensor):
    """The smallest of: dense, float16 cast, bit mask + non-zeros, palette + packed indices."""
    values_dtype = torch.float16 if _exact_in_half(dense) else dense.dtype
    itemsize = torch.empty((), dtype=values_dtype).element_size()
    candidates = [(dense.numel() * itemsize, "dense")]
    nonzero = dense != 0
    count = int(nonzero.sum())
    candidates.append((dense.numel() // 8 + count * itemsize, "bitmask"))
    palette = None
    if dense.numel() > 16 and len(torch.unique(dense.flatten()[:4096])) <= 2 ** MAX_PALETTE_BITS:
        palette = torch.unique(dense)  # the sample said it may be small: worth sorting all
    if palette is not None and len(palette) <= 2 ** MAX_PALETTE_BITS:
        bits = max(1, int(np.ceil(np.log2(len(palette)))))
        candidates.append((-(-dense.numel() * bits // 8) + len(palette) * itemsize, "palette"))
    _, kind = min(candidates)
    if kind == "bitmask":
        mask = np.packbits(nonzero.flatten().numpy())
        return {"kind": "bitmask", "shape": list(dense.shape), "dtype": str(dense.dtype),
                "mask": torch.from_numpy(mask), "values": dense[nonzero].to(values_dtype)}
    if kind == "palette":
        indices = torch.searchsorted(palette, dense.flatten()).numpy().astype(np.uint8)
        planes = np.unpackbits(indices[:, None], axis=1)[:, 8 - bits:]  # low ``bits`` bits
        return {"kind": "palette", "shape": list(dense.shape), "dtype": str(dense.dtype),
                "bits": bits, "palette": palette.to(values_dtype),
                "indices": torch.from_numpy(np.packbits(planes.flatten()))}
    if values_dtype != dense.dtype:
        return {"kind": "cast", "dtype": str(dense.dtype), "values": dense.to(values_dtype)}
    return dense


def _exact_in_half(tensor: torch.Tensor) -> bool:
    if tensor.dtype != torch.float32 or tensor.numel() == 0:
        return False
    return bool(torch.equal(tensor.to(torch.float16).to(torch.float32), tensor))


def _decode(entry):
    if not isinstance(entry, dict) or "kind" not in entry:
        return entry
    kind = entry["kind"]
    if kind == "tuple":
        return tuple(_decode(item) for item in entry["items"])
    if kind == "quantized":
        values = _decode(entry["values"])
        if "axis" in entry:
            return torch._make_per_channel_quantized_tensor(values, entry["scales"],
                                                            entry["zero_points"], entry["axis"])
        return torch._make_per_tensor_quantized_tensor(values, entry["scale"],
                                                       entry["zero_point"])
    dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
    if kind == "cast":
        return entry["values"].to(dtype)
    shape = entry["shape"]
    numel = int(np.prod(shape)) if shape else 1
    if kind == "palette":
        bits = entry["bits"]
        planes = np.unpackbits(entry["indices"].numpy())[:numel * bits].reshape(numel, bits)
        padded = np.concatenate([np.zeros((numel, 8 - bits), np.uint8), planes], axis=1)
        indices = torch.from_numpy(np.packbits(padded, axis=1)[:, 0].astype(np.int64))
        return entry["palette"].to(dtype)[indices].reshape(shape)
    mask = torch.from_numpy(np.unpackbits(entry["mask"].numpy())[:numel].astype(bool))
    dense = torch.zeros(numel, dtype=dtype)
    dense[mask] = entry["values"].to(dtype)
    return dense.reshape(shape)


def save(model: nn.Module, path: str | os.PathLike, about: dict | None = None,
         legacy: bool = False) -> int:
    """Write the artifact for ``model`` and return its size in bytes; ``about`` (plain JSON
    values) describes how to rebuild the architecture, for exported models. ``legacy`` writes
    format 1, for studies whose sizes were measured in it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")
    torch.save(_payload(model, about, legacy), partial)
    os.replace(partial, path)  # a killed process never leaves half a file under the real name
    return path.stat().st_size


PARTIAL = ".partial"  # .<name>.<writer's process id>.partial, while save() writes <name>


def half_written(folder: Path) -> list[tuple[str, Path]]:
    """The partial files in ``folder`` (left by processes killed inside :func:`save`, or of
    saves under way), each with the name it was to take."""
    found = []
    for path in folder.glob(f".*{PARTIAL}"):
        name, _, pid = path.name[1:].removesuffix(PARTIAL).rpartition(".")
        if name and pid.isdigit():
            found.append((name, path))
    return found


def size_in_bytes(model: nn.Module, legacy: bool = False) -> int:
    """The size :func:`save` would report, without writing a file."""
    buffer = io.BytesIO()
    torch.save(_payload(model, None, legacy), buffer)
    return buffer.tell()


def _payload(model: nn.Module, about: dict | None, legacy: bool) -> dict:
    state_dict = model.state_dict()
    state = {key: _encode(value) for key, value in state_dict.items()}
    # module versions: quantized modules need them to read their own state back
    metadata = {key: dict(value) for key, value in getattr(state_dict, "_metadata", {}).items()}
    contents = {"state": state, "metadata": metadata}
    if about is not None:
        contents["about"] = about
    return {"format": LEGACY_FORMAT, **contents} if legacy else _bundle(contents)


def _bundle(contents: dict) -> dict:
    """Format 2: the tensors' bytes in one byte tensor, everything else in a compressed JSON
    index that refers to them by offset."""
    bundler = _Bundler()
    index = bundler.index(contents)
    text = zlib.compress(json.dumps(index, separators=(",", ":")).encode(), 9)
    return {"format": FORMAT, "index": torch.frombuffer(bytearray(text), dtype=torch.uint8),
            "data": (torch.cat(bundler.chunks) if bundler.chunks
                     else torch.zeros(0, dtype=torch.uint8)),
            "kept": bundler.kept}


class _Bundler:
    """Turns an artifact's contents into JSON values, collecting each tensor's bytes in
    ``chunks`` (byte views, ``end`` bytes so far) and what JSON cannot hold in ``kept``
    (quantized schemes other than affine; no autoshrink model has any), which torch pickles."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []
        self.kept: list = []
        self.end = 0

    def index(self, value):
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            return {key: self.index(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self.index(item) for item in value]
            return {"$tuple": items} if isinstance(value, tuple) else items
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.Tensor) and not value.is_quantized:
            return self._bytes(value)
        if isinstance(value, torch.Tensor) and value.qscheme() == torch.per_tensor_affine:
            return {"$int8": self._bytes(value.int_repr()), "scale": value.q_scale(),
                    "zero_point": value.q_zero_point()}
        if isinstance(value, torch.Tensor) and value.qscheme() == torch.per_channel_affine:
            return {"$int8": self._bytes(value.int_repr()),
                    "scales": self._bytes(value.q_per_channel_scales()),
                    # all 0 for symmetric weights: a bit mask
                    "zero_points": self.index(_pack(value.q_per_channel_zero_points())),
                    "axis": value.q_per_channel_axis()}
        self.kept.append(value)
        return {"$kept": len(self.kept) - 1}

    def _bytes(self, tensor: torch.Tensor) -> dict:
        stored = _narrowed(tensor.detach().cpu())
        data = stored.reshape(-1).contiguous().view(torch.uint8)
        self.chunks.append(data)
        self.end += len(data)
        entry = {"$bytes": [self.end - len(data), len(data)],
                 "dtype": str(stored.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        if stored.dtype != tensor.dtype:
            entry["as"] = str(tensor.dtype).removeprefix("torch.")
        return entry


NARROWER = {torch.float64: (torch.float32,), torch.int64: (torch.int8, torch.int16, torch.int32),
            torch.int32: (torch.int8, torch.int16), torch.int16: (torch.int8,)}


def _narrowed(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the narrowest type that holds each of its values exactly: int8 scales are
    float64 computed in float32, and their zero points int64 values of one byte (float32
    tensors exact in float16 are :func:`_pack`'s)."""
    for dtype in NARROWER.get(tensor.dtype, ()):
        if tensor.numel() and torch.equal(tensor.to(dtype).to(tensor.dtype), tensor):
            return tensor.to(dtype)
    return tensor


def _from_index(value, data: torch.Tensor, kept: list):
    """The inverse of :meth:`_Bundler.index`."""
    if isinstance(value, list):
        return [_from_index(item, data, kept) for item in value]
    if not isinstance(value, dict):
        return value
    if "$tuple" in value:
        return tuple(_from_index(item, data, kept) for item in value["$tuple"])
    if "$dtype" in value:
        return getattr(torch, value["$dtype"])
    if "$kept" in value:
        return kept[value["$kept"]]
    if "$bytes" in value:
        start, length = value["$bytes"]
        stored = data[start:start + length].clone().view(getattr(torch, value["dtype"]))
        return stored.reshape(value["shape"]).to(getattr(torch, value.get("as", value["dtype"])))
    if "$int8" in value:
        values = _from_index(value["$int8"], data, kept)
        if "axis" in value:
            return torch._make_per_channel_quantized_tensor(
                values, _from_index(value["scales"], data, kept),
                _decode(_from_index(value["zero_points"], data, kept)), value["axis"])
        return torch._make_per_tensor_quantized_tensor(values, value["scale"],
                                                       value["zero_point"])
    return {key: _from_index(item, data, kept) for key, item in value.items()}


def load(path: str | os.PathLike) -> tuple[OrderedDict, dict | None]:
    """Read an artifact, in either format, once: its state dict (weights only: nothing in it
    is executed) and the description saved with an exported model (None for a trial's)."""
    with warnings.catch_warnings():  # torch warns about its own quantized-tensor internals
        warnings.simplefilter("ignore")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") not in (FORMAT,
                                                                          LEGACY_FORMAT):
            raise ValueError(f"{path} is not an autoshrink artifact")
        if payload["format"] == FORMAT:
            index = json.loads(zlib.decompress(payload["index"].numpy().tobytes()))
            payload = _from_index(index, payload["data"], payload["kept"])
        state = OrderedDict((key, _decode(value)) for key, value in payload["state"].items())
    state._metadata = OrderedDict(payload.get("metadata", {}))
    return state, payload.get("about")


def load_state_dict(path: str | os.PathLike) -> dict:
    """Read an artifact back into a state dict (weights only: nothing in it is executed)."""
    return load(path)[0]


def load_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an artifact into ``model``, first resizing the layers whose saved shapes differ.

    Structured pruning leaves ordinary layers with fewer channels; resizing convolutions,
    linear layers and batch norms to the saved shapes lets the unpruned architecture take them.
    """
    return load_state_into(model, load_state_dict(path))


def load_state_into(model: nn.Module, state: dict) -> nn.Module:
    """:func:`load_into` for a state dict already read with :func:`load_state_dict`."""
    for name, module in list(model.named_modules()):
        _fit_int8_layer(module, name, state)
        resized = _resized(module, name, state)
        if resized is None:
            _take_saved_shapes(module, name, state)
        else:
            resized.train(module.training)  # a new module starts in training mode
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, resized)
    model.load_state_dict(state)
    return model


def _fit_int8_layer(module: nn.Module, name: str, state: dict) -> None:
    """Int8 convolutions take weights of any shape but keep the widths they were built with (a
    rebuild quantizes the unpruned model), so a pruned depthwise one gets its groups at the
    saved width, in place, before loading (an unfused int8 batch norm is a norm layer to
    :func:`_take_saved_shapes`)."""
    from torch.ao.nn.quantized import Conv2d as Int8Conv2d

    weight = state.get(f"{name}.weight" if name else "weight")
    if not isinstance(weight, torch.Tensor):
        return
    width = weight.shape[0]
    if isinstance(module, Int8Conv2d) and is_depthwise(module) and module.out_channels != width:
        module.groups = module.in_channels = module.out_channels = width


# the attribute that holds the width of a layer whose weights are one value per channel
WIDTH_ATTRIBUTES = ((nn.LayerNorm, "normalized_shape"), (nn.GroupNorm, "num_channels"),
                    (nn.modules.batchnorm._NormBase, "num_features"),
                    (nn.PReLU, "num_parameters"))


def _take_saved_shapes(module: nn.Module, name: str, state: dict) -> None:
    """Give a layer's own weights the shapes saved for them, in place: pruned batch, layer
    and group norms (int8 batch norms too) and PReLUs, and weights a block holds itself
    (ConvNeXt's layer scale), with the saved values. Their width attribute follows, so the
    forward pass agrees."""
    prefix = f"{name}." if name else ""
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    taken = None  # the shape of a weight that changed
    for key, tensor in own:
        saved = state.get(prefix + key)
        if (not isinstance(saved, torch.Tensor) or saved.is_quantized
                or saved.shape == tensor.shape or saved.dim() != tensor.dim()):
            continue
        replacement = saved.to(dtype=tensor.dtype, device=tensor.device, copy=True)
        if isinstance(tensor, nn.Parameter):
            replacement = nn.Parameter(replacement, requires_grad=tensor.requires_grad)
        setattr(module, key, replacement)
        taken = saved.shape
    if taken is not None:
        for kind, attribute in WIDTH_ATTRIBUTES:
            if isinstance(module, kind):
                setattr(module, attribute, tuple(taken) if kind is nn.LayerNorm else taken[0])


def _resized(module: nn.Module, name: str, state: dict) -> nn.Module | None:
    prefix = f"{name}." if name else ""
    weight = state.get(f"{prefix}weight")
    if not isinstance(weight, torch.Tensor) or weight.is_quantized:
        return None
    if type(module) is nn.Linear and weight.shape != module.weight.shape:
        return nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    if type(module) is nn.Conv2d and weight.shape != module.weight.shape:
        out_channels = weight.shape[0]
        if is_depthwise(module):
            groups = in_channels = out_channels  # depthwise stays so
        else:  # pruning keeps the groups of other grouped convolutions
            groups, in_channels = module.groups, weight.shape[1] * module.groups
        kernel, padding = _saved_kernel(module, tuple(weight.shape[2:]))
        return nn.Conv2d(in_channels, out_channels, kernel, module.stride, padding,
                         module.dilation, groups, module.bias is not None, module.padding_mode)
    return None


def _saved_kernel(conv: nn.Conv2d, saved: tuple[int, ...]) -> tuple[tuple, tuple | str]:
    """The saved kernel size, padded to give the same output size: ghost modules cut cheap
    kernels wider than their maps since 2026-12-05, and a file saved before holds the wider one
    (whose outer taps only ever met padding)."""
    if saved == conv.kernel_size or isinstance(conv.padding, str):
        return conv.kernel_size, conv.padding
    return saved, tuple(pad + (wide - narrow) // 2
                        for pad, wide, narrow in zip(conv.padding, saved, conv.kernel_size))
