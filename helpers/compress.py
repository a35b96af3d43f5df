"""Pruned networks as small files: export, load back, sizes on disk, sparse inference.

A pruned kernel is mostly zeros, but Keras stores it dense: ``.weights.h5`` of a network with
90% of its weights removed is as large as the unpruned one. This module writes a chain of
``Dense`` layers (the Dense-only models :func:`helpers.network.as_chain` accepts) to a file that
stores only the surviving weights and where they are, reads it back into a fresh Keras model,
measures the bytes, and runs the stored network with ``scipy.sparse`` CSR matrices.

- :func:`export_model` / :func:`encode` write the file (bytes); :func:`read_compressed` /
  :func:`decode` read it into a :class:`CompressedModel` (NumPy arrays, no Keras);
  :func:`load_model` builds the Keras model from it, without the original model object.
- :func:`sparse_forward` computes the outputs with CSR kernels (:func:`to_sparse` builds them
  once, so inference can be timed apart from construction).
- :func:`byte_sizes`, :func:`file_sizes`, :func:`dense_sizes` and :func:`size_table` count bytes,
  raw and gzip-compressed (level 9, in memory), against the dense ``.weights.h5`` and ``.npz``.

File format (version 1)
-----------------------
All integers little-endian. The file is an 18-byte prefix, a JSON header, then the payload::

    offset  size  contents
    0       4     magic b"OBDC"
    4       2     format version, uint16 (1)
    6       4     header length H in bytes, uint32
    10      4     payload length P in bytes, uint32
    14      4     CRC-32 (zlib.crc32) of the H + P bytes that follow
    18      H     header: UTF-8 JSON (compact), see below
    18+H    P     payload: for each Dense layer in order, its index segment, its value segment
                  and its bias segment, back to back, with no padding

The header is ``{"format": "obd-compressed", "name": model name, "input_shape": [28, 28],
"dtype": "float32" | "float64" (the model's), "values": value format, "loss": the compiled
loss ("softmax_cross_entropy", "mse" or null), "layers": [...]}``. Each layer entry is
``{"name", "units", "activation", "use_bias", "inputs" (fan-in), "nnz" (weights kept),
"encoding": "bitmask" | "index", "index_bytes", "value_bytes", "bias_bytes", "scale"}``. A
``Flatten`` is rebuilt in front of the first layer when the input has more than one axis;
``Dropout`` layers are not stored (they are the identity at inference).

A weight is *kept* when it is nonzero; kernels are read in row-major (C) order of their
``(fan-in, units)`` shape. The **index segment** says which weights are kept, in one of two
encodings, whichever is smaller for the layer (ties go to the bitmask); the header says which:

- ``"bitmask"``: ``np.packbits`` of the flattened keep-mask (first weight in the top bit);
  ``ceil(n / 8)`` bytes for ``n`` weights, whatever the sparsity.
- ``"index"``: the gaps between kept positions, one uint8 each. The gap before a kept weight
  is the number of pruned weights since the previous kept one (or since the start). A gap
  ``g`` is written as ``g // 255`` escape bytes 255 followed by one byte ``g % 255``. With ``k``
  kept weights this costs ``k + e`` bytes, ``e`` the number of escapes.

Where the sizes cross: each escape stands for 255 consecutive pruned weights, so
``e <= (n - k) / 255``, and ``e = 0`` unless some gap reaches 255. Without escapes the index
list is smaller exactly when ``k < ceil(n / 8)``: a density below 1/8 (sparsity above 87.5%).
With the most escapes possible, ``k + (n - k)/255 < n/8`` gives ``k/n < (255/8 - 1)/254 =
0.1216``. So the crossing lies at a density between 12.16% and 12.5%, at 12.5% for masks
without long runs of pruned weights. :func:`choose_encoding` compares the exact sizes.

The **value segment** holds the ``k`` kept values in the same order, in the chosen format:

- ``"float64"``, ``"float32"``, ``"float16"``: IEEE floats. From a float32 model, ``"float32"``
  is lossless. ``"float16"`` rounds to nearest; the error of each weight is at most
  ``max(2**-11 * |w|, 2**-24)``. A value too large for the format raises ``ValueError``.
- ``"int8"``: **symmetric** per-layer quantization. ``scale = max |w| / 127`` over the layer's
  kept weights (recorded in the header), ``q = clip(round(w / scale), -127, 127)`` and the
  value read back is ``q * scale``. The error is at most ``scale / 2`` for ``|w| >= scale/2``;
  a kept weight smaller than that would round to zero and is stored as ``+-1`` instead, error
  below ``scale``. So ``|w_read - w| <= scale`` for every weight, and ``-128`` is never used.

Zero stays exactly zero in every format: pruned weights are not stored at all, and a kept
weight is never stored as zero (float underflow gives the smallest subnormal with the sign of
the weight), so the zero pattern read back is the one written. A ``-0.0`` counts as pruned and
reads back as ``+0.0``.

The **bias segment** is the layer's bias in the model's dtype (``"<f4"`` or ``"<f8"``), dense,
whatever the value format; ``bias_bytes`` is 0 for a layer without bias.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import scipy.special

from helpers.losses import resolve_loss
from helpers.models import save_weights_quietly
from helpers.network import SUPPORTED_ACTIVATIONS, as_chain, check_finite_weights, require_dense
from helpers.runtime import keras

MAGIC = b"OBDC"
VERSION = 1
FORMAT_NAME = "obd-compressed"
#: Value formats :func:`encode` accepts, see the module docstring.
VALUE_FORMATS: tuple[str, ...] = ("float64", "float32", "float16", "int8")
#: Index encodings, see the module docstring.
ENCODINGS: tuple[str, ...] = ("bitmask", "index")
PathLike = str | os.PathLike[str]

_PREFIX = struct.Struct("<4sHIII")  # magic, version, header length, payload length, CRC-32
_ESCAPE = 255
_FLOAT_FORMATS = {"float64": "<f8", "float32": "<f4", "float16": "<f2"}
_MODEL_DTYPES = {"float32": "<f4", "float64": "<f8"}
_ACTIVATIONS = (*SUPPORTED_ACTIVATIONS, "softmax")


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class CompressedLayer:
    """One ``Dense`` layer as read from a file: decoded kernel (pruned weights exactly 0)."""

    name: str
    activation: str
    kernel: np.ndarray
    bias: np.ndarray | None
    encoding: str
    index_bytes: int
    value_bytes: int
    scale: float | None

    @property
    def mask(self) -> np.ndarray:
        """Keep-mask of the kernel: ``True`` where the weight is stored (nonzero)."""
        return self.kernel != 0

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.kernel))


@dataclass(frozen=True)
class CompressedModel:
    """The contents of a compressed file: architecture and decoded weights."""

    name: str
    input_shape: tuple[int, ...]
    dtype: str
    values: str
    loss: str | None
    layers: tuple[CompressedLayer, ...]

    @property
    def num_weights(self) -> int:
        """Kernel weights, pruned or not."""
        return sum(layer.kernel.size for layer in self.layers)

    @property
    def num_kept(self) -> int:
        return sum(layer.nnz for layer in self.layers)


@dataclass(frozen=True)
class Sizes:
    """Bytes of a file as stored (``raw``) and after ``gzip`` at level 9."""

    raw: int
    gzip: int


# --------------------------------------------------------------------------- masks


def bitmask_bytes(n: int) -> int:
    """Bytes of the ``"bitmask"`` encoding of ``n`` weights: ``ceil(n / 8)``."""
    return (int(n) + 7) // 8


def _gaps(mask: np.ndarray) -> np.ndarray:
    positions = np.flatnonzero(np.asarray(mask, dtype=bool).reshape(-1))
    return np.diff(positions, prepend=-1) - 1


def index_list_bytes(mask: np.ndarray) -> int:
    """Bytes of the ``"index"`` encoding of ``mask``: one per kept weight plus the escapes."""
    gaps = _gaps(mask)
    return int(gaps.size + np.sum(gaps // _ESCAPE))


def choose_encoding(mask: np.ndarray) -> str:
    """``"index"`` if the index list is strictly smaller than the bitmask, else ``"bitmask"``."""
    mask = np.asarray(mask, dtype=bool)
    return "index" if index_list_bytes(mask) < bitmask_bytes(mask.size) else "bitmask"


def encode_mask(mask: np.ndarray, encoding: str) -> bytes:
    """The index segment of a keep-mask in ``encoding`` (``"bitmask"`` or ``"index"``)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    if encoding == "bitmask":
        return np.packbits(flat).tobytes()
    if encoding != "index":
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    gaps = _gaps(flat)
    escapes = gaps // _ESCAPE
    out = np.full(gaps.size + int(escapes.sum()), _ESCAPE, dtype=np.uint8)
    out[np.cumsum(escapes + 1) - 1] = gaps % _ESCAPE
    return out.tobytes()


