"""A compiled decode loop for keras-hub causal LMs that does only the work the answers need.

keras-hub 0.32's ``generate_step`` runs the model over the whole padded length before decoding
(prompt and empty answer slots alike), then steps all rows together from the batch's shortest
prompt to the padded length: a row with a longer prompt is fed its prompt one token per step while
the others answer, and every row runs on after it has produced ``max_new_tokens``. This loop:

- prefills the prompts in one pass, only up to the longest prompt (rounded up to a multiple of
  ``PREFILL_BUCKET`` so that few shapes compile);
- decodes each row at its own position (the model's ``call_with_cache`` vectorised over rows with
  ``jax.vmap``, one cache index per row), so every row starts answering at step one;
- stops once every row has produced a stop token or ``max_new_tokens``.

Each step is the model's own ``call_with_cache`` followed by the keras-hub sampler's
``compute_probabilities`` and ``get_next_token``, so greedy decoding picks the same tokens as
``model.generate``. Gemma 3 on JAX only (:meth:`CompactDecoder.supports`): the model's weights
and the sampler's seed state are passed in as arrays (Keras's stateless scope), as keras-hub's own
JAX generate function does.

>>> decoder = CompactDecoder(model, keras_hub.samplers.GreedySampler(), stop_token_ids=(1, 106))  # doctest: +SKIP
>>> token_ids, ends, state = decoder(token_ids, prompt_lengths, 64, decoder.initial_sampler_state())  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import jax
import jax.numpy as jnp
import keras
import keras_hub
import numpy as np

# Prompts are prefilled up to the longest one, rounded up to this many tokens (fewer prefill shapes
# to compile against a little extra prefill work).
PREFILL_BUCKET = 16


class CompactDecoder:
    """Generates into right-padded ``token_ids`` of shape (batch, total_length).

    Compiles once per (batch, total_length) for the loop and once per (batch, prefill length,
    total_length) for the prefill; JAX's disk cache keeps both across runs.
    """

    @staticmethod
    def supports(model) -> bool:
        """Gemma 3 on JAX: the cache layout (a (key, value) pair per layer) is Gemma 3's; other
        keras-hub models keep theirs in one stacked tensor."""
        return keras.config.backend() == "jax" and isinstance(model, keras_hub.models.Gemma3CausalLM)

    def __init__(self, model, sampler, stop_token_ids: tuple[int, ...]):
        if not self.supports(model):
            raise ValueError(f"CompactDecoder runs {type(model).__name__} on {keras.config.backend()!r}; it needs "
                             "a Gemma3CausalLM on JAX: use keras-hub's generate loop (generation.compact_decode=false)")
        self.model = model
        self.sampler = sampler
        self.stop_token_ids = jnp.asarray(stop_token_ids, dtype="int32")
        self._weights: list = []
        self._follow_model_variables()

    def _follow_model_variables(self) -> None:
        """Trace again if the model's variables changed since the last call (``enable_lora`` adds
        some): a compiled program reads exactly the variables it was traced with, and would
        otherwise generate without the adapter."""
        weights = self.model.trainable_variables + self.model.non_trainable_variables
        if [id(v) for v in weights] != [id(v) for v in self._weights]:
            self._weights = weights
            self._prefill = jax.jit(self._prefill_fn, static_argnames="cache_length")
            self._decode = jax.jit(self._decode_fn)

    def initial_sampler_state(self) -> list[np.ndarray]:
        return [keras.ops.convert_to_numpy(v) for v in self.sampler.variables]

    def __call__(self, token_ids: np.ndarray, prompt_lengths: np.ndarray, max_new_tokens: int, sampler_state):
        """Returns (token_ids with each row's answer written after its prompt, each row's end: the
        first position it did not write, the sampler state to pass to the next call)."""
        batch_size, total_length = token_ids.shape
        longest = int(prompt_lengths.max())
        if longest + max_new_tokens > total_length:
            raise ValueError(f"total_length {total_length} is too short for prompts of up to "
                             f"{longest} tokens plus {max_new_tokens} new tokens")
        self._follow_model_variables()
        weights = [v.value for v in self._weights]
        prefill_length = min(total_length, PREFILL_BUCKET * math.ceil(longest / PREFILL_BUCKET))
        cache = self._prefill(weights, jnp.asarray(token_ids[:, :prefill_length], dtype="int32"),
                              cache_length=total_length)
        token_ids, steps, sampler_state = self._decode(
            weights, sampler_state, jnp.asarray(token_ids, dtype="int32"), cache,
            jnp.asarray(prompt_lengths, dtype="int32"), jnp.int32(max_new_tokens))
        return np.asarray(token_ids), np.asarray(prompt_lengths) + int(steps), sampler_state

    def _scope(self, weights, sampler_state=()):
        mapping = itertools.chain(zip(self._weights, weights), zip(self.sampler.variables, sampler_state))
        return keras.StatelessScope(state_mapping=mapping)

    def _prefill_fn(self, weights, prefix, cache_length: int):
        backbone = self.model.backbone
        shape = (prefix.shape[0], cache_length, backbone.num_key_value_heads, backbone.head_dim)
        zeros = partial(jnp.zeros, shape, dtype=self.model.compute_dtype)
        empty = tuple((zeros(), zeros()) for _ in range(backbone.num_layers))
        # Prompts are right-padded and attention is causal, so no prompt position sees the padding
        # after it, and the decode loop overwrites each padding position before a query can see it.
        with self._scope(weights):
            _, _, cache = self.model.call_with_cache(prefix, empty, 0)
        return cache

    def _row_step(self, token, cache, position):
        """One token of one row at its own position: the model sees a batch of one."""
        batch_of_one = jax.tree.map(lambda c: c[None], cache)
        logits, _, batch_of_one = self.model.call_with_cache(token[None, None], batch_of_one, position)
        return logits[0, 0], jax.tree.map(lambda c: c[0], batch_of_one)

    def _decode_fn(self, weights, sampler_state, token_ids, cache, prompt_lengths, max_new_tokens):
        batch_size = token_ids.shape[0]
        rows = jnp.arange(batch_size)
        step_rows = jax.vmap(self._row_step)

        def unfinished(carry):
            _, _, step, done, _ = carry
            return (step < max_new_tokens) & ~jnp.all(done)

        def step(carry):
            token_ids, cache, step, done, sampler_state = carry
            position = prompt_lengths - 1 + step  # of the token fed; it predicts the one after
            with self._scope(weights, sampler_state) as scope:
                logits, cache = step_rows(token_ids[rows, position], cache, position)
                chosen = self.sampler.get_next_token(self.sampler.compute_probabilities(logits))
            sampler_state = [_updated(scope, v, old) for v, old in zip(self.sampler.variables, sampler_state)]
            chosen = chosen.astype("int32")
            token_ids = token_ids.at[rows, position + 1].set(chosen)
            done = done | jnp.isin(chosen, self.stop_token_ids)
            return token_ids, cache, step + 1, done, sampler_state

        done = jnp.zeros((batch_size,), dtype=bool)
        token_ids, _, steps, _, sampler_state = jax.lax.while_loop(
            unfinished, step, (token_ids, cache, jnp.int32(0), done, list(sampler_state)))
        return token_ids, steps, sampler_state


def _updated(scope, variable, old):
    value = scope.get_current_value(variable)
    return old if value is None else value
