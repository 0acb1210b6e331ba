"""The frameworks' runners on synthetic data already on the device, one interface: `step()` runs one
step (eval forward, or train forward, backward and update), `sync()` waits for the device, and each states
`framework`, `variant`, `first_call_s` and `compile_info`. `JaxRunner` runs the project's model and its jitted
`train_step` (eval: the folded model, `jax_googlenet.fold`, its variables folded once outside the step), its
compile timed cold and warm (served by the persistent cache), with XLA's FLOP and memory counts; `TorchRunner`
runs torchvision's googlenet eagerly (NCHW or channels_last) or under torch.compile (for inference also with
frozen weights), its compile timed the same way against Inductor's caches; `OnnxRuntimeRunner` runs the
exported ONNX graph (`jax_googlenet.export`) in onnxruntime's CPU provider, inference only. Also the frameworks,
workloads, dtypes and PyTorch variants the command line offers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from jax_googlenet import compilation_cache, googlenet
from jax_googlenet.fold import apply as folded_apply
from jax_googlenet.fold import fold
from jax_googlenet.ops import compiler_options
from jax_googlenet.train import AUX_WEIGHT, create_train_state, jit_train_step, make_optimizer

FRAMEWORKS = ("jax", "torch", "onnxruntime")
WORKLOADS = ("eval", "train")
DTYPES = ("float32", "bfloat16")
TORCH_VARIANTS = ("eager", "channels_last", "compile", "compile_frozen")
INFERENCE_ONLY_VARIANTS = ("compile_frozen",)
NUM_CLASSES = 1000
LEARNING_RATE = 0.01  # any constant: the benchmark times the update, not its effect
MOMENTUM = 0.9


# ----------------------------------------------------------------------------------------------- JAX


class CacheEvents:
    """Counts JAX's persistent-cache hits, so a warm compile can prove it was served from disk."""

    def __init__(self):
        self.hits = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1


@contextlib.contextmanager
def persistent_cache_bypassed():
    """Compile as a machine without the persistent cache would (the in-memory caches cleared too)."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    jax.config.update("jax_enable_compilation_cache", False)
    cc.reset_cache()
    jax.clear_caches()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        cc.reset_cache()


def timed_compile(jitted, args: tuple) -> tuple[Any, float]:
    """Trace, lower and compile from scratch (in-memory caches cleared): the first call's overhead, with the
    garbage collector paused as the project's jobs pause it (`compilation_cache.gc_paused`)."""
    jax.clear_caches()
    t = time.perf_counter()
    with compilation_cache.gc_paused():
        compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


def jax_compile(jitted, args: tuple, cache_on: bool, measure_cold: bool, events: CacheEvents) -> dict[str, Any]:
    """Compile times: cold (nothing cached) and warm (served by the persistent cache), and the executable."""
    out = {"compile_cold_s": None, "compile_warm_s": None, "warm_cache_hit": None}
    if not cache_on:
        out["compiled"], out["compile_cold_s"] = timed_compile(jitted, args)
        return out
    hits = events.hits
    compiled, seconds = timed_compile(jitted, args)
    if events.hits == hits:  # a miss: this was a cold compile (it also wrote the entry)
        out["compile_cold_s"] = seconds
        hits = events.hits
        compiled, seconds = timed_compile(jitted, args)
    out.update(compiled=compiled, compile_warm_s=seconds, warm_cache_hit=events.hits > hits)
    if out["compile_cold_s"] is None and measure_cold:
        with persistent_cache_bypassed():
            out["compile_cold_s"] = timed_compile(jitted, args)[1]
    return out


def cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def xla_memory_mb(compiled) -> float:
    """Bytes XLA's buffer assignment needs for one call: arguments, outputs and temporaries, donated buffers
    counted once."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return total / 2**20


class JaxRunner:
    """The project's model and its real jitted train step, or for eval the folded model's `train=False` apply on
    variables folded once (on the host, outside the step), on synthetic device data."""

    framework, variant = "jax", "jit"

    def __init__(self, workload: str, batch: int, side: int, dtype: str, args, events: CacheEvents):
        self.workload = workload
        model = googlenet("torchvision", num_classes=NUM_CLASSES, aux_logits=True, dtype=jnp.dtype(dtype),
                          param_dtype=jnp.float32)
        rng = jax.random.key(0)
        self.state = create_train_state(rng, model, (batch, side, side, 3),
                                        make_optimizer(LEARNING_RATE, momentum=MOMENTUM))
        images = jax.random.normal(jax.random.key(1), (batch, side, side, 3), jnp.float32)
        labels = jax.random.randint(jax.random.key(2), (batch,), 0, NUM_CLASSES)
        if workload == "train":
            self.batch, self.rng = {"image": images, "label": labels}, jax.random.key(3)
            jitted = jit_train_step(compiler_options(side, dtype), loss_mode="paper")
            call_args = (self.state, self.batch, self.rng)
        else:
            # Folded (and the kernels' weight transforms prepared) once per set of variables, outside the timed
            # step: a step that folded would recompute the fold on every call. numpy on the host folds without
            # compiling an XLA kernel per operation.
            unfolded = jax.device_get({"params": self.state.params, "batch_stats": self.state.batch_stats})
            model, self.variables = fold(model, unfolded, (side, side, 3))
            self.variables = jax.device_put(self.variables)
            self.inference = "folded BatchNorm"
            self.images = images
            jitted = jax.jit(functools.partial(folded_apply, model),
                             compiler_options=compiler_options(side, dtype, step="inference"))
            call_args = (self.variables, images)
        info = jax_compile(jitted, call_args, not args.no_compile_cache, not args.skip_cold_compile, events)
        self.compiled = info.pop("compiled")
        self.compile_info = info
        self.first_call_s = info["compile_warm_s"] or info["compile_cold_s"]
        self.xla_flops = cost_flops(self.compiled)
        self.xla_memory_mb = xla_memory_mb(self.compiled)
        self.pending = []  # every output since the last sync: XLA may run independent eval calls concurrently

    def step(self) -> None:
        if self.workload == "train":
            self.state, metrics = self.compiled(self.state, self.batch, self.rng)
            self.pending.append(metrics)
        else:
            self.pending.append(self.compiled(self.variables, self.images))

    def sync(self) -> None:
        jax.block_until_ready((self.state, self.pending))
        self.pending = []


# ----------------------------------------------------------------------------------------------- PyTorch


def torch_compile_caches(enabled: bool) -> None:
    import torch._inductor.config as inductor_config
    inductor_config.force_disable_caches = not enabled


class TorchRunner:
    """torchvision's googlenet: eager NCHW, eager channels_last, torch.compile (channels_last) of the model, or
    for inference torch.compile with frozen weights (`compile_frozen`: Inductor's `freezing`, under
    `torch.no_grad()`, which folds each BatchNorm into its convolution)."""

    framework = "torch"

    def __init__(self, variant: str, workload: str, batch: int, side: int, dtype: str, args, torch):
        import torchvision
        if variant in INFERENCE_ONLY_VARIANTS and workload != "eval":
            raise ValueError(f"the PyTorch variant {variant} is inference only")
        self.torch, self.variant, self.workload = torch, variant, workload
        self.frozen = variant == "compile_frozen"
        if self.frozen:
            self.inference = "BatchNorm folded by Inductor (freezing)"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = dtype == "bfloat16"
        torch.manual_seed(0)
        model = torchvision.models.googlenet(weights=None, init_weights=True, aux_logits=True,
                                             num_classes=NUM_CLASSES).to(self.device)
        model.train(workload == "train")
        gen = torch.Generator(self.device).manual_seed(1)
        self.images = torch.randn(batch, 3, side, side, device=self.device, generator=gen)
        self.labels = torch.randint(0, NUM_CLASSES, (batch,), device=self.device, generator=gen)
        if variant != "eager":
            model = model.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        self.compile_info = {"compile_cold_s": None, "compile_warm_s": None, "warm_cache_hit": None}
        self.net = model
        if variant.startswith("compile"):
            self._compile(args)
        else:
            self.first_call_s = self._first_call()

    def _first_call(self) -> float:
        t = time.perf_counter()
        self.step()
        self.sync()
        return time.perf_counter() - t

    def _compile(self, args) -> None:
        """torch.compile is lazy: its compile time is the first call's (one step included). As for JAX, a first
        try that misses Inductor's caches is the cold time, and the warm one is a try that hits them."""
        from torch._dynamo.utils import counters
        info = self.compile_info

        def first_call() -> tuple[float, bool]:
            hits = counters["inductor"]["fxgraph_cache_hit"]
            self.torch._dynamo.reset()
            self.net = self.torch.compile(self.model)
            return self._first_call(), counters["inductor"]["fxgraph_cache_hit"] > hits

        if args.no_compile_cache or self.frozen:
            # A frozen graph holds the weights as constants and bypasses Inductor's FX-graph cache: every first
            # call compiles cold, so there is no warm time to measure.
            info["compile_cold_s"] = first_call()[0]
        else:
            seconds, hit = first_call()
            if not hit:
                info["compile_cold_s"] = seconds
                seconds, hit = first_call()
            info.update(compile_warm_s=seconds, warm_cache_hit=hit)
            if info["compile_cold_s"] is None and not args.skip_cold_compile:
                torch_compile_caches(False)
                info["compile_cold_s"] = first_call()[0]
                torch_compile_caches(True)
                seconds, info["warm_cache_hit"] = first_call()  # leave the cached (warm) module for the timing
        self.first_call_s = info["compile_warm_s"] or info["compile_cold_s"]

    def loss(self, out):
        ce = self.torch.nn.functional.cross_entropy
        # torchvision's training outputs are (logits, aux_logits2, aux_logits1)
        return ce(out.logits, self.labels) + AUX_WEIGHT * (ce(out.aux_logits1, self.labels)
                                                           + ce(out.aux_logits2, self.labels))

    def forward(self):
        with self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.autocast):
            if self.workload == "train":
                return self.loss(self.net(self.images))
            return self.net(self.images)

    def step(self) -> None:
        if self.workload == "train":
            self.optimizer.zero_grad(set_to_none=True)
            self.forward().backward()
            self.optimizer.step()
        elif self.frozen:
            # Inductor's freezing is made for graphs compiled under no_grad (grad mode is in Dynamo's guards); the
            # setting is held around every call, so a recompile after another runner's dynamo reset freezes too.
            import torch._inductor.config as inductor_config
            with inductor_config.patch(freezing=True), self.torch.no_grad():
                self.forward()
        else:
            with self.torch.inference_mode():
                self.forward()

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def counted_flops(self) -> float:
        """PyTorch's FlopCounterMode over one step: matrix products and convolutions, 2 FLOPs per multiply-add."""
        from torch.utils.flop_counter import FlopCounterMode
        net, self.net = self.net, self.model  # count the eager graph; the compiled one is the same work
        with FlopCounterMode(display=False) as counter:
            self.step()
        self.net = net
        return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------- onnxruntime


