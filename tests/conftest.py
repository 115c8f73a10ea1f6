"""Shared fixtures. Environment isolation comes first, before anything imports Keras or Prefect."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory):
    """A tiny randomly initialised Gemma 3 saved as a local Keras preset (seconds to build)."""
    from gemma_core.tiny_gemma import save_tiny_gemma3_preset

    return save_tiny_gemma3_preset(tmp_path_factory.mktemp("tiny") / "preset")


@pytest.fixture
def tiny_model(tiny_preset):
    """A fresh tiny model per test: training mutates the model it is given."""
    import keras_hub

    return keras_hub.models.CausalLM.from_preset(str(tiny_preset))


@pytest.fixture(scope="session")
def sample_splits(tmp_path_factory):
    """The offline sample's train and eval frames, as the data stage writes them."""
    from gemma_core.config import DataConfig
    from gemma_core.dolly_prepare import format_dolly_to_parquet, read_split

    prepared = format_dolly_to_parquet(DataConfig(), tmp_path_factory.mktemp("data"))
    return read_split(prepared.train_path), read_split(prepared.eval_path)