def decode_mask(data: bytes, encoding: str, n: int, nnz: int) -> np.ndarray:
    """The flat keep-mask of ``n`` weights from an index segment; ``ValueError`` if inconsistent."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if encoding == "bitmask":
        if raw.size != bitmask_bytes(n):
            raise ValueError(f"bitmask has {raw.size} bytes, {bitmask_bytes(n)} expected")
        bits = np.unpackbits(raw).astype(bool)
        if bits[n:].any():
            raise ValueError("bitmask has bits set past the last weight")
        mask = bits[:n]
    elif encoding == "index":
        ends = np.flatnonzero(raw != _ESCAPE)
        if raw.size and raw[-1] == _ESCAPE:
            raise ValueError("index list ends with an escape byte")
        count = np.arange(ends.size)
        positions = _ESCAPE * (ends - count) + np.cumsum(raw[ends], dtype=np.int64) + count
        if positions.size and positions[-1] >= n:
            raise ValueError(f"index list points at weight {positions[-1]} of {n}")
        mask = np.zeros(n, dtype=bool)
        mask[positions] = True
    else:
        raise ValueError(f"unknown encoding {encoding!r}; known: {ENCODINGS}")
    if int(mask.sum()) != nnz:
        raise ValueError(f"{encoding} keeps {int(mask.sum())} weights, header says {nnz}")
    return mask


# --------------------------------------------------------------------------- values


def check_value_format(values: object) -> str:
    """``values`` if it is one of :data:`VALUE_FORMATS`, else ``ValueError``."""
    if values not in VALUE_FORMATS:
        raise ValueError(f"values must be one of {VALUE_FORMATS}, got {values!r}")
    return str(values)


def quantize(kept: np.ndarray, values: str) -> tuple[bytes, float | None]:
    """The value segment of the nonzero weights ``kept`` and the int8 scale (else ``None``)."""
    values = check_value_format(values)
    if values == "int8":
        peak = float(np.max(np.abs(kept))) if kept.size else 0.0
        scale = peak / 127 if peak > 0 else 1.0
        q = np.clip(np.rint(kept.astype(np.float64) / scale), -127, 127)
        q = np.where(q == 0, np.sign(kept), q)  # a kept weight never becomes zero
        return q.astype(np.int8).tobytes(), scale
    dtype = np.dtype(_FLOAT_FORMATS[values])
    with np.errstate(over="ignore"):
        stored = kept.astype(dtype)
    if not np.all(np.isfinite(stored)):
        raise ValueError(
            f"weights up to {float(np.max(np.abs(kept))):g} do not fit in {values} "
            f"(largest {float(np.finfo(dtype).max):g})"
        )
    tiny = np.finfo(dtype).smallest_subnormal
    stored = np.where(stored == 0, np.copysign(tiny, kept), stored).astype(dtype)
    return stored.tobytes(), None


def dequantize(data: bytes, values: str, scale: float | None, dtype: str) -> np.ndarray:
    """The kept weights of a value segment, in the model's ``dtype``."""
    if values == "int8":
        if scale is None or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"int8 values need a positive finite scale, got {scale!r}")
        return (np.frombuffer(data, dtype=np.int8).astype(np.float64) * scale).astype(dtype)
    return np.frombuffer(data, dtype=_FLOAT_FORMATS[values]).astype(dtype)