class OnnxRuntimeRunner:
    """The model exported to ONNX (`jax_googlenet.export.onnx_model`: BatchNorm folded, NHWC float32 input) in
    onnxruntime's default CPU provider with all graph optimisations and the benchmark's thread count; inference
    only. Its "compile" is the session's creation (graph optimisation), timed as its first call."""

    framework, variant = "onnxruntime", "cpu"

    def __init__(self, batch: int, side: int, args):
        import numpy as np
        import onnxruntime

        from jax_googlenet.checkpoint import default_serving
        from jax_googlenet.export import INPUT, onnx_model

        self.workload = "eval"
        model = googlenet("torchvision", num_classes=NUM_CLASSES, aux_logits=False)
        rng = np.random.default_rng(0)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
        # He-normal kernels and unit statistics keep the activations in float range (the values do not change
        # the work, denormals aside).
        variables = jax.tree_util.tree_map_with_path(
            lambda path, a: (rng.normal(0, (2 / np.prod(a.shape[:-1])) ** 0.5, a.shape) if path[-1].key == "kernel"
                             else np.ones(a.shape) if path[-1].key in ("scale", "var") else np.zeros(a.shape)
                             ).astype(np.float32), shapes)
        graph = onnx_model(model, variables, default_serving({}), image_size=side).SerializeToString()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        self.images = {INPUT: np.asarray(jax.random.normal(jax.random.key(1), (batch, side, side, 3)))}
        t = time.perf_counter()
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.step()
        self.first_call_s = time.perf_counter() - t
        self.compile_info = {"compile_cold_s": None, "compile_warm_s": None, "warm_cache_hit": None}

    def step(self) -> None:
        self.logits = self.session.run(None, self.images)[0]

    def sync(self) -> None:
        """onnxruntime's run returns when its outputs are computed."""
