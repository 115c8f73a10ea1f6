"""Which examples go in which training step: a pure function of (seed, epoch), in a few shapes.

Two plans:

* ``padded`` (the plain keras-hub path): every batch is ``sequence_length`` long, shuffled freely.
* ``bucketed``: each example goes to the shortest length bucket that holds it, batches are drawn
  within a bucket, and batch order is shuffled. Bucket lengths sit at quantiles of the data's own
  lengths (at most four, multiples of 32): Dolly examples are mostly far shorter than the sequence
  length, so this skips most of the padding while the shapes stay few (one compilation per bucket,
  not per batch).

Each bucket also fixes how many response slots a batch carries (the longest response in the
bucket, rounded up), for :mod:`gemma_core.response_head`.

Batches whose bucket has fewer examples left than the batch size are topped up with repeats whose
loss weight is zeroed, so every batch of a bucket has one shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LENGTH_MULTIPLE = 32
BUCKET_QUANTILES = (0.35, 0.65, 0.9, 1.0)
SLOT_MULTIPLE = 16


@dataclass(frozen=True)
class PlannedBatch:
    indices: np.ndarray  # (batch_size,) example indices
    real: int  # how many of them count; the rest are zero-weight repeats
    length: int  # tokens per row for this batch
    slots: int  # response positions per row (for the response-only head)


def bucket_lengths(total_lengths: np.ndarray, sequence_length: int) -> list[int]:
    """Up to four row lengths at quantiles of the examples' lengths, rounded up to a multiple of 32."""
    quantiles = np.quantile(total_lengths, BUCKET_QUANTILES)
    return sorted({min(sequence_length, LENGTH_MULTIPLE * math.ceil(q / LENGTH_MULTIPLE)) for q in quantiles})


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
    lengths = bucket_lengths(total_lengths, sequence_length)
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
