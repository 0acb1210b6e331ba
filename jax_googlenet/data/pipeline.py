"""grain input pipelines over any random-access source: training batches and padded evaluation batches.

Training: epoch e is grain's shuffle of the examples under (seed, e), cut into full global batches (the
remainder dropped, a different one each epoch); `train_batches` serves any range of global steps, one epoch or
the whole run, so a resumed run reads exactly the batches an uninterrupted one would. Evaluation: every example
once, the last batch padded and the padding rows masked. Each process reads only its 1/process_count of every
global batch. Per-example work (`transform`) runs in grain's threads, or in `workers` worker processes
(`mp_prefetch`), which is where decoding and resizing images belongs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np

Record = Mapping[str, Any]


def local_batch(global_batch: int) -> int:
    """This process's rows of a global batch."""
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} does not divide over {jax.process_count()} processes")
    return global_batch // jax.process_count()


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch; the remainder of the shuffled epoch is dropped (a different one each
    epoch)."""
    return num_examples // global_batch


def train_batches(source: Sequence, *, global_batch: int, seed: int, start_step: int, stop_step: int,
                  transform: Callable[[Record], Record] | None = None,
                  random_transform: Callable[[Record, np.random.Generator], Record] | None = None,
                  workers: int = 0, num_threads: int = 4, prefetch: int = 8) -> grain.IterDataset:
    """This process's rows of the global steps [start_step, stop_step), across epochs.

    Args:
      source: random-access records.
      global_batch: rows of a step over all processes.
      seed: the shuffle's seed (epoch e's order is a function of seed and e) and the random transform's.
      start_step, stop_step: the global steps to serve (epoch e holds steps [e, e + 1) * steps_per_epoch).
      transform: record -> record, per example (e.g. decoding).
      random_transform: (record, rng) -> record; grain derives rng from the seed, the process and the row's
        place in the run, so a resumed run draws the same augmentation.
      workers: grain worker processes for the per-example work (0: threads of this process).
      num_threads, prefetch: grain's read threads and buffer, per process.

    Returns:
      A grain IterDataset of batches (dicts of arrays with a leading axis of global_batch / process_count).
    """
    n, processes, index = len(source), jax.process_count(), jax.process_index()
    per_process = n // processes  # every process the same length, so all take the same number of steps
    local = local_batch(global_batch)
    per_epoch = per_process // local * local  # rows of an epoch that fill whole batches
    # grain's shuffle draws epoch e's permutation from seed + e; after repeat() it sits at [e, e + 1) * per_process.
    order = grain.MapDataset.range(per_process * processes)[index::processes].shuffle(seed=seed).repeat()
    ds = grain.MapDataset.range(stop_step * local).map(
        lambda j: source[order[j // per_epoch * per_process + j % per_epoch]])
    if transform is not None:
        ds = ds.map(transform)
    if random_transform is not None:
        # Sliced after random_map, so each row keeps its rng index in the whole run.
        ds = ds.random_map(random_transform, seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    ds = ds[start_step * local:].batch(local)
    return _read(ds, workers, num_threads, prefetch)


def eval_batches(source: Sequence, *, global_batch: int, transform: Callable[[Record], Record], blank: Record,
                 workers: int = 0, num_threads: int = 4, prefetch: int = 8) -> grain.IterDataset:
    """Every example once, as `transform(source[i])` with `mask` True (unless the transform sets it); the last
    global batch is padded with `blank` rows of mask False."""
    n, processes = len(source), jax.process_count()
    padded = -(-n // global_batch) * global_batch

    def record(i):
        if i < n:
            return {"mask": np.bool_(True), **transform(source[i])}
        return {**blank, "mask": np.bool_(False)}

    ds = grain.MapDataset.range(padded)[jax.process_index()::processes].map(record)
    return _read(ds.batch(local_batch(global_batch)), workers, num_threads, prefetch)


def _read(ds: grain.MapDataset, workers: int, num_threads: int, prefetch: int) -> grain.IterDataset:
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if not workers:
        return ds
    from absl import flags

    # grain 0.2.18's worker start reads an absl flag and raises unless flags were parsed, which a program that
    # does not run absl.app never does (google/grain#1355): mark them parsed, keeping every default.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
