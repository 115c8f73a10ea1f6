"""Which examples go in which training step, and the arrays of that step.

:class:`TrainingSchedule` maps a step number to a planned batch, a pure function of (seed, step), so
resuming needs only the step; :func:`step_arrays` cuts that batch's arrays from the encoded examples.

Two plans:

* ``padded`` (the plain keras-hub path): every batch is ``sequence_length`` long, shuffled freely.
* ``bucketed``: each example goes to the shortest length bucket that holds it, batches are drawn
  within a bucket, and batch order is shuffled. Bucket lengths sit at quantiles of the data's own
  lengths (at most four, multiples of 32): Dolly examples are mostly far shorter than the sequence
  length, so this skips most of the padding while the shapes stay few (one compilation per bucket,
  not per batch). How many buckets is chosen per run (:func:`choose_bucket_quantiles`): each shape
  costs a compilation, so a short run takes fewer buckets when they pad little more.

Each bucket also fixes how many response positions a batch carries for
:mod:`gemma_core.response_head` (``slots`` per row, filled across the whole batch). To keep that
number close to what batches really hold, a bucket's examples are sorted by response length and cut
into ``batch_size`` strata, and every batch takes one example from each stratum (which one is
shuffled every epoch): a batch's total response length then stays near the bucket's mean, and the
sum of the strata's longest responses bounds it in every epoch. On the offline sample this cut the
head's padding positions from about half to about a quarter.

Batches whose bucket has fewer examples left than the batch size are topped up with repeats whose
loss weight is zeroed, so every batch of a bucket has one shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gemma_core.config import TrainConfig
from gemma_core.encoding import EncodedExamples
from gemma_core.response_head import gather_response_positions

LENGTH_MULTIPLE = 32
BUCKET_QUANTILES = (0.35, 0.65, 0.9, 1.0)
# Fewer buckets, from one to BUCKET_QUANTILES: the candidates of choose_bucket_quantiles.
BUCKET_CHOICES = ((1.0,), (0.6, 1.0), (0.5, 0.85, 1.0), BUCKET_QUANTILES)
# One more compiled step shape costs about as much as training this many row tokens: on a 2-core CPU
# a 270M-model step compiles in about 9 s, while a step trains a few hundred row tokens a second
# (bench/RESULTS.md, LoRA training, round 2). A GPU trains far more tokens per compile second, so
# there this errs toward more buckets, the choice before it existed.
COMPILE_COST_TOKENS = 2048
SLOT_MULTIPLE = 8


@dataclass(frozen=True)
class PlannedBatch:
    indices: np.ndarray  # (batch_size,) example indices
    real: int  # how many of them count; the rest are zero-weight repeats
    length: int  # tokens per row for this batch
    slots: int  # head positions per row; the batch's response positions fill batch_size * slots


def bucket_lengths(
    total_lengths: np.ndarray, sequence_length: int, quantiles: tuple[float, ...] = BUCKET_QUANTILES
) -> list[int]:
    """Row lengths at ``quantiles`` of the examples' lengths, rounded up to a multiple of 32."""
    quantiles = np.quantile(total_lengths, quantiles)
    return sorted({min(sequence_length, LENGTH_MULTIPLE * math.ceil(q / LENGTH_MULTIPLE)) for q in quantiles})


def plan_epoch(
    total_lengths: np.ndarray,
    response_lengths: np.ndarray,
    batch_size: int,
    sequence_length: int,
    seed: int,
    epoch: int,
    bucketed: bool,
    quantiles: tuple[float, ...] = BUCKET_QUANTILES,
) -> list[PlannedBatch]:
    rng = np.random.default_rng([seed, epoch])
    if not bucketed:
        # Random batches: only the batch_size longest responses together bound a batch's total.
        bound = int(np.sort(response_lengths)[::-1][:batch_size].sum())
        slots = min(sequence_length, SLOT_MULTIPLE * math.ceil(bound / batch_size / SLOT_MULTIPLE))
        return _chunk(rng.permutation(len(total_lengths)), batch_size, sequence_length, slots)
    lengths = bucket_lengths(total_lengths, sequence_length, quantiles)
    assignment = np.searchsorted(lengths, total_lengths, side="left").clip(max=len(lengths) - 1)
    batches: list[PlannedBatch] = []
    for bucket, length in enumerate(lengths):
        members = np.flatnonzero(assignment == bucket)
        if len(members) == 0:
            continue
        batches.extend(_deal_by_response_length(members, response_lengths, batch_size, length, rng))
    return [batches[i] for i in rng.permutation(len(batches))]


