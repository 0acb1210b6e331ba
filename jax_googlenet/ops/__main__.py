"""`python -m jax_googlenet.ops`: which kernel computes each layer of the network, forward and backward, and the
options its steps compile with (`jax_googlenet.ops.plan`).

    python -m jax_googlenet.ops --image-size 224 --batch-size 16 [--eval | --folded] [--variant V] [--backend cpu|gpu]
"""

from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag: one line on stderr, exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None) -> int:
    from jax_googlenet.model import VARIANTS
    from jax_googlenet.ops import plan
    from jax_googlenet.sizes import accepted_sides, side_ok

    p = _Parser(prog="python -m jax_googlenet.ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default 16)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--eval", action="store_true", help="the inference forward instead of the train step")
    kind.add_argument("--folded", action="store_true",
                      help="the inference forward on BatchNorm-folded variables (jax_googlenet.fold)")
    p.add_argument("--variant", default="torchvision", choices=list(VARIANTS), help="default torchvision")
    p.add_argument("--impl", default="auto", choices=plan.IMPLS, help="googlenet()'s impl (default auto)")
    p.add_argument("--backend", default=None, choices=plan.BACKENDS, help="default: this machine's")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"),
                   help="computation dtype (default float32)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    mode = "folded" if args.folded else "eval" if args.eval else "train"
    aux = mode == "train"
    if not side_ok(args.variant, args.image_size, aux):
        lo, hi = accepted_sides(args.variant, aux)
        band = f"{lo} to {hi}" if hi else f"at least {lo}"
        p.error(f"--image-size {args.image_size}: the {args.variant!r} variant{' with aux heads' if aux else ''} "
                f"takes {band} pixels")
    if args.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    rows = plan.network_plan(args.image_size, args.batch_size, mode=mode, variant=args.variant, impl=args.impl,
                             backend=args.backend, dtype=args.dtype)
    backend = args.backend or __import__("jax").default_backend()
    print(f"{args.variant}, {args.batch_size} x {args.image_size} x {args.image_size}, {mode}, {args.dtype}, "
          f"impl {args.impl!r} = {plan.resolve_impl(args.impl, backend)!r} on {backend}")
    print(f"compiled with {plan.compiler_options(args.image_size, args.dtype, backend)}: "
          f"{plan.xla_kernels(args.image_size, args.dtype, backend)}")
    print(plan.table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
