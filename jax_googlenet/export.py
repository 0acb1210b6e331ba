"""Serving without the model code: a GoogLeNet's inference function exported as StableHLO (`jax.export`) or as an
ONNX graph, and `load` to run either.

The exported function is inference: running statistics, no aux heads, no dropout, on NHWC images of a fixed side
and any batch size, returning logits. Its input is float32 normalised as the model expects (`serving`'s mean and
std; `transform_input` stays inside, as in the model), or with `uint8_input` the uint8 pixels, the normalisation
inside the graph.

- StableHLO: `jax.export` of `model.apply` with a symbolic batch dimension, lowered for the CPU and CUDA, on
  XLA's own convolutions and pools (`impl="xla"`; the CPU's Winograd kernels are a training speed choice) and
  serialized to one file; `PATH.json` beside it keeps the serving metadata. Anyone with jax runs the file with
  `jax.export.deserialize(open(PATH, "rb").read()).call(x)`. BatchNorm stays unfolded here: the graph is
  `model.apply`'s, within the 1e-6 parity bound, where folding (`jax_googlenet.fold`) moves the logits 6e-6
  relative at 224 pixels on tests/test_export.py's weights (float32 rounding of the scaled kernels).
- ONNX: the graph is written node by node from the variant table with the `onnx` package's helpers (Conv, Relu,
  MaxPool with `ceil_mode`, LRN, Concat, GlobalAveragePool, Gemm), BatchNorm folded into each conv's kernel and
  bias, so each Conv feeds its Relu directly. The model's metadata_props hold the serving metadata. Tracing
  JAX into ONNX (jax2onnx 0.17) needs orbax-checkpoint < 0.11.37 and lowers the ceil-mode max pools to graphs
  onnxruntime refuses or computes differently; building from the table gives the graph torchvision's own export
  gives, with the exact pools.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jax_googlenet.fold import fold_batch_norm_flat
from jax_googlenet.imagenet import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD
from jax_googlenet.model import INCEPTION_TABLE, GoogLeNet, accepted_sides, stage_sizes
from jax_googlenet.ops import pool_output_size
from jax_googlenet.ops.pool import pool_padding

FORMATS = ("onnx", "stablehlo")
ONNX_OPSET = 17
METADATA_KEY = "jax_googlenet.serving"  # ONNX metadata_props key (and the StableHLO sidecar's content)
INPUT, OUTPUT = "images", "logits"


def check_image_size(model: GoogLeNet, side: int) -> None:
    """A ValueError in one line when the model's variant refuses `side`-pixel images in inference."""
    lo, hi = accepted_sides(model.variant, aux=False)
    if side < lo or (hi is not None and side > hi):
        band = f"{lo} to {hi}" if hi else f"{lo} and more"
        raise ValueError(f"image size {side}: the {model.variant.name} variant accepts sides of {band} pixels")


def inference_function(model: GoogLeNet, variables: dict[str, Any], serving: dict[str, Any], *,
                       uint8_input: bool = False) -> Callable[[jax.Array], jax.Array]:
    """x (NHWC float32 normalised, or uint8 with `uint8_input`) -> logits, on XLA's convolutions and pools."""
    model = model.clone(impl="xla")
    used = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
    used = jax.tree.map(jnp.asarray, {k: {m: p for m, p in v.items() if not m.startswith("aux")}
                                      for k, v in used.items()})
    mean, std = np.asarray(serving["mean"], np.float32), np.asarray(serving["std"], np.float32)

    def infer(x):
        if uint8_input:
            x = (x.astype(jnp.float32) / 255.0 - mean) / std
        return model.apply(used, x, train=False)

    return infer


def _input_spec(model: GoogLeNet, side: int, uint8_input: bool, batch) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch, side, side, model.in_channels), jnp.uint8 if uint8_input else jnp.float32)


