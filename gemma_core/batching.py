"""Which examples go in which training step: a pure function of (seed, epoch), in a few shapes.

Two plans:

* ``padded`` (the plain keras-hub path): every batch is ``sequence_length`` long, shuffled freely.
* ``bucketed``: each example goes to the shortest length bucket that holds it (a quarter, half or
  all of ``sequence_length``), batches are drawn within a bucket, and batch order is shuffled. Dolly
  examples are mostly far shorter than the sequence length, so this skips most of the padding,
  while the shapes stay few (one compilation per bucket, not per batch).

Each bucket also fixes how many response slots a batch carries (the longest response in the
bucket, rounded up), for :mod:`gemma_core.response_head`.

Batches whose bucket has fewer examples left than the batch size are topped up with repeats whose
loss weight is zeroed, so every batch of a bucket has one shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_BUCKET = 64
SLOT_MULTIPLE = 16


@dataclass(frozen=True)
class PlannedBatch:
    indices: np.ndarray  # (batch_size,) example indices
    real: int  # how many of them count; the rest are zero-weight repeats
    length: int  # tokens per row for this batch
    slots: int  # response positions per row (for the response-only head)


def bucket_lengths(sequence_length: int) -> list[int]:
    candidates = {sequence_length // 4, sequence_length // 2, sequence_length}
    return sorted(c for c in candidates if c >= min(MIN_BUCKET, sequence_length))


def plan_epoch(
    total_lengths: np.ndarray,
    response_lengths: np.ndarray,
    batch_size: int,
    sequence_length: int,
    seed: int,
    epoch: int,
    bucketed: bool,
) -> list[PlannedBatch]:
    rng = np.random.default_rng([seed, epoch])
    if not bucketed:
        return _chunk(rng.permutation(len(total_lengths)), batch_size, sequence_length, sequence_length)
    lengths = bucket_lengths(sequence_length)
    assignment = np.searchsorted(lengths, total_lengths, side="left").clip(max=len(lengths) - 1)
    batches: list[PlannedBatch] = []
    for bucket, length in enumerate(lengths):
        members = np.flatnonzero(assignment == bucket)
        if len(members) == 0:
            continue
        slots = min(length, SLOT_MULTIPLE * math.ceil(response_lengths[members].max() / SLOT_MULTIPLE))
        batches.extend(_chunk(members[rng.permutation(len(members))], batch_size, length, slots))
    return [batches[i] for i in rng.permutation(len(batches))]


def _chunk(order: np.ndarray, batch_size: int, length: int, slots: int) -> list[PlannedBatch]:
    out = []
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        real = len(chosen)
        if real < batch_size:
            chosen = np.concatenate([chosen, np.resize(order, batch_size - real)])
        out.append(PlannedBatch(chosen, real, length, slots))
    return out
