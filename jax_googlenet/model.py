"""GoogLeNet (Inception v1, Szegedy et al. 2014, arXiv:1409.4842) in Flax linen, NHWC.

One network, three variants given as data (`VARIANTS`):

- ``torchvision``: exactly torchvision 0.29's ``models/googlenet.py`` (the pretrained weights' architecture).
- ``paper``: the paper's Table 1 and Figure 3.
- ``writeup``: the MNIST model of a PyTorch write-up that trains GoogLeNet on MNIST, the document this project
  started from, quirks included.

Submodules are named after torchvision's attributes (``conv1``, ``inception3a/branch2_1/conv``, ``aux1/fc1``,
``fc``): a torchvision key maps to a Flax path by replacing ``.N`` with ``_N`` (see ``convert/``). This file is
the architecture only: the layers are in `layers.py`, the input-size arithmetic in `sizes.py`, the convolution and
pooling kernels (and which computes each layer) in `ops/`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_googlenet.imagenet import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD
from jax_googlenet.layers import BatchNorm, Conv, Dtype, RepeatedGridDense, dense, initializers, max_pool
from jax_googlenet.ops import adaptive_avg_pool, local_response_norm, plan, resolve_impl
from jax_googlenet.sizes import accepted_sides, check_input, stage_sizes  # noqa: F401 (imported from here too)

# name, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool proj: the paper's Table 1, shared by every variant.
INCEPTION_TABLE: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)
# The stem, torchvision's layers before inception3a: (name, features, kernel, stride, padding) for a BasicConv,
# a name alone for a 3x3/2 max pool or (the paper variant's) local response normalisation. NHWC shapes at 224
# with ceil-mode pools: conv1 N x 112 x 112 x 64, maxpool1 N x 56 x 56 x 64 (floor mode, the writeup: 55),
# conv3 N x 56 x 56 x 192, maxpool2 N x 28 x 28 x 192.
STEM = (("conv1", 64, 7, 2, 3), "maxpool1", "lrn", ("conv2", 64, 1, 1, 0), ("conv3", 192, 3, 1, 1), "lrn",
        "maxpool2")
# The max pools between stages, by the block they precede: maxpool3 (3x3/2: N x 28 x 28 x 480 -> N x 14 x 14
# x 480) and maxpool4 (N x 14 x 14 x 832 -> N x 7 x 7 x 832 with the variant's `maxpool4` windows).
POOL_BEFORE = {"inception4a": "maxpool3", "inception5a": "maxpool4"}
# Which stage each auxiliary head reads.
AUX_AFTER = {"aux1": "inception4a", "aux2": "inception4d"}
# Stage outputs that `GoogLeNet.features` returns, besides the pooled vector.
FEATURE_STAGES = ("stem", "inception3b", "inception4e", "inception5b")


@dataclasses.dataclass(frozen=True)
class Variant:
    """The switches in which the three GoogLeNets differ."""

    name: str
    batch_norm: bool  # conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU; else conv with bias -> ReLU
    branch3_kernel: int  # the "5x5" branch: 3 in torchvision (pytorch/vision#906), 5 in the paper
    pool_mode: str  # "ceil": torch ceil_mode; "floor": torch default; "same": TensorFlow SAME
    stem_lrn: bool  # local response normalisation after maxpool1 and after conv3 (paper, Figure 3)
    maxpool4: tuple[tuple[int, int], ...]  # (window, stride) of each pool between 4e and 5a
    branch4_relu: bool  # a ReLU between branch 4's max pool and its 1x1 conv (the write-up's quirk)
    aux_pool: str  # "adaptive4": adaptive average pool to 4x4; "avg5s3": 5x5 stride 3 average pool
    aux_grid: int  # side of the aux head's pooled grid: its fc1 reads aux_grid**2 * 128 features
    aux_dropout_before_fc1: bool  # the write-up also drops out the flattened features
    aux_dropout: float
    dropout: float
    init: str  # "torchvision", "torch_default" (PyTorch's layer defaults) or "he"


VARIANTS: dict[str, Variant] = {
    "torchvision": Variant(
        name="torchvision", batch_norm=True, branch3_kernel=3, pool_mode="ceil", stem_lrn=False,
        maxpool4=((2, 2),), branch4_relu=False, aux_pool="adaptive4", aux_grid=4,
        aux_dropout_before_fc1=False, aux_dropout=0.7, dropout=0.2, init="torchvision"),
    # Table 1 gives no padding for the stride-2 pools but its sizes (112 -> 56 -> 28 -> 14 -> 7) need it: we
    # take TensorFlow's SAME padding, as the authors' own TF-slim inception_v1 does. LRN's constants are not in
    # the paper; we take the BVLC Caffe GoogLeNet's (size 5, alpha 1e-4, beta 0.75). The 7x7 average pool is a
    # global mean, identical at 224 and defined for other sizes. Without BatchNorm, a 22-layer ReLU net needs
    # He initialisation to train from scratch (the paper's DistBelief init is not published).
    "paper": Variant(
        name="paper", batch_norm=False, branch3_kernel=5, pool_mode="same", stem_lrn=True,
        maxpool4=((3, 2),), branch4_relu=False, aux_pool="avg5s3", aux_grid=4,
        aux_dropout_before_fc1=False, aux_dropout=0.7, dropout=0.4, init="he"),
    # The write-up: convs with bias and ReLU, floor-mode 3x3/2 pools, two of them after 4e, a ReLU after the
    # branch-4 pool, and an aux head of 5x5/3 average pool -> 1x1 conv -> fc 1152 (3x3x128), dropout 0.5 twice.
    "writeup": Variant(
        name="writeup", batch_norm=False, branch3_kernel=5, pool_mode="floor", stem_lrn=False,
        maxpool4=((3, 2), (3, 2)), branch4_relu=True, aux_pool="avg5s3", aux_grid=3,
        aux_dropout_before_fc1=True, aux_dropout=0.5, dropout=0.4, init="torch_default"),
}


# Earlier names, refused with a message that gives the current one.
RENAMED = {"seed": "writeup"}


def check_variant(name: str) -> Variant:
    """The variant called `name`; an unknown or renamed name is one line that says what to write instead."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name in RENAMED:
        raise ValueError(f"the variant {name!r} is now called {RENAMED[name]!r}")
    raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")


