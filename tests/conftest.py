"""Shared fixtures. Environment isolation comes first, before anything imports Keras or Prefect."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import gemma_core  # noqa: E402,F401  (sets the backend defaults before any test imports Keras)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory):
    """A tiny randomly initialised Gemma 3 saved as a local Keras preset (seconds to build)."""
    from tests.helpers.tiny_gemma import save_tiny_gemma3_preset

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


# --- Prefect isolation (pipeline tests) ----------------------------------------------------------
# Prefect reads its settings when first imported, and nothing has imported it yet: give this pytest
# session its own PREFECT_HOME (SQLite database, default storage) in a temporary directory, so no
# cached result leaks between sessions or from a developer's own runs, and never talk to a server
# the developer configured. One embedded server serves the whole session (it starts on the first
# flow run, about 15 s). Each pipeline test also gets its own output root and result storage.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_PREFECT_HOME = tempfile.mkdtemp(prefix="gemma-lora-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
for _var in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "GEMMA_LORA_RESULT_STORAGE", "GEMMA_LORA_FAIL_AT"):
    os.environ.pop(_var, None)
atexit.register(shutil.rmtree, _PREFECT_HOME, True)

from flows.env import apply_defaults  # noqa: E402  (environment defaults only; imports no Prefect)

apply_defaults()


@pytest.fixture(scope="session")
def gemma3_270m_preset():
    """The embedded Gemma 3 270M as a verified Keras preset, converted once per machine.

    It lives in the same cache the pipeline uses ($GEMMA_LORA_CACHE, else the user cache dir), so
    test sessions and real runs share one conversion instead of each spending a minute on it.
    """
    from gemma_core.preset_cache import ensure_converted
    from gemma_core.models import default_cache_dir

    return ensure_converted(default_cache_dir())


@pytest.fixture(scope="session")
def gemma3_270m(gemma3_270m_preset):
    """One loaded 270M CausalLM shared by the read-only slow tests (do not train it)."""
    import keras_hub

    return keras_hub.models.CausalLM.from_preset(str(gemma3_270m_preset))


@pytest.fixture(scope="session", autouse=True)
def _stop_embedded_prefect_server():
    """Stop the session's embedded Prefect server while pytest still owns the output streams
    (Prefect's own atexit hook would log to a closed stream)."""
    yield
    import sys

    if "prefect.server.api.server" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        APILogWorker.drain_all(timeout=10)  # logs and events still queued go out before the server stops
        EventsWorker.drain_all(timeout=10)
        SubprocessASGIServer().stop()