def stablehlo_bytes(model: GoogLeNet, variables: dict[str, Any], serving: dict[str, Any], *, image_size: int,
                    uint8_input: bool = False, platforms: tuple[str, ...] = ("cpu", "cuda")) -> bytes:
    """The serialized `jax.export` of the inference function, batch dimension symbolic.

    Args:
      model, variables: the network and its variables (aux heads, if any, are left out).
      serving: the model's serving metadata (`jax_googlenet.checkpoint.SERVING_KEYS`); its mean and std are
        used with `uint8_input`.
      image_size: the fixed image side.
      uint8_input: take uint8 pixels and normalise inside.
      platforms: the platforms lowered for.

    Returns:
      The bytes `jax.export.deserialize` reads.
    """
    check_image_size(model, image_size)
    batch, = jax.export.symbolic_shape("batch")
    fn = jax.jit(inference_function(model, variables, serving, uint8_input=uint8_input))
    exported = jax.export.export(fn, platforms=platforms)(_input_spec(model, image_size, uint8_input, batch))
    return bytes(exported.serialize())


# ----------------------------------------------------------------------------------------------- ONNX


class _Graph:
    """Nodes and initializers of an ONNX graph under construction, with fresh names."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name


def _folded_convs(model: GoogLeNet, variables: dict[str, Any]) -> dict[tuple[str, ...], tuple[np.ndarray, ...]]:
    """{module path: (OIHW kernel, bias)} of every BasicConv, BatchNorm folded into the kernel and bias."""
    flat = {p: np.asarray(v, np.float32) for p, v in traverse_util.flatten_dict(dict(variables)).items()}
    if model.variant.batch_norm:
        flat = fold_batch_norm_flat(flat)
    return {p[1:-2]: (v.transpose(3, 2, 0, 1), flat[(*p[:-1], "bias")])
            for p, v in flat.items() if p[0] == "params" and p[-2:] == ("conv", "kernel")}


def onnx_model(model: GoogLeNet, variables: dict[str, Any], serving: dict[str, Any], *, image_size: int,
               uint8_input: bool = False, opset: int = ONNX_OPSET):
    """The inference function as an `onnx.ModelProto` built from the variant table, BatchNorm folded.

    Args:
      model, variables, serving, image_size, uint8_input: as `stablehlo_bytes`.
      opset: the ONNX opset (17 or later).

    Returns:
      A checked `onnx.ModelProto`: input "images" [batch, side, side, channels] (float32 or uint8), output
      "logits" [batch, num_classes]; the serving metadata as JSON in metadata_props.
    """
    import onnx
    from onnx import TensorProto, helper

    check_image_size(model, image_size)
    if opset < 17:
        raise ValueError(f"opset {opset}: the export needs 17 or later")
    v, g = model.variant, _Graph()
    convs = _folded_convs(model, variables)
    side = image_size

    def conv(x, path, stride=1):
        kernel, bias = convs[path]
        name = "/".join(path)
        k, pad = kernel.shape[-1], kernel.shape[-1] // 2
        y = g.op("Conv", [x, g.const(f"{name}/kernel", kernel), g.const(f"{name}/bias", bias)], f"{name}/conv",
                 kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        return g.op("Relu", [y], f"{name}/relu")

    def pool(x, n, window, stride, mode, pad=0):
        if mode == "same":  # TensorFlow SAME: explicit, possibly asymmetric padding
            lo, hi = pool_padding(n, window, stride, pad, mode)
            attrs = dict(pads=[lo, lo, hi, hi])
        else:  # torch's ceil/floor mode; ONNX pads MaxPool with -inf
            attrs = dict(pads=[pad] * 4, ceil_mode=int(mode == "ceil"))
        y = g.op("MaxPool", [x], g.name("maxpool"), kernel_shape=[window, window], strides=[stride, stride],
                 **attrs)
        return y, pool_output_size(n, window, stride, pad, mode)

    x = g.op("Transpose", [INPUT], "to_nchw", perm=[0, 3, 1, 2])
    shape = [1, model.in_channels, 1, 1]
    if uint8_input:
        x = g.op("Cast", [x], "to_float", to=TensorProto.FLOAT)
        x = g.op("Div", [x, g.const("255", np.float32(255.0))], "scaled")
        x = g.op("Sub", [x, g.const("mean", np.asarray(serving["mean"], np.float32).reshape(-1, 1, 1))], "centred")
        x = g.op("Div", [x, g.const("std", np.asarray(serving["std"], np.float32).reshape(-1, 1, 1))],
                 "normalised")
    if model.transform_input:
        # torchvision's transform_input: undo ImageNet's normalisation, redo it as (x - 0.5) / 0.5.
        mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
        x = g.op("Mul", [x, g.const("transform_input/scale", (std / 0.5).reshape(shape))], "transform_input/mul")
        x = g.op("Add", [x, g.const("transform_input/shift", ((mean - 0.5) / 0.5).reshape(shape))],
                 "transform_input/add")
    x = conv(x, ("conv1",), stride=2)
    n = stage_sizes(v, side)["conv1"]
    x, n = pool(x, n, 3, 2, v.pool_mode)
    if v.stem_lrn:
        x = g.op("LRN", [x], "lrn1", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    x = conv(conv(x, ("conv2",)), ("conv3",))
    if v.stem_lrn:
        x = g.op("LRN", [x], "lrn2", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    x, n = pool(x, n, 3, 2, v.pool_mode)
    branch_pool = "ceil" if v.pool_mode == "same" else v.pool_mode  # stride 1, padding 1: the size is kept
    for name, *_ in INCEPTION_TABLE:
        if name == "inception4a":
            x, n = pool(x, n, 3, 2, v.pool_mode)
        if name == "inception5a":
            for window, stride in v.maxpool4:
                x, n = pool(x, n, window, stride, v.pool_mode)
        b1 = conv(x, (name, "branch1"))
        b2 = conv(conv(x, (name, "branch2_0")), (name, "branch2_1"))
        b3 = conv(conv(x, (name, "branch3_0")), (name, "branch3_1"))
        p, _ = pool(x, n, 3, 1, branch_pool, pad=1)
        if v.branch4_relu:
            p = g.op("Relu", [p], f"{name}/branch4_0/relu")
        b4 = conv(p, (name, "branch4_1"))
        x = g.op("Concat", [b1, b2, b3, b4], f"{name}/concat", axis=1)
    x = g.op("GlobalAveragePool", [x], "avgpool")
    x = g.op("Flatten", [x], "flatten", axis=1)
    fc = variables["params"]["fc"]
    g.op("Gemm", [x, g.const("fc/kernel", np.asarray(fc["kernel"], np.float32)),
                  g.const("fc/bias", np.asarray(fc["bias"], np.float32))], OUTPUT)
    dtype = TensorProto.UINT8 if uint8_input else TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes, f"googlenet_{v.name}",
        [helper.make_tensor_value_info(INPUT, dtype, ["batch", side, side, model.in_channels])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", model.num_classes])],
        initializer=g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="jax_googlenet")
    # The lowest IR version that carries the opset: onnx 1.23 writes IR 14, which onnxruntime 1.31 refuses (it
    # reads up to 13); the lowest keeps the file readable by older runtimes too.
    proto.ir_version = helper.find_min_ir_version_for(list(proto.opset_import))
    helper.set_model_props(proto, {METADATA_KEY: json.dumps(_metadata(serving, image_size, uint8_input))})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _metadata(serving: dict[str, Any], image_size: int, uint8_input: bool) -> dict[str, Any]:
    """The serving metadata of an export at `image_size`: the resize keeps the model's ratio to the crop."""
    resize = round(image_size * serving["resize_size"] / serving["image_size"])
    return {**serving, "image_size": image_size, "resize_size": max(resize, image_size), "uint8_input": uint8_input}