def _value_width(values: str) -> int:
    return 1 if values == "int8" else np.dtype(_FLOAT_FORMATS[values]).itemsize


# --------------------------------------------------------------------------- encode


def _compiled_loss(model: keras.Model) -> str | None:
    try:
        return resolve_loss(model)
    except ValueError:  # not compiled, or with a loss the helpers do not know
        return None


def _encode_layer(step: Any, dtype: str, values: str) -> tuple[dict[str, Any], bytes]:
    """A layer's header entry and payload bytes (index, values, bias)."""
    kernel = np.asarray(step.kernel.numpy())
    mask = kernel != 0
    encoding = choose_encoding(mask)
    index = encode_mask(mask, encoding)
    try:
        value_data, scale = quantize(kernel[mask], values)
    except ValueError as error:
        raise ValueError(f"layer {step.layer.name!r}: {error}") from None
    bias = b"" if step.bias is None else np.asarray(step.bias.numpy()).astype(dtype).tobytes()
    entry = {
        "name": step.layer.name,
        "units": int(kernel.shape[1]),
        "activation": step.activation,
        "use_bias": step.bias is not None,
        "inputs": int(kernel.shape[0]),
        "nnz": int(mask.sum()),
        "encoding": encoding,
        "index_bytes": len(index),
        "value_bytes": len(value_data),
        "bias_bytes": len(bias),
        "scale": scale,
    }
    return entry, index + value_data + bias