def _mode(train: bool, folded: bool = False) -> str:
    """The kernel plan's mode for a forward pass (`jax_googlenet.ops.plan`)."""
    return "train" if train else ("folded" if folded else "eval")


class GoogLeNetOutputs(NamedTuple):
    """Training-mode outputs. Note: torchvision's own tuple is ordered (logits, aux2, aux1)."""

    logits: jax.Array
    aux1: jax.Array | None
    aux2: jax.Array | None


# ----------------------------------------------------------------------------------------------- blocks


class BasicConv(nn.Module):
    """conv -> [BatchNorm] -> ReLU; submodules `conv` and `bn` as in torchvision's BasicConv2d. Folded: one
    conv with a bias (`jax_googlenet.fold`)."""

    features: int
    kernel_size: int
    variant: Variant
    stride: int = 1
    padding: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"
    folded: bool = False  # conv with the BatchNorm folded in, bias and ReLU computed by the conv's kernel
    repeats: int = 1  # BatchNorm's count of each position (`layers.BatchNorm.repeats`)

    @nn.compact
    def __call__(self, x, *, train: bool):
        v = self.variant
        x = Conv(self.features, self.kernel_size, self.stride, self.padding, use_bias=self.folded or not v.batch_norm,
                 init=v.init, dtype=self.dtype, param_dtype=self.param_dtype, impl=self.impl,
                 name="conv")(x, mode=_mode(train, self.folded))
        if self.folded:
            return x
        if v.batch_norm:
            x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, repeats=self.repeats, name="bn")(
                x, train=train)
        return nn.relu(x)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->"5x5" | 3x3 max pool->1x1."""

    spec: tuple[int, int, int, int, int, int]
    variant: Variant
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"
    folded: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        ch1, ch3r, ch3, ch5r, ch5, pool_proj = self.spec
        v = self.variant
        conv = lambda f, k, name: BasicConv(f, k, v, padding=k // 2, dtype=self.dtype,  # noqa: E731
                                            param_dtype=self.param_dtype, impl=self.impl, folded=self.folded,
                                            name=name)
        reductions = (("branch1", ch1), ("branch2_0", ch3r), ("branch3_0", ch5r))
        path = "/".join(self.scope.path)
        merged = None if self.is_initializing() else plan.merged_1x1(
            x.shape, [f for _, f in reductions], self.impl, _mode(train, self.folded),
            f"{path}/branch1+branch2_0+branch3_0")
        if merged is not None:
            b1, r2, r3 = merged.run(self, x, reductions, self.dtype, v.batch_norm, BatchNorm.epsilon,
                                    BatchNorm.momentum)
        else:
            b1, r2, r3 = (conv(f, 1, name)(x, train=train) for name, f in reductions)
        b2 = conv(ch3, 3, "branch2_1")(r2, train=train)
        # torchvision's "5x5" branch is a 3x3 conv, a known deviation from the paper (pytorch/vision#906).
        b3 = conv(ch5, v.branch3_kernel, "branch3_1")(r3, train=train)
        # stride-1 3x3 pool with padding 1 keeps the size in every mode; torch index 0 is this pool.
        p = max_pool(x, 3, 1, "ceil" if v.pool_mode == "same" else v.pool_mode, pad=1, impl=self.impl,
                     mode=_mode(train, self.folded), name=f"{path}/branch4_0")
        if v.branch4_relu:
            p = nn.relu(p)  # the write-up's ReLU after the pool; a no-op on ReLU outputs, kept to be exact
        b4 = conv(pool_proj, 1, "branch4_1")(p, train=train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: pool -> 1x1 conv 128 -> fc1 1024 -> ReLU -> dropout -> fc2."""

    num_classes: int
    variant: Variant
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "xla"
    folded: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        v = self.variant
        g, (h, w) = v.aux_grid, x.shape[1:3]
        conv = functools.partial(BasicConv, 128, 1, v, dtype=self.dtype, param_dtype=self.param_dtype,
                                 impl=self.impl, folded=self.folded, name="conv")
        fc = lambda f, x, name: dense(f, x.shape[-1], v.init, self.dtype, self.param_dtype, name)(x)  # noqa: E731
        if v.aux_pool == "adaptive4" and g % h == 0 and g % w == 0 and not v.aux_dropout_before_fc1:
            # The pool only repeats each position (2x2 -> 4x4 at 32-pixel inputs): the 1x1 conv, BatchNorm and
            # fc1 computed on the h x w map are the same numbers (`RepeatedGridDense`), with (g/h)*(g/w) times
            # fewer multiplications in the conv and fc1 (the aux heads were 15% of the 32-pixel train step).
            x = conv(repeats=(g // h) * (g // w))(x, train=train)
            kernel_init, bias_init = initializers(v.init, g * g * x.shape[-1])
            x = RepeatedGridDense(1024, g, kernel_init, bias_init, self.dtype, self.param_dtype, name="fc1")(x)
        else:
            if v.aux_pool == "adaptive4":
                x = adaptive_avg_pool(x, g)  # N x 4 x 4 x C on any input
            else:
                x = nn.avg_pool(x, (5, 5), (3, 3))  # N x 4 x 4 x C from 14x14 (paper), 3 x 3 from 12x12 (writeup)
            x = conv()(x, train=train)
            # NHWC flatten; the converter permutes fc1's rows from torch's NCHW order.
            x = x.reshape(x.shape[0], -1)
            if v.aux_dropout_before_fc1:
                x = nn.Dropout(v.aux_dropout, deterministic=not train)(x)
            x = fc(1024, x, "fc1")
        x = nn.Dropout(v.aux_dropout, deterministic=not train)(nn.relu(x))
        return fc(self.num_classes, x, "fc2")


# ----------------------------------------------------------------------------------------------- network


class GoogLeNet(nn.Module):
    """Inception v1 on NHWC images.

    `__call__(x, *, train)`: eval gives logits [N, num_classes]; train gives `GoogLeNetOutputs(logits, aux1,
    aux2)` (aux None when `aux_logits=False`), updates `batch_stats` (apply with `mutable=["batch_stats"]`) and
    needs a "dropout" rng. `init(rng, x)` creates every parameter, the aux heads included.
    `features(x, *, train=False)`: a dict of the named stage outputs and the pooled 1024-d `pre_logits`.
    `folded=True` (`jax_googlenet.fold.folded`): inference only, on variables whose BatchNorms are folded into
    the convolutions (`jax_googlenet.fold.fold_batch_norm`).
    `stem(x)` and `after_stem(s)`: inference in two parts, `after_stem(stem(x))` = `__call__(x, train=False)`
    (`jax_googlenet.fold.apply` computes them on different numbers of images at a time).
    """

    variant: Variant = VARIANTS["torchvision"]
    num_classes: int = 1000
    in_channels: int = 3
    aux_logits: bool = True
    transform_input: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    impl: str = "auto"
    folded: bool = False

    @nn.compact
    def _forward(self, x, train: bool, heads: bool, part: str = "all"):
        """(features, logits, aux outputs) of the network, or of one `part`: "stem" (its output as the logits,
        nothing after it) or "after_stem" (x is the stem's output)."""
        v = self.variant
        if train and self.folded:
            raise ValueError("a folded GoogLeNet computes inference only: apply it with train=False")
        want_aux = self.aux_logits and heads and (train or self.is_initializing())
        impl = resolve_impl(self.impl)
        kw = dict(variant=v, dtype=self.dtype, param_dtype=self.param_dtype, impl=impl, folded=self.folded)
        feats = {}
        if part != "after_stem":
            check_input(v, x.shape, self.in_channels, want_aux)
            if self.transform_input:
                # torchvision: undo ImageNet normalisation, redo it as (x - 0.5) / 0.5, the weights' original input.
                mean, std = jnp.array(IMAGENET_MEAN), jnp.array(IMAGENET_STD)
                x = x * (std / 0.5) + (mean - 0.5) / 0.5
            conv = lambda spec: BasicConv(*spec[1:3], stride=spec[3], padding=spec[4], name=spec[0], **kw)  # noqa: E731
            for layer in STEM:  # N x 224 x 224 x C -> N x 28 x 28 x 192
                if isinstance(layer, tuple):
                    x = conv(layer)(x, train=train)
                elif layer == "lrn":
                    x = local_response_norm(x) if v.stem_lrn else x
                else:
                    x = self._pools(x, layer, impl, train)
            feats["stem"] = x
        if part == "stem":
            return feats, x, {}
        aux = {}
        for name, *spec in INCEPTION_TABLE:
            if name in POOL_BEFORE:
                x = self._pools(x, POOL_BEFORE[name], impl, train)
            x = Inception(tuple(spec), name=name, **kw)(x, train=train)
            feats[name] = x
            for head, after in AUX_AFTER.items():
                if after == name and want_aux:
                    # aux1 reads N x 14 x 14 x 512, aux2 N x 14 x 14 x 528
                    aux[head] = InceptionAux(self.num_classes, name=head, **kw)(x, train=train)
        # N x 7 x 7 x 1024
        x = jnp.mean(x, axis=(1, 2))
        feats["pre_logits"] = x
        if not heads:
            return feats, None, {}
        x = nn.Dropout(v.dropout, deterministic=not train)(x)
        logits = dense(self.num_classes, x.shape[-1], v.init, self.dtype, self.param_dtype, "fc")(x)
        # N x num_classes
        return feats, logits, aux

    def _pools(self, x, name: str, impl: str, train: bool):
        """The stem's or a between-stage max pool `name`: 3x3/2, or maxpool4's windows (torchvision 2x2/2, the
        paper 3x3/2, the write-up 3x3/2 twice: 14 -> 6 -> 2 at 224 input)."""
        windows = self.variant.maxpool4 if name == "maxpool4" else ((3, 2),)
        for i, (window, stride) in enumerate(windows):
            x = max_pool(x, window, stride, self.variant.pool_mode, impl=impl, mode=_mode(train, self.folded),
                         name=f"{name}_{i}" if i else name)
        return x

    def __call__(self, x, *, train: bool | None = None):
        if train is None:
            if not self.is_initializing():
                raise TypeError("GoogLeNet.__call__ needs train=True or train=False")
            train = False
        _, logits, aux = self._forward(x, train, heads=True)
        if not train:
            return self._out(logits)
        return GoogLeNetOutputs(self._out(logits), self._out(aux.get("aux1")), self._out(aux.get("aux2")))

    def _out(self, a):
        """An output in float32 at least: bfloat16 up, float64 kept (None stays)."""
        return None if a is None else a.astype(jnp.promote_types(jnp.float32, self.dtype))

    def stem(self, x):
        """The stem's output in inference (N x 28 x 28 x 192 at 224 pixels): `after_stem` continues from it."""
        return self._forward(x, False, True, "stem")[1]

    def after_stem(self, x):
        """The inference logits from the stem's output `x` (`stem`)."""
        return self._out(self._forward(x, False, True, "after_stem")[1])

    def features(self, x, *, train: bool = False) -> dict[str, jax.Array]:
        """Named stage outputs (`stem`, `inception3a` ... `inception5b`) and the pooled 1024-d `pre_logits`."""
        feats, _, _ = self._forward(x, train, heads=False)
        return feats


def googlenet(variant: str = "torchvision", *, num_classes: int = 1000, in_channels: int = 3,
              aux_logits: bool = True, transform_input: bool = False, dtype: Dtype = jnp.float32,
              param_dtype: Dtype = jnp.float32, impl: str = "auto") -> GoogLeNet:
    """Build a GoogLeNet.

    Args:
      variant: "torchvision" (torchvision 0.29, the pretrained weights' architecture), "paper" (Table 1 of
        arXiv:1409.4842) or "writeup" (the write-up's MNIST model). See `VARIANTS`.
      num_classes: classifier outputs (main and aux heads).
      in_channels: input channels (1 for MNIST).
      aux_logits: build the two auxiliary heads (used in training mode only).
      transform_input: torchvision's option for its pretrained weights: takes ImageNet-normalised RGB input.
      dtype: computation dtype (bfloat16 for mixed precision); logits are returned in float32 (float64 if
        dtype is float64).
      param_dtype: parameter dtype.
      impl: how convolutions and max pools are computed: "xla" (XLA's convolution and reduce_window,
        autodiff backward), "slices" (1x1 convs as dots; k x k stride-1 convs with a backward of dots; max
        pools as maxima of shifted slices with a first-maximum backward), "winograd" ("slices" with Winograd's
        F(4x4, 3x3) and F(2x2, 3x3) and dense products on maps smaller than the kernel: fewer
        multiplications), or "auto" ("winograd" on the CPU, where it runs fastest, "xla" elsewhere).
        `jax_googlenet.ops.plan` chooses the kernel of each layer; `python -m jax_googlenet.ops` prints it.
        The parameters and the results are the same either way (up to float rounding order).

    Returns:
      A `GoogLeNet` flax.linen Module taking NHWC images.
    """
    v = check_variant(variant)
    if transform_input and in_channels != 3:
        raise ValueError("transform_input needs in_channels=3 (it re-normalises RGB for torchvision's weights)")
    resolve_impl(impl)  # fail early on a typo
    return GoogLeNet(v, num_classes, in_channels, aux_logits, transform_input, dtype,
                     param_dtype, impl)