# ----------------------------------------------------------------------------------------------- write / load


def export(model: GoogLeNet, variables: dict[str, Any], serving: dict[str, Any], path: str | Path, *,
           format: str, image_size: int, uint8_input: bool = False) -> list[Path]:
    """Write the inference function to `path` (and for StableHLO its metadata to `path`.json), atomically.

    Args:
      model, variables, serving, image_size, uint8_input: as `stablehlo_bytes`.
      path: the new file; an existing one is a FileExistsError.
      format: "onnx" or "stablehlo".

    Returns:
      The files written.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    files = {path: b""}
    if format == "stablehlo":
        files[sidecar(path)] = b""
    for f in files:
        if f.exists():
            raise FileExistsError(f"{f} exists already; remove it or choose another --out")
    if format == "onnx":
        files[path] = onnx_model(model, variables, serving, image_size=image_size,
                                 uint8_input=uint8_input).SerializeToString()
    else:
        files[path] = stablehlo_bytes(model, variables, serving, image_size=image_size, uint8_input=uint8_input)
        files[sidecar(path)] = json.dumps(_metadata(serving, image_size, uint8_input), indent=1).encode()
    for f, data in reversed(files.items()):  # the main file last: it appears only with its metadata
        write_atomic(f, data)
    return list(files)


def sidecar(path: str | Path) -> Path:
    """The serving metadata beside a StableHLO file."""
    return Path(f"{path}.json")


def write_atomic(path: Path, data: bytes) -> None:
    """`data` to a temporary file in `path`'s directory, flushed to disk, renamed over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # a plain file's mode, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself on disk
        finally:
            os.close(directory)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_format(path: str | Path) -> str | None:
    """"onnx" or "stablehlo" for an exported file (by its suffix, .onnx or .stablehlo), else None."""
    suffix = Path(path).suffix.lower()
    return {".onnx": "onnx", ".stablehlo": "stablehlo"}.get(suffix)