def encode(model: keras.Model, *, values: str = "float32") -> bytes:
    """The compressed file of ``model`` as bytes (format in the module docstring).

    Raises:
        UnsupportedModelError: ``model`` is not a chain of supported ``Dense`` layers (see
            ``as_chain``; convolutional chains are not supported by this format).
        ValueError: a weight is NaN or infinite, ``values`` is unknown, or a weight does not fit
            in the value format.
    """
    values = check_value_format(values)
    chain = as_chain(model)
    require_dense(chain, "the compressed format")
    check_finite_weights(model)
    dtype = _MODEL_DTYPES[chain.dtype]
    entries, segments = [], []
    for step in chain.steps:
        entry, segment = _encode_layer(step, dtype, values)
        entries.append(entry)
        segments.append(segment)
    header = {
        "format": FORMAT_NAME,
        "name": model.name,
        "input_shape": [int(d) for d in chain.input_shape],
        "dtype": chain.dtype,
        "values": values,
        "loss": _compiled_loss(model),
        "layers": entries,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    payload = b"".join(segments)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return _PREFIX.pack(MAGIC, VERSION, len(head), len(payload), crc) + head + payload


def export_model(model: keras.Model, path: PathLike, *, values: str = "float32") -> CompressedModel:
    """Write ``model`` to ``path`` in the compressed format; return what the file holds."""
    data = encode(model, values=values)
    Path(path).write_bytes(data)
    return decode(data, source=str(path))


# --------------------------------------------------------------------------- decode


def _split(data: bytes, source: str) -> tuple[dict[str, Any], bytes]:
    """The header and payload of a file, after checking magic, version, lengths and CRC."""
    if len(data) < _PREFIX.size:
        raise ValueError(f"{source}: truncated: {len(data)} bytes, shorter than the prefix")
    magic, version, head_len, payload_len, crc = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{source}: not a compressed model: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"{source}: format version {version} is not supported (only {VERSION})")
    expected = _PREFIX.size + head_len + payload_len
    if len(data) < expected:
        raise ValueError(f"{source}: truncated: {len(data)} bytes, {expected} expected")
    if len(data) > expected:
        raise ValueError(f"{source}: {len(data) - expected} unexpected bytes after the payload")
    if zlib.crc32(data[_PREFIX.size :]) != crc:
        raise ValueError(f"{source}: corrupt: the CRC-32 does not match the contents")
    head = data[_PREFIX.size : _PREFIX.size + head_len]
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{source}: corrupt: the header is not JSON ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise ValueError(f"{source}: the header does not describe a {FORMAT_NAME!r} file")
    return header, data[_PREFIX.size + head_len :]


