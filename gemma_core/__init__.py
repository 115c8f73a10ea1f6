"""gemma_core: the pure ML side of gemma-lora-flow (data, model, LoRA training, generation, evaluation).

Nothing in this package imports Prefect; ``tasks/`` and ``flows/`` wrap it.

Keras reads ``KERAS_BACKEND`` once, at its first import, so the default backend is set here, before
any module of this package imports Keras. JAX is the default: on a 2-core CPU it compiles the first
training step several times faster than TensorFlow with XLA, which dominates short fine-tuning runs.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
# TensorFlow is still imported (keras-hub preprocessing runs on tf.data); keep its C++ logs quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
