"""python -m convert --weights FILE.pth --out DIR [--check]: a PyTorch GoogLeNet state dict -> orbax checkpoint."""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from convert.torchvision import (ConversionError, download_state_dict, infer_config, load_state_dict,
                                 torchvision_to_flax, without_aux)
from jax_googlenet.model import check_variant, googlenet


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, no usage block: the message says what to change."""
        self.exit(2, f"error: {message}\n")


def variant_name(text: str) -> str:
    """--variant's value, refused in one line when it is a variant's earlier name."""
    try:
        check_variant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_args(argv):
    p = Parser(prog="python -m convert", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="a .pth state dict (e.g. torchvision's googlenet-1378be20.pth)")
    src.add_argument("--download", action="store_true", help="torchvision's IMAGENET1K_V1 weights (needs network)")
    p.add_argument("--out", required=True, help="new directory for the orbax checkpoint")
    p.add_argument("--variant", default="torchvision", type=variant_name, choices=["torchvision", "writeup"],
                   help="torchvision's names, or the write-up's (ince_3a...) into the writeup variant")
    p.add_argument("--no-aux", dest="aux", action="store_false", help="skip the aux heads (untrained in the "
                   "pretrained file; torchvision drops them too)")
    p.add_argument("--transform-input", default=None, action=argparse.BooleanOptionalAction,
                   help="torchvision's input re-normalisation (default: on for the torchvision variant, as "
                        "torchvision sets it with its pretrained weights; off for writeup)")
    p.add_argument("--check", action="store_true", help="compare with PyTorch on one random batch")
    return p.parse_args(argv)


def check(state_dict, config, variables) -> tuple[float, float]:
    """(max abs, relative) difference of PyTorch's and our eval logits on one random batch."""
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")
    torch_model = _torch_model(state_dict, config)
    x = torch.randn(2, config["in_channels"], 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch_model(x).numpy()
    model = googlenet(**config)
    ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x.numpy().transpose(0, 2, 3, 1)))
    return float(np.abs(ours - ref).max()), float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _torch_model(state_dict, config):
    import torchvision

    m = torchvision.models.googlenet(weights=None, num_classes=config["num_classes"], aux_logits=config["aux_logits"],
                                     transform_input=config["transform_input"], init_weights=False)
    m.load_state_dict(state_dict if config["aux_logits"] else without_aux(state_dict), strict=True)
    return m.eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sd = download_state_dict() if args.download else load_state_dict(args.weights)
        config = infer_config(sd, args.variant, aux=args.aux)
        transform = args.transform_input if args.transform_input is not None else args.variant == "torchvision"
        config["transform_input"] = transform
        if args.transform_input is None:
            print(f"transform_input={transform} (the default for the {args.variant} variant; "
                  "--transform-input/--no-transform-input to choose)")
        variables = torchvision_to_flax(sd, variant=args.variant, aux=args.aux, model=googlenet(**config))
        from jax_googlenet.checkpoint import save_model

        if args.check:
            if args.variant != "torchvision":
                raise ConversionError("--check compares with torchvision's model: only for --variant torchvision")
            abs_err, rel_err = check(sd, config, variables)
            print(f"check against torchvision on a random batch of 2: max abs difference {abs_err:.3g}, "
                  f"relative {rel_err:.3g}")
        path = save_model(args.out, variables, config)
    except (ValueError, FileExistsError) as e:  # ConversionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    print(f"wrote {path}: {config} with {n:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