def _decode_layer(
    entry: dict[str, Any], payload: bytes, offset: int, dtype: str, values: str
) -> tuple[CompressedLayer, int]:
    """One layer from its header entry and the payload at ``offset``; the next offset."""
    name, inputs, units = str(entry["name"]), int(entry["inputs"]), int(entry["units"])
    if entry["activation"] not in _ACTIVATIONS:
        raise ValueError(f"layer {name!r}: unknown activation {entry['activation']!r}")
    nnz, width = int(entry["nnz"]), _value_width(values)
    sizes = [int(entry[key]) for key in ("index_bytes", "value_bytes", "bias_bytes")]
    bias_size = units * np.dtype(_MODEL_DTYPES[dtype]).itemsize if entry["use_bias"] else 0
    if sizes[1] != nnz * width or sizes[2] != bias_size or min(sizes) < 0:
        raise ValueError(f"layer {name!r}: segment sizes {sizes} do not fit {nnz} kept weights")
    if offset + sum(sizes) > len(payload):
        raise ValueError(f"layer {name!r}: segments run past the end of the payload")
    index_end = offset + sizes[0]
    values_end = index_end + sizes[1]
    index, value_data = payload[offset:index_end], payload[index_end:values_end]
    bias_data = payload[values_end : values_end + sizes[2]]
    mask = decode_mask(index, str(entry["encoding"]), inputs * units, nnz)
    kernel = np.zeros(inputs * units, dtype=dtype)
    kernel[mask] = dequantize(value_data, values, entry["scale"], dtype)
    if np.count_nonzero(kernel) != nnz or not np.all(np.isfinite(kernel)):
        raise ValueError(f"layer {name!r}: stored values are zero or not finite")
    bias = np.frombuffer(bias_data, dtype=_MODEL_DTYPES[dtype]).astype(dtype) if bias_size else None
    if bias is not None and not np.all(np.isfinite(bias)):
        raise ValueError(f"layer {name!r}: the bias is not finite")
    layer = CompressedLayer(
        name=name,
        activation=str(entry["activation"]),
        kernel=kernel.reshape(inputs, units),
        bias=bias,
        encoding=str(entry["encoding"]),
        index_bytes=sizes[0],
        value_bytes=sizes[1],
        scale=None if entry["scale"] is None else float(entry["scale"]),
    )
    return layer, offset + sum(sizes)


def _decode_model(header: dict[str, Any], payload: bytes) -> CompressedModel:
    dtype, values = str(header["dtype"]), header["values"]
    if dtype not in _MODEL_DTYPES:
        raise ValueError(f"model dtype {dtype!r} is not one of {tuple(_MODEL_DTYPES)}")
    check_value_format(values)
    input_shape = tuple(int(d) for d in header["input_shape"])
    fan_in, offset, layers = math.prod(input_shape), 0, []
    for entry in header["layers"]:
        if int(entry["inputs"]) != fan_in:
            raise ValueError(
                f"layer {entry['name']!r} takes {entry['inputs']} inputs, not {fan_in}"
            )
        layer, offset = _decode_layer(entry, payload, offset, dtype, values)
        layers.append(layer)
        fan_in = layer.kernel.shape[1]
    if not layers or offset != len(payload):
        raise ValueError(f"{len(layers)} layers use {offset} of the {len(payload)} payload bytes")
    return CompressedModel(
        name=str(header["name"]),
        input_shape=input_shape,
        dtype=dtype,
        values=values,
        loss=header["loss"],
        layers=tuple(layers),
    )


