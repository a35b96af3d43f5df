"""The compressed file format: round trips, quantization bounds, sizes, sparse inference, errors."""

from __future__ import annotations

import json
import re
import struct
import zlib

import numpy as np
import pytest

from conftest import make_mlp
from helpers import compress
from helpers.compress import (
    bitmask_bytes,
    choose_encoding,
    decode,
    decode_mask,
    encode,
    encode_mask,
    export_model,
    index_list_bytes,
    load_model,
    read_compressed,
    size_table,
    sparse_forward,
    to_sparse,
)
from helpers.models import build_mlp
from helpers.network import UnsupportedModelError, prunable_kernels
from helpers.pruning import apply_masks, masks_from_scores, removal_count
from helpers.runtime import keras
from helpers.saliency import magnitude


def pruned_mlp(fraction: float = 0.9, scope: str = "layer") -> keras.Sequential:
    """The 784-50-50-50-50-10 network at its seed-0 initialisation with random biases,
    magnitude-pruned."""
    model = build_mlp(seed=0)
    rng = np.random.default_rng(0)
    for variable in model.weights:
        if variable.path.endswith("/bias"):
            variable.assign(rng.normal(0, 0.1, variable.shape).astype(np.float32))
    apply_masks(model, masks_from_scores(magnitude(model), fraction, scope=scope))
    return model


def kernels(model: keras.Model) -> dict[str, np.ndarray]:
    return {path: np.asarray(k.numpy()) for path, k in prunable_kernels(model).items()}


def first_kernel(model: keras.Model) -> keras.Variable:
    return next(iter(prunable_kernels(model).values()))


