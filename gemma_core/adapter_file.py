"""What a LoRA adapter file (keras-hub's ``.lora.h5``) holds, read without a model, and whether it fits one.

keras-hub's ``load_lora_weights`` assigns each saved factor to the layer at the same index. An
adapter of another rank fails there with keras-hub's own message, but an adapter of another base
model either fails deep inside Keras with a bare shape error or, where the shapes happen to agree,
loads silently into the wrong layers. :func:`check_adapter_fits` compares the file with the model
first (rank, which layers, every factor's shape) and names what differs and how to fix it.

>>> adapter = read_adapter_file("runs/train/train-0123/adapter.lora.h5")   # doctest: +SKIP
>>> adapter.rank, sorted(adapter.layers)[:2]                               # doctest: +SKIP
(4, [11, 13])
>>> load_checked_adapter(model, adapter)   # model: LoRA enabled at rank 4  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ADAPTER_SUFFIX = ".lora.h5"
TOKEN_ROWS_GROUP = "token_rows"  # trainable token rows (gemma_core.token_rows), beside keras-hub's "lora"


class AdapterMismatchError(ValueError):
    """An adapter file does not fit the model it is loaded into; the message says why and the fix."""


@dataclass(frozen=True)
class AdapterFile:
    path: Path
    rank: int
    # layer index (keras-hub's: among the backbone's layers that have weights) -> (A shape, B shape)
    layers: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]
    # trainable token rows (gemma_core.token_rows): their ids and the width of each delta
    token_rows: tuple[int, ...] = ()
    token_row_width: int | None = None


def read_adapter_file(path: str | Path) -> AdapterFile:
    """The rank and factor shapes stored in ``path``; a file that is not a keras-hub adapter is named."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            lora = f["lora"]
            rank = int(lora["vars"]["rank"][()])
            layers = {int(name): (tuple(group["vars"]["lora_kernel_a"].shape),
                                  tuple(group["vars"]["lora_kernel_b"].shape))
                      for name, group in lora.items() if name.isdigit()}
            rows = _token_rows(f)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise AdapterMismatchError(f"{path} is not a keras-hub LoRA adapter ({type(err).__name__}: {err}); "
                                   f"pass a {ADAPTER_SUFFIX} file written by training or `gemma-lora export`") from None
    token_rows, row_width = (rows[0], rows[1].shape[1]) if rows is not None else ((), None)
    return AdapterFile(path, rank, layers, token_rows, row_width)


def read_token_rows(path: str | Path) -> tuple[tuple[int, ...], np.ndarray] | None:
    """``(ids, deltas)`` of the trainable token rows stored in an adapter file, or None when it has none."""
    import h5py

    with h5py.File(path, "r") as f:
        return _token_rows(f)


def _token_rows(f) -> tuple[tuple[int, ...], np.ndarray] | None:
    if TOKEN_ROWS_GROUP not in f:
        return None
    rows = f[TOKEN_ROWS_GROUP]
    return tuple(int(t) for t in rows["ids"][()]), np.asarray(rows["deltas"][()])


def check_adapter_fits(model, adapter: AdapterFile) -> None:
    """Raise :class:`AdapterMismatchError` unless ``adapter`` fits ``model`` (LoRA already enabled)."""
    backbone = model.backbone
    rank = getattr(backbone, "_lora_rank", None)
    if rank != adapter.rank:
        raise AdapterMismatchError(
            f"adapter {adapter.path} has LoRA rank {adapter.rank}, the model was set up with rank {rank}: "
            f"use --set lora.rank={adapter.rank} (or leave lora.rank unset to take the adapter's own)")
    enabled = list(backbone._lora_enabled_layers)
    with_weights = [layer for layer in backbone._flatten_layers(include_self=False) if layer.weights]
    expected = {i: (tuple(with_weights[i].lora_kernel_a.shape), tuple(with_weights[i].lora_kernel_b.shape))
                for i in enabled}
    for index in sorted(set(expected) & set(adapter.layers)):
        if expected[index] != adapter.layers[index]:
            raise AdapterMismatchError(
                f"adapter {adapter.path} was trained on another base model: its layer {index} has LoRA factors "
                f"of shapes {list(adapter.layers[index])}, this model's are {list(expected[index])}. Load it "
                "with the model it was tuned on (--set model.spec=...; `gemma-lora champion` shows the spec)")
    embedding = backbone.token_embedding
    if adapter.token_rows and (adapter.token_row_width != embedding.output_dim
                               or max(adapter.token_rows) >= embedding.input_dim):
        raise AdapterMismatchError(
            f"adapter {adapter.path} was trained on another base model: it tunes the embedding rows of tokens "
            f"{list(adapter.token_rows)} with width {adapter.token_row_width}, this model has {embedding.input_dim} "
            f"tokens of width {embedding.output_dim}. Load it with the model it was tuned on (--set model.spec=...)")
    if set(expected) != set(adapter.layers):
        raise AdapterMismatchError(
            f"adapter {adapter.path} has LoRA weights for {len(adapter.layers)} layers "
            f"(indices {sorted(adapter.layers)[:8]}...), this model enables {len(expected)} "
            f"(indices {sorted(expected)[:8]}...): it was trained with other lora.target_layer_names or on "
            "another base model; set lora.target_layer_names and model.spec as in its training run")


def load_checked_adapter(model, adapter: AdapterFile) -> None:
    """Check, then load the adapter's weights into ``model`` (LoRA enabled as in training)."""
    check_adapter_fits(model, adapter)
    from gemma_core.token_rows import load_adapter

    load_adapter(model.backbone, adapter.path)