def decode(data: bytes, source: str = "<bytes>") -> CompressedModel:
    """Read bytes written by :func:`encode`; ``ValueError`` naming ``source`` and the problem."""
    header, payload = _split(bytes(data), source)
    try:
        return _decode_model(header, payload)
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"{source}: malformed contents: {type(error).__name__}: {error}") from None


def read_compressed(path: PathLike) -> CompressedModel:
    """Read a file written by :func:`export_model`."""
    return decode(Path(path).read_bytes(), source=str(path))


# --------------------------------------------------------------------------- Keras model


def _compile(model: keras.Model, loss: str | None, final_softmax: bool) -> None:
    """Compile as the helpers expect (Adam, the stored loss); leave it uncompiled without one."""
    if loss == "softmax_cross_entropy":
        fn = keras.losses.SparseCategoricalCrossentropy(from_logits=not final_softmax)
        model.compile(optimizer=keras.optimizers.Adam(), loss=fn, metrics=["accuracy"])
    elif loss == "mse":
        model.compile(optimizer=keras.optimizers.Adam(), loss=keras.losses.MeanSquaredError())


def build_model(compressed: CompressedModel) -> keras.Sequential:
    """A fresh Keras model with the architecture and weights of ``compressed``.

    ``Input -> [Flatten] -> Dense ...`` with the stored names, activations and dtype, so the
    kernel paths (``mlp/dense_1/kernel``, ...) are those of the exported model. It is compiled
    with Adam and the exported model's loss when that was known.
    """
    dtype = compressed.dtype
    layers: list[Any] = [keras.Input(shape=compressed.input_shape, dtype=dtype)]
    if len(compressed.input_shape) > 1:
        names = {layer.name for layer in compressed.layers}
        flatten = next(
            n for n in ("flatten", *(f"flatten_{i}" for i in range(len(names)))) if n not in names
        )
        layers.append(keras.layers.Flatten(name=flatten, dtype=dtype))
    for layer in compressed.layers:
        layers.append(
            keras.layers.Dense(
                layer.kernel.shape[1],
                activation=layer.activation,
                use_bias=layer.bias is not None,
                dtype=dtype,
                name=layer.name,
            )
        )
    model = keras.Sequential(layers, name=compressed.name)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for target, stored in zip(dense, compressed.layers, strict=True):
        target.kernel.assign(stored.kernel)
        if stored.bias is not None:
            target.bias.assign(stored.bias)
    _compile(model, compressed.loss, compressed.layers[-1].activation == "softmax")
    return model


def load_model(path: PathLike) -> keras.Sequential:
    """The Keras model stored at ``path`` (see :func:`build_model`)."""
    return build_model(read_compressed(path))


# --------------------------------------------------------------------------- sparse inference


@dataclass(frozen=True)
class SparseLayer:
    """``z_out = activation(kernel_t @ z_in + bias)`` on feature-major activations."""

    kernel_t: scipy.sparse.csr_matrix
    bias: np.ndarray | None
    activation: str


@dataclass(frozen=True)
class SparseChain:
    """A compressed model as CSR matrices, ready for :func:`sparse_forward`."""

    input_shape: tuple[int, ...]
    dtype: str
    layers: tuple[SparseLayer, ...]


def to_sparse(compressed: CompressedModel) -> SparseChain:
    """Each kernel as the CSR matrix of its transpose (rows = output units), stored zeros dropped."""
    layers = tuple(
        SparseLayer(
            kernel_t=scipy.sparse.csr_matrix(layer.kernel.T),
            bias=None if layer.bias is None else layer.bias[:, None],
            activation=layer.activation,
        )
        for layer in compressed.layers
    )
    return SparseChain(compressed.input_shape, compressed.dtype, layers)


