"""gemma_core: the pure ML side of gemma-lora-flow (data, model, LoRA training, generation, evaluation).

Nothing in this package imports Prefect; ``tasks/`` and ``flows/`` wrap it.

Keras reads ``KERAS_BACKEND`` once, at its first import, so the default backend is set here, before
any module of this package imports Keras. JAX is the default: on a 2-core CPU it compiles the first
training step several times faster than TensorFlow with XLA, which dominates short fine-tuning runs.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
# TensorFlow is still imported (keras-hub preprocessing runs on tf.data); keep its C++ logs quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _enable_jax_compilation_cache() -> None:
    """Keep XLA executables on disk: a rerun's first training step or generate call then loads in
    seconds instead of compiling for tens of seconds (JAX keys entries by program, flags and version)."""
    from gemma_core.models import default_cache_dir

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(default_cache_dir() / "jax"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if "jax" in sys.modules:  # imported before us: JAX read its environment already
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


_enable_jax_compilation_cache()

__version__ = "0.1.0"
