"""Training on several local devices with Keras' distribution API: ``train.data_parallel=auto`` keeps
a replica of the model on every device and splits each step's batch across them (JAX, the default
backend). Nothing of the training loop changes: the model is created and trained inside the
distribution's scope, and Keras shards every batch ``train_on_batch`` receives along its first axis.

Where users outgrow one machine they move on to Keras' own multi-host set-up
(``keras.distribution.initialize``), not to anything of this project's.

>>> training_distribution("off", batch_size=4) is None
True
>>> with distribution_scope(None):  # no distribution: the plain single-device path
...     pass
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

log = logging.getLogger(__name__)


class DataParallelError(ValueError):
    """``train.data_parallel`` cannot be honoured with these devices or this batch size."""


def training_distribution(mode: str, batch_size: int):
    """A ``keras.distribution.DataParallel`` over every local device for ``mode="auto"``, or None
    (``"off"``, or only one device: the batch stays whole)."""
    if mode == "off":
        return None
    import keras

    if keras.backend.backend() != "jax":
        raise DataParallelError(f"train.data_parallel={mode!r} needs the JAX backend (backend={keras.backend.backend()!r}): "
                                "set backend=jax or train.data_parallel=off")
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        log.info("train.data_parallel=auto: one device (%s), so each batch stays whole", devices[0])
        return None
    if batch_size % len(devices):
        raise DataParallelError(
            f"train.batch_size={batch_size} does not split evenly over the {len(devices)} devices of "
            f"train.data_parallel=auto: use a multiple of {len(devices)} (e.g. train.batch_size="
            f"{len(devices) * max(1, round(batch_size / len(devices)))}) or train.data_parallel=off"
        )
    return keras.distribution.DataParallel(devices=devices)


@contextlib.contextmanager
def distribution_scope(distribution) -> Iterator[None]:
    """Create and train the model inside this: its variables are replicated on every device and its
    batches split among them. ``None`` is the plain path."""
    if distribution is None:
        yield
        return
    with distribution.scope():
        yield


def data_parallel_devices(distribution) -> int | None:
    """How many devices each batch is split over; None without a distribution."""
    return None if distribution is None else int(distribution.device_mesh.devices.size)


def describe_split(distribution, batch_shape: tuple[int, ...]) -> str | None:
    """How a batch of ``batch_shape`` is split, for the training log ("4 rows: 2 on each of 2 devices
    (cpu:0, cpu:1)"); None without a distribution."""
    if distribution is None:
        return None
    devices = list(distribution.device_mesh.devices.flatten())
    layout = distribution.get_data_layout(batch_shape)
    shards = layout.backend_layout.shard_shape(batch_shape)
    return (f"{batch_shape[0]} rows: {shards[0]} on each of {len(devices)} devices "
            f"({', '.join(str(d) for d in devices)})")