def choose_bucket_quantiles(
    total_lengths: np.ndarray, response_lengths: np.ndarray, batch_size: int, sequence_length: int,
    seed: int, epochs: float,
) -> tuple[float, ...]:
    """The :data:`BUCKET_CHOICES` entry whose padded work over ``epochs`` plus
    :data:`COMPILE_COST_TOKENS` per distinct step shape is least (ties: more buckets).

    Work is counted in row tokens: ``batch_size * (length + slots)`` per step, the body's and the
    head's positions. On the offline sample's first 64 rows at length 256, two buckets cost about 2%
    more row tokens than four and compile half as many shapes; over Dolly-15k's many steps the four
    buckets' smaller padding wins.
    """
    best, best_cost = BUCKET_QUANTILES, math.inf
    for quantiles in reversed(BUCKET_CHOICES):
        plan = plan_epoch(total_lengths, response_lengths, batch_size, sequence_length, seed, 0, True, quantiles)
        work = sum(batch_size * (b.length + b.slots) for b in plan)
        cost = epochs * work + COMPILE_COST_TOKENS * len({(b.length, b.slots) for b in plan})
        if cost < best_cost:
            best, best_cost = quantiles, cost
    return best


def _deal_by_response_length(
    members: np.ndarray, response_lengths: np.ndarray, batch_size: int, length: int, rng: np.random.Generator
) -> list[PlannedBatch]:
    """One bucket's batches, each with one example from each response-length stratum."""
    n_batches = math.ceil(len(members) / batch_size)
    by_response = members[np.argsort(response_lengths[members], kind="stable")]
    strata = [by_response[k * n_batches:(k + 1) * n_batches] for k in range(batch_size)]
    bound = sum(int(response_lengths[s].max()) for s in strata if len(s))  # any batch's total, any epoch
    slots = min(length, SLOT_MULTIPLE * math.ceil(bound / batch_size / SLOT_MULTIPLE))
    dealt = [rng.permutation(s) for s in strata]
    out = []
    for b in range(n_batches):
        chosen = np.array([s[b] for s in dealt if b < len(s)], dtype=np.int64)
        real = len(chosen)
        if real < batch_size:  # the last strata ran out: zero-weight repeats keep the shape
            chosen = np.concatenate([chosen, np.resize(members, batch_size - real)])
        out.append(PlannedBatch(chosen, real, length, slots))
    return out


def _chunk(order: np.ndarray, batch_size: int, length: int, slots: int) -> list[PlannedBatch]:
    out = []
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        real = len(chosen)
        if real < batch_size:
            chosen = np.concatenate([chosen, np.resize(order, batch_size - real)])
        out.append(PlannedBatch(chosen, real, length, slots))
    return out


class TrainingSchedule:
    """Step number → planned batch, over ``cfg.epochs`` epochs (or ``cfg.max_steps``)."""

    def __init__(self, examples: EncodedExamples, cfg: TrainConfig):
        self.cfg = cfg
        self.total_lengths = examples.padding_mask.sum(axis=1)
        self.response_lengths = (examples.sample_weight > 0).sum(axis=1)
        self._plans: dict[int, list[PlannedBatch]] = {}
        self.quantiles = BUCKET_QUANTILES
        if cfg.bucketing:
            # From the epochs, not max_steps: a run resumed with another max_steps keeps its batches.
            self.quantiles = choose_bucket_quantiles(
                self.total_lengths, self.response_lengths, cfg.batch_size, cfg.sequence_length, cfg.seed,
                cfg.epochs)
        self.steps_per_epoch = len(self.plan(0))
        steps = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(steps, cfg.max_steps) if cfg.max_steps else steps

    def plan(self, epoch: int) -> list[PlannedBatch]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(
                self.total_lengths, self.response_lengths, self.cfg.batch_size, self.cfg.sequence_length,
                self.cfg.seed, epoch, bucketed=self.cfg.bucketing, quantiles=self.quantiles,
            )}
        return self._plans[epoch]

    def batch(self, step: int) -> PlannedBatch:
        epoch, position = divmod(step, self.steps_per_epoch)
        return self.plan(epoch)[position]


def step_arrays(examples: EncodedExamples, planned: PlannedBatch, response_only: bool):
    """(inputs, labels, sample_weight) for one planned batch, cut to the batch's length; with
    ``response_only``, labels and weights at the response positions the head computes."""
    chosen = examples.take(planned.indices)
    length = planned.length
    weight = chosen.sample_weight[:, :length].copy()
    weight[planned.real:] = 0.0
    x = {"token_ids": chosen.token_ids[:, :length], "padding_mask": chosen.padding_mask[:, :length]}
    labels = chosen.labels[:, :length]
    if response_only:
        x["positions"], labels, weight = gather_response_positions(labels, weight, planned.slots)
    return x, labels, weight
