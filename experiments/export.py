"""python -m experiments.export --weights W --format onnx|stablehlo --out PATH: a GoogLeNet for serving.

W is a torchvision .pth state dict, a `python -m convert` directory, a job's `model/` or its run directory. The
file holds the inference function (running statistics, no aux heads, no dropout) on NHWC images of a fixed side
(`--image-size`, default the model's) and any batch size: float32 normalised as the model expects, or with
`--uint8-input` uint8 pixels normalised inside. StableHLO: `jax.export`, for the CPU and CUDA, with PATH.json
beside it holding what serving needs (image size, normalisation, class names); ONNX: the graph built from the
variant table, BatchNorm folded, that metadata in its metadata_props. `python -m experiments.predict --weights
PATH` runs either. Bad input: one line on stderr, exit status 2, nothing written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from experiments.cli import Parser, UsageError
from jax_googlenet import export
from jax_googlenet.model import GoogLeNet


def parse_args(argv):
    p = Parser(prog="python -m experiments.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True,
                   help="a torchvision .pth, a `python -m convert` directory, a job's model/ or run directory")
    p.add_argument("--format", required=True, help="onnx or stablehlo")
    p.add_argument("--out", required=True, help="the new file (StableHLO also writes OUT.json)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the square images the export takes (default: the model's, 224 for ImageNet)")
    p.add_argument("--uint8-input", action="store_true",
                   help="take uint8 pixels and normalise (and transform_input) inside the exported function")
    return p.parse_args(argv)


def read_weights(path: str | Path) -> tuple[GoogLeNet, dict[str, Any], dict[str, Any]]:
    """(model, variables, serving metadata) from a .pth, a `python -m convert` directory, a job's model/ or run
    directory; a ValueError in one line when `path` is none of them or does not load."""
    from jax_googlenet.checkpoint import load_model, load_serving

    path = Path(path)
    if path.is_dir() and (path / "model").is_dir() and not (path / "config").is_dir():
        path = path / "model"  # a job's run directory
    if path.is_dir():
        if not (path / "config").is_dir() or not (path / "variables").is_dir():
            raise ValueError(f"{path}: not a model directory (no config/ and variables/ in it) nor a run "
                             "directory with model/")
        try:
            model, variables = load_model(path)
            serving = load_serving(path)
        except Exception as e:  # orbax's errors for a damaged directory have many types
            raise ValueError(f"{path}: the model does not load ({type(e).__name__}: {_first_line(e)})") from None
        return model, variables, serving
    if not path.is_file():
        raise ValueError(f"{path}: no such file or directory")
    from convert import load_weights
    from jax_googlenet.checkpoint import default_serving

    try:
        model, variables = load_weights(path)
    except (ValueError, OSError, RuntimeError) as e:  # ConversionError is a ValueError
        raise ValueError(f"{path}: not a GoogLeNet state dict ({_first_line(e)})") from None
    config = dict(num_classes=model.num_classes, in_channels=model.in_channels)
    return model, variables, {**default_serving(config), "transform_input": model.transform_input}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def signature(exported: export.Exported) -> str:
    """`images: float32[batch, 224, 224, 3] -> logits: float32[batch, 1000]` of a loaded export."""
    shape = ", ".join("batch" if d is None else str(d) for d in exported.input_shape)
    n = len(exported.serving.get("class_names", [])) or "?"
    return f"{export.INPUT}: {exported.input_dtype}[{shape}] -> {export.OUTPUT}: float32[batch, {n}]"


def run(args) -> list[Path]:
    if args.format not in export.FORMATS:
        raise UsageError(f"--format {args.format}: unknown; choose one of {', '.join(export.FORMATS)}")
    out = Path(args.out)
    if export.file_format(out) != args.format:
        raise UsageError(f"--out {out}: name a .{'onnx' if args.format == 'onnx' else 'stablehlo'} file for "
                         f"--format {args.format}")
    for f in (out, export.sidecar(out)) if args.format == "stablehlo" else (out,):
        if f.exists():
            raise UsageError(f"--out {out}: {f} exists already; remove it or choose another path")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the directory {out.parent} does not exist")
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UsageError('--format onnx needs onnx and onnxruntime: pip install "jax-googlenet[onnx]"') from None
    try:
        model, variables, serving = read_weights(args.weights)
    except ValueError as e:
        raise UsageError(f"--weights {e}") from None
    side = args.image_size or serving["image_size"]
    if args.image_size is None:
        print(f"image size {side} (the model's; --image-size to choose)")
    try:
        export.check_image_size(model, side)
    except ValueError as e:
        raise UsageError(f"--image-size: {e}") from None
    serving = {k: v for k, v in serving.items() if k != "transform_input"}
    files = export.export(model, variables, serving, out, format=args.format, image_size=side,
                          uint8_input=args.uint8_input)
    loaded = export.load(out)
    x = np.zeros((1, *loaded.input_shape[1:]), loaded.input_dtype)
    loaded(x)  # the file runs
    for f in files:
        print(f"wrote {f} ({f.stat().st_size:,} bytes)")
    given = "uint8 pixels" if args.uint8_input else f"normalised with mean {serving['mean']} std {serving['std']}"
    print(f"{args.format}: {signature(loaded)}; input {given}, transform_input={model.transform_input} inside")
    return files


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