def images(n: int = 64) -> np.ndarray:
    return np.random.default_rng(3).random((n, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def mlp90() -> keras.Sequential:
    return pruned_mlp(0.9)


# --------------------------------------------------------------------------- round trips


def test_float32_round_trip_is_bitwise(tmp_path, mlp90) -> None:
    path = tmp_path / "mlp.obdc"
    export_model(mlp90, path)
    loaded = load_model(path)
    assert [v.path for v in loaded.weights] == [v.path for v in mlp90.weights]
    for original, restored in zip(mlp90.weights, loaded.weights, strict=True):
        assert np.array_equal(original.numpy(), restored.numpy())
    for path_, kernel in kernels(loaded).items():
        assert np.array_equal(kernel != 0, kernels(mlp90)[path_] != 0)
    x = images()
    assert np.array_equal(loaded(x).numpy(), mlp90(x).numpy())  # bitwise, not allclose
    assert loaded.loss is not None and loaded.loss.get_config()["from_logits"]


def test_float64_model_and_other_activations_round_trip() -> None:
    model = make_mlp(activation="tanh", loss="mse", hidden=(6, 5))  # float64, MSE
    kernel = first_kernel(model)
    kernel.assign(np.where(np.arange(42).reshape(7, 6) % 3 == 0, 0.0, kernel.numpy()))
    stored = decode(encode(model, values="float64"))
    assert (stored.dtype, stored.loss, stored.input_shape) == ("float64", "mse", (7,))
    loaded = compress.build_model(stored)
    x = np.random.default_rng(0).normal(size=(11, 7))
    assert np.array_equal(loaded(x).numpy(), model(x).numpy())
    assert loaded(x).dtype == "float64"


def weight_bound(w: np.ndarray, values: str, scale: float | None) -> np.ndarray:
    """The per-weight error bound stated in the module docstring (0 for pruned weights)."""
    if values == "float16":
        bound = np.maximum(2.0**-11 * np.abs(w), 2.0**-24)
    else:  # int8: scale/2, or below scale for weights that would have rounded to zero
        bound = np.full(w.shape, float(scale))
    return np.where(w == 0, 0.0, bound)


def logit_bound(model: keras.Model, loaded: keras.Model, x: np.ndarray) -> np.ndarray:
    """|logits_loaded - logits| <= e_L, with e_0 = 0 and e_l = e_{l-1} |W~_l| + |a_{l-1}| |dW_l|.

    Follows from a~_l - a_l = phi(a~ W~ + b) - phi(a W + b) and phi 1-Lipschitz (ReLU, linear):
    |a~_l - a_l| <= |(a~ - a) W~ + a (W~ - W)| <= |a~ - a| |W~| + |a| |W~ - W| elementwise.
    """
    a = x.reshape(len(x), -1).astype(np.float64)
    e = np.zeros_like(a)
    for layer, other in zip(model.layers[1:], loaded.layers[1:], strict=True):
        w, w_q = (np.asarray(lay.kernel.numpy(), np.float64) for lay in (layer, other))
        e = e @ np.abs(w_q) + a @ np.abs(w_q - w)
        a = a @ w + np.asarray(layer.bias.numpy(), np.float64)
        a = np.maximum(a, 0) if layer.activation.__name__ == "relu" else a
    return e


@pytest.mark.parametrize("values", ["float16", "int8"])
def test_quantized_round_trip_within_bound(tmp_path, values) -> None:
    model = pruned_mlp(0.8)
    tiny = 1e-9 if values == "float16" else 1e-6  # underflows: must stay nonzero
    kernel = prunable_kernels(model)["mlp/dense_2/kernel"]
    w = kernel.numpy().reshape(-1)
    position = np.flatnonzero(w)[0]
    w[position] = -tiny
    kernel.assign(w.reshape(kernel.shape))
    stored = export_model(model, tmp_path / "q.obdc", values=values)
    loaded = load_model(tmp_path / "q.obdc")
    for (path, w), layer in zip(kernels(model).items(), stored.layers, strict=True):
        w_q = kernels(loaded)[path]
        assert np.array_equal(w_q != 0, w != 0), path  # zeros stay zero, kept stay kept
        error = np.abs(w_q.astype(np.float64) - w)
        assert np.all(error <= weight_bound(w, values, layer.scale) * (1 + 1e-6)), path
        if values == "int8":
            assert layer.scale == np.abs(w).max() / 127
            steps = w_q[w_q != 0] / layer.scale  # whole steps of the scale, 1 to 127
            assert np.allclose(steps, np.rint(steps), atol=1e-4) and np.abs(steps).max() < 127.01
    # The tiny weight became one step of the scale (int8) or the smallest subnormal (float16).
    restored = kernels(loaded)["mlp/dense_2/kernel"].reshape(-1)[position]
    smallest = stored.layers[1].scale if values == "int8" else 2.0**-24
    assert restored == pytest.approx(-smallest, rel=1e-6)
    x = images(32)
    difference = np.abs(loaded(x).numpy().astype(np.float64) - model(x).numpy())
    bound = logit_bound(model, loaded, x)
    assert np.all(difference <= bound * (1 + 1e-4) + 1e-5)
    assert difference.max() > 0  # the quantization really happened


def test_float16_overflow_and_unknown_format_are_rejected() -> None:
    model = make_mlp(dtype="float32")
    kernel = first_kernel(model)
    kernel.assign(np.full(kernel.shape, 1e5, np.float32))
    with pytest.raises(
        ValueError,
        match=rf"layer '{model.layers[0].name}': weights up to 100000 do not fit in float16",
    ):
        encode(model, values="float16")
    for bad in ("bfloat16", "int4", None):
        with pytest.raises(ValueError, match=r"values must be one of \('float64', 'float32'"):
            encode(model, values=bad)


# --------------------------------------------------------------------------- index encodings


@pytest.mark.parametrize("encoding", ["bitmask", "index"])
def test_masks_round_trip_in_both_encodings(encoding) -> None:
    rng = np.random.default_rng(0)
    masks = [rng.random(n) < d for n in (1, 7, 8, 9, 1000, 5000) for d in (0.0, 0.01, 0.3, 1.0)]
    for gaps in ([254], [255], [256], [509, 510, 0, 1, 1000]):  # escape boundaries
        masks.append(np.zeros(sum(gaps) + len(gaps) + 3, bool))
        masks[-1][np.cumsum(np.asarray(gaps) + 1) - 1] = True
    for mask in masks:
        data = encode_mask(mask, encoding)
        expected = bitmask_bytes(mask.size) if encoding == "bitmask" else index_list_bytes(mask)
        assert len(data) == expected
        assert np.array_equal(decode_mask(data, encoding, mask.size, int(mask.sum())), mask)
    assert encode_mask(masks[-1], "index")[:4] == bytes([255, 254, 255, 255])  # 509 = 255+254


def test_encoding_switches_where_sizes_cross() -> None:
    n = 8160  # 32 * 255; the bitmask costs n / 8 = 1020 bytes
    assert bitmask_bytes(n) == 1020
    # Spread out (no gap reaches 255): the index list costs k bytes and wins for k < n/8.
    for k, expected in ((1000, "index"), (1019, "index"), (1020, "bitmask"), (1040, "bitmask")):
        mask = np.zeros(n, bool)
        mask[np.linspace(0, n - 1, k).round().astype(int)] = True
        assert (index_list_bytes(mask), choose_encoding(mask)) == (k, expected)
    # Most escapes possible (all pruned weights first): k + (n - k) // 255 bytes; the crossing
    # moves down to k/n = (255/8 - 1) / 254, as the module docstring derives.
    crossing = (255 / 8 - 1) / 254 * n  # 991.9
    for k in (980, 991, 992, 1000):
        mask = np.zeros(n, bool)
        mask[n - k :] = True
        assert index_list_bytes(mask) == k + (n - k) // 255
        assert choose_encoding(mask) == ("index" if k < crossing else "bitmask")


def test_file_records_the_chosen_encoding_per_layer() -> None:
    model = make_mlp(n_in=80, hidden=(100,), n_out=4, dtype="float32")
    kernel = first_kernel(model)  # 8000 weights, bitmask 1000 bytes
    w = kernel.numpy().reshape(-1)
    for k, expected in ((999, "index"), (1000, "bitmask")):
        keep = np.zeros(w.size, bool)
        keep[np.linspace(0, w.size - 1, k).round().astype(int)] = True
        kernel.assign(np.where(keep, w, 0).reshape(80, 100))
        first = decode(encode(model)).layers[0]
        assert (first.encoding, first.index_bytes, first.nnz) == (expected, min(k, 1000), k)


# --------------------------------------------------------------------------- sizes


def test_sizes_at_90_percent(tmp_path, mlp90) -> None:
    table = size_table(mlp90, values=("float32", "int8"))
    dense_npz, dense_h5 = table["dense float32 .npz"], table["dense .weights.h5"]
    assert dense_npz.raw > 47_410 * 4  # every weight, zeros included
    pruned = table["compressed float32"]
    assert pruned.raw < dense_npz.raw / 5 and pruned.raw < dense_h5.raw / 5
    assert table["compressed int8"].raw < pruned.raw / 2
    # The file is the prefix, the header and exactly the segments the header lists.
    stored = export_model(mlp90, tmp_path / "m.obdc")
    assert compress.file_sizes(tmp_path / "m.obdc") == pruned
    kept = sum(layer.nnz for layer in stored.layers)
    widths = (39_200, 2_500, 2_500, 2_500, 500)
    assert kept == stored.num_kept == sum(n - removal_count(0.9, n) for n in widths)
    segments = sum(layer.index_bytes + layer.value_bytes for layer in stored.layers) + 210 * 4
    header = struct.unpack_from("<4sHIII", (tmp_path / "m.obdc").read_bytes())[2]
    assert pruned.raw == 18 + header + segments
    assert all(layer.encoding == "index" for layer in stored.layers)  # 10% < 12.5% kept


# --------------------------------------------------------------------------- sparse inference


def test_sparse_forward_matches_keras(tmp_path, mlp90) -> None:
    x = images()
    logits = mlp90(x).numpy()
    stored = export_model(mlp90, tmp_path / "m.obdc")
    chain = to_sparse(stored)
    assert [layer.kernel_t.nnz for layer in chain.layers] == [lay.nnz for lay in stored.layers]
    for source in (chain, stored, tmp_path / "m.obdc"):
        out = sparse_forward(source, x)
        assert out.shape == logits.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    quantized = export_model(mlp90, tmp_path / "q.obdc", values="int8")
    expected = load_model(tmp_path / "q.obdc")(x).numpy()
    np.testing.assert_allclose(sparse_forward(quantized, x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x has shape \(2, 784\); inputs of shape"):
        sparse_forward(chain, np.zeros((2, 784)))


def test_sparse_forward_other_activations() -> None:
    for activation in ("tanh", "sigmoid"):
        model = make_mlp(activation=activation)
        out = sparse_forward(decode(encode(model, values="float64")), np.ones((3, 7)))
        np.testing.assert_allclose(out, model(np.ones((3, 7))).numpy(), rtol=1e-12)


# --------------------------------------------------------------------------- bad input


def test_unsupported_models_and_non_finite_weights() -> None:
    conv = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(2, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    with pytest.raises(UnsupportedModelError, match=r"Dense layers only.*conv2d"):
        encode(conv)
    pooled = keras.Sequential([keras.Input((4, 4)), keras.layers.Flatten(), keras.layers.Dense(3)])
    pooled.add(keras.layers.BatchNormalization())
    with pytest.raises(UnsupportedModelError, match="BatchNormalization"):
        encode(pooled)
    model = make_mlp(dtype="float32")
    bias = model.layers[1].bias
    bias.assign(np.full(bias.shape, np.inf, np.float32))
    with pytest.raises(ValueError, match=rf"weight '{bias.path}' has 5 non-finite"):
        encode(model)


def rewrap(data: bytes, edit) -> bytes:
    """``data`` with its header replaced by ``edit(header)`` and a CRC that matches again."""
    _, version, head_len, payload_len, _ = struct.unpack_from("<4sHIII", data)
    header = json.loads(data[18 : 18 + head_len])
    edit(header)
    head = json.dumps(header).encode()
    payload = data[18 + head_len :]
    crc = zlib.crc32(head + payload)
    return struct.pack("<4sHIII", b"OBDC", version, len(head), payload_len, crc) + head + payload


def test_corrupt_files_name_the_file_and_the_problem(tmp_path) -> None:
    data = encode(make_mlp(dtype="float32"))
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    version = bytearray(data)
    version[4] = 9

    def drop_a_kept_weight(header) -> None:
        header["layers"][0]["nnz"] -= 1

    cases = {
        "short": (data[:10], "truncated: 10 bytes, shorter than the prefix"),
        "truncated": (data[:-3], f"truncated: {len(data) - 3} bytes, {len(data)} expected"),
        "longer": (data + b"\0\0", "2 unexpected bytes after the payload"),
        "magic": (b"PK\x03\x04" + data[4:], r"not a compressed model: magic b'PK\\x03\\x04'"),
        "version": (bytes(version), "format version 9 is not supported"),
        "flipped": (bytes(flipped), "corrupt: the CRC-32 does not match"),
        "nnz": (rewrap(data, drop_a_kept_weight), "malformed contents: .*segment sizes"),
        "dtype": (
            rewrap(data, lambda h: h.update(dtype="float16")),
            "malformed contents: .*model dtype 'float16'",
        ),
        "values": (
            rewrap(data, lambda h: h.update(values="int4")),
            "malformed contents: .*values must be one of",
        ),
        "layers": (
            rewrap(data, lambda h: h.update(layers=h["layers"][:-1])),
            "malformed contents: .*2 layers use .* of the .* payload bytes",
        ),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.obdc"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
            read_compressed(path)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_model(path)
