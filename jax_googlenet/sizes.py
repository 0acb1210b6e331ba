"""Input-size arithmetic: each stage's spatial side for an input side, and the sides each variant accepts."""

from __future__ import annotations

from jax_googlenet.ops.pool import pool_output_size


def _variant(variant):
    """The `Variant` for a name or a `Variant`."""
    if isinstance(variant, str):
        from jax_googlenet.model import check_variant  # the variant table imports this module

        return check_variant(variant)
    return variant


def stage_sizes(variant, side: int) -> dict[str, int]:
    """Spatial side length after each stage, for an input side `side` (rows and columns are independent)."""
    v = _variant(variant)
    sizes = {}
    n = (side + 2 * 3 - 7) // 2 + 1  # conv1: 7x7 stride 2 pad 3
    sizes["conv1"] = n
    n = pool_output_size(n, 3, 2, 0, v.pool_mode)
    sizes["maxpool1"] = n
    n = pool_output_size(n, 3, 2, 0, v.pool_mode)
    sizes["stem"] = n  # after maxpool2
    sizes["inception3b"] = n
    n = pool_output_size(n, 3, 2, 0, v.pool_mode)
    sizes["inception4a"] = sizes["inception4e"] = n
    for window, stride in v.maxpool4:
        n = pool_output_size(n, window, stride, 0, v.pool_mode)
    sizes["inception5b"] = n
    a = sizes["inception4a"]
    sizes["aux"] = 4 if v.aux_pool == "adaptive4" else (a - 5) // 3 + 1
    return sizes


def side_ok(variant, side: int, aux: bool) -> bool:
    """Whether the variant (with its aux heads if `aux`) runs on images `side` pixels wide."""
    v = _variant(variant)
    sizes = stage_sizes(v, side)
    ok = side >= 1 and min(n for k, n in sizes.items() if k != "aux") >= 1
    return ok and (not aux or sizes["aux"] == v.aux_grid)


def accepted_sides(variant, aux: bool, up_to: int = 2048) -> tuple[int, int | None]:
    """(smallest, largest or None) input side the variant accepts; the aux heads of the paper and the writeup
    variants have a fixed-size fc1, so with them only a band of sizes works."""
    v = _variant(variant)
    ok = [s for s in range(1, up_to + 1) if side_ok(v, s, aux)]
    return ok[0], (None if ok[-1] == up_to else ok[-1])


def check_input(variant, shape: tuple[int, ...], in_channels: int, aux: bool) -> None:
    """Raises ValueError, saying which sides work, unless `shape` is NHWC with `in_channels` channels and sides
    the variant accepts."""
    v = _variant(variant)
    if len(shape) != 4 or shape[-1] != in_channels:
        raise ValueError(f"GoogLeNet expects NHWC images with {in_channels} channels, got shape {tuple(shape)}")
    for side in shape[1:3]:
        if not side_ok(v, side, aux):
            lo, hi = accepted_sides(v, aux)
            band = f"{lo} to {hi}" if hi else f"at least {lo}"
            why = " (the aux heads' fc1 has a fixed input size; pass aux_logits=False for others)" if hi else ""
            raise ValueError(f"the {v.name!r} variant{' with aux heads' if aux else ''} accepts image sides "
                             f"of {band} pixels{why}; got {shape[1]}x{shape[2]}")