def _activate(z: np.ndarray, activation: str) -> np.ndarray:
    """The activation on feature-major ``z`` (features on axis 0)."""
    if activation == "relu":
        return np.maximum(z, 0, out=z)
    if activation == "tanh":
        return np.tanh(z, out=z)
    if activation == "sigmoid":
        return scipy.special.expit(z, out=z)
    if activation == "softmax":
        return scipy.special.softmax(z, axis=0)
    return z


def sparse_forward(model: SparseChain | CompressedModel | PathLike, x: np.ndarray) -> np.ndarray:
    """The model's outputs (logits for the tutorial network) for inputs ``x``, with NumPy/SciPy.

    ``x`` has shape ``(N, *input_shape)``; it is converted to the model's dtype. Each layer is one
    CSR-times-dense product on activations of shape ``(features, N)``.
    """
    if not isinstance(model, SparseChain):
        model = to_sparse(model if isinstance(model, CompressedModel) else read_compressed(model))
    x = np.asarray(x, dtype=model.dtype)
    if x.shape[1:] != model.input_shape:
        raise ValueError(
            f"x has shape {x.shape}; inputs of shape (N, *{model.input_shape}) expected"
        )
    z = np.ascontiguousarray(x.reshape(len(x), -1).T)
    for layer in model.layers:
        z = layer.kernel_t @ z
        if layer.bias is not None:
            z += layer.bias
        z = _activate(z, layer.activation)
    return np.ascontiguousarray(z.T)


# --------------------------------------------------------------------------- sizes


def byte_sizes(data: bytes) -> Sizes:
    """``len(data)`` and the length of ``gzip.compress(data, 9)`` (fixed mtime)."""
    return Sizes(raw=len(data), gzip=len(gzip.compress(data, compresslevel=9, mtime=0)))


def file_sizes(path: PathLike) -> Sizes:
    """Bytes on disk of ``path``, raw and gzip-compressed at level 9 in memory."""
    return byte_sizes(Path(path).read_bytes())


def dense_sizes(model: keras.Model, directory: PathLike) -> dict[str, Sizes]:
    """Sizes of the dense baselines of ``model``, written into ``directory``.

    ``"dense .weights.h5"``: ``model.save_weights``; ``"dense float32 .npz"``: every weight
    (kernels and biases, by variable path) as float32 in an uncompressed ``np.savez``.
    """
    h5 = Path(directory) / f"{model.name}.weights.h5"
    npz = Path(directory) / f"{model.name}.npz"
    save_weights_quietly(model, h5)  # Keras's save_weights, minus its NumPy 2 DeprecationWarning
    arrays = {v.path.replace("/", "."): np.asarray(v.numpy(), np.float32) for v in model.weights}
    with npz.open("wb") as file:
        np.savez(file, **arrays)
    return {"dense .weights.h5": file_sizes(h5), "dense float32 .npz": file_sizes(npz)}


def size_table(
    model: keras.Model, values: Sequence[str] = ("float32", "float16", "int8")
) -> dict[str, Sizes]:
    """Sizes of the dense baselines and of the compressed file in each value format.

    Keys: ``"dense .weights.h5"``, ``"dense float32 .npz"``, then ``"compressed <format>"``.
    """
    formats = [check_value_format(v) for v in values]
    with tempfile.TemporaryDirectory() as directory:
        table = dense_sizes(model, directory)
    for fmt in formats:
        table[f"compressed {fmt}"] = byte_sizes(encode(model, values=fmt))
    return table


__all__ = [
    "ENCODINGS",
    "MAGIC",
    "VALUE_FORMATS",
    "VERSION",
    "CompressedLayer",
    "CompressedModel",
    "Sizes",
    "SparseChain",
    "SparseLayer",
    "bitmask_bytes",
    "build_model",
    "byte_sizes",
    "check_value_format",
    "choose_encoding",
    "decode",
    "decode_mask",
    "dense_sizes",
    "dequantize",
    "encode",
    "encode_mask",
    "export_model",
    "file_sizes",
    "index_list_bytes",
    "load_model",
    "quantize",
    "read_compressed",
    "size_table",
    "sparse_forward",
    "to_sparse",
]