class Exported:
    """An exported model, runnable: `exported(x)` -> logits as a numpy array; `serving` its metadata, `format`,
    `input_dtype` (float32 or uint8) and `input_shape` (None for the batch)."""

    def __init__(self, format: str, run: Callable, serving: dict[str, Any], input_shape, input_dtype):
        self.format, self._run, self.serving = format, run, serving
        self.input_shape, self.input_dtype = tuple(input_shape), np.dtype(input_dtype)

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape[1:] or x.dtype != self.input_dtype:
            want = "x".join("N" if d is None else str(d) for d in self.input_shape)
            raise ValueError(f"the exported model takes {self.input_dtype} images of shape {want}, "
                             f"got {x.dtype} {x.shape}")
        return np.asarray(self._run(x))


def load(path: str | Path) -> Exported:
    """Run an exported file (.onnx through onnxruntime's CPU provider, .stablehlo through `jax.export`)
    without building the Flax model.

    Args:
      path: a file written by `export`.

    Returns:
      An `Exported`: call it on NHWC images (float32 normalised, or uint8 if exported with uint8_input).
    """
    path = Path(path)
    format = file_format(path)
    if format == "stablehlo":
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
        meta = json.loads(sidecar(path).read_text()) if sidecar(path).exists() else {}
        aval = exported.in_avals[0]
        shape = (None, *aval.shape[1:])
        return Exported(format, jax.jit(exported.call), meta, shape, aval.dtype)
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
        spec = session.get_inputs()[0]
        shape = tuple(d if isinstance(d, int) else None for d in spec.shape)
        dtype = np.uint8 if spec.type == "tensor(uint8)" else np.float32
        return Exported(format, lambda x: session.run([OUTPUT], {spec.name: x})[0], meta, shape, dtype)
    raise ValueError(f"{path}: not an exported model (expected a .onnx or .stablehlo file)")
