"""A compiled decode loop for keras-hub's Gemma 3 that does only the work the answers need.

keras-hub 0.32's ``generate_step`` runs the model over the whole padded length before decoding
(prompt and empty answer slots alike), then steps all rows together from the batch's shortest
prompt to the padded length: a row with a longer prompt is fed its prompt one token per step while
the others answer, and every row runs on after it has produced ``max_new_tokens``. This loop:

- prefills the prompts in groups of ``PREFILL_GROUP`` rows of similar length, each only up to its
  longest prompt (rounded up to a multiple of ``PREFILL_BUCKET`` so that few shapes compile), so a
  short prompt is not padded to the batch's longest;
- decodes each row at its own position: every row's new token goes through the model at once, with
  keras-hub's serving hook (``vllm_context_scope``: rotary embeddings at per-row positions, the
  attention handed to :func:`attend_at_positions`), so every row starts answering at step one;
- stops once every row has produced a stop token or ``max_new_tokens``.

Each step is the model's own ``call_with_cache`` (its projections, norms, rotary embeddings and MLP)
followed by the keras-hub sampler's ``compute_probabilities`` and ``get_next_token``, so greedy
decoding picks the same tokens as ``model.generate`` (keras-hub's own ``GreedySampler`` takes
:func:`greedy_next_token`: the same token, without the softmax). Gemma 3 on JAX or TensorFlow
(:meth:`CompactDecoder.supports`), written in ``keras.ops``: on JAX the model's weights and the
sampler's seed state are passed in as arrays (Keras's stateless scope), as keras-hub's own JAX
generate function does; on TensorFlow the loop is a ``tf.function`` compiled with XLA that reads the
variables.

>>> decoder = CompactDecoder(model, keras_hub.samplers.GreedySampler(), stop_token_ids=(1, 106))  # doctest: +SKIP
>>> token_ids, ends, state = decoder(token_ids, prompt_lengths, 64, decoder.initial_sampler_state())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import math
from functools import partial

import keras
import keras_hub
import numpy as np
from keras import ops
# keras-hub 0.32's serving hook (pinned in pyproject): its Gemma 3 attention hands each layer's
# projected query, key and value to the function it is given, with rotary embeddings at the given
# per-row positions. tests/test_generation.py checks the answers against keras-hub's own loop.
from keras_hub.src.vllm.context import get_vllm_context, vllm_context_scope

# Prompts are prefilled up to the longest one, rounded up to this many tokens (fewer prefill shapes
# to compile against a little extra prefill work).
PREFILL_BUCKET = 16
# Rows prefilled together: rows sorted by prompt length are prefilled this many at a time, each group
# up to its own longest prompt (more groups: less padding, more prefill shapes to compile).
PREFILL_GROUP = 8


class CompactDecoder:
    """Generates into right-padded ``token_ids`` of shape (batch, total_length).

    Compiles once per (batch, total_length) for the loop and once per (batch, prefill length,
    total_length) for the prefill; JAX's disk cache keeps both across runs.
    """

    BACKENDS = ("jax", "tensorflow")

    @classmethod
    def supports(cls, model) -> bool:
        """Gemma 3 on JAX or TensorFlow: the cache layout (a (key, value) pair per layer) and the
        serving hook are Gemma 3's; other keras-hub models keep their cache in one stacked tensor."""
        return keras.config.backend() in cls.BACKENDS and isinstance(model, keras_hub.models.Gemma3CausalLM)

    def __init__(self, model, sampler, stop_token_ids: tuple[int, ...]):
        if not self.supports(model):
            raise ValueError(f"{type(self).__name__} runs {type(model).__name__} on {keras.config.backend()!r}; "
                             f"it needs a Gemma3CausalLM on {' or '.join(self.BACKENDS)}: use keras-hub's generate "
                             "loop (generation.compact_decode=false)")
        self.model = model
        self.sampler = sampler
        self._stateless = keras.config.backend() == "jax"  # see _weight_values
        self.stop_token_ids = tuple(int(i) for i in stop_token_ids)
        self._weights: list = []
        self._follow_model_variables()
        self._regroup = _compile(self._regroup_fn)  # reads no variable: traced once
        # Kept from the start: on TensorFlow the sampler's variables move on as it samples.
        self._initial_sampler_state = [ops.convert_to_numpy(v) for v in sampler.variables]

    def _follow_model_variables(self) -> None:
        """Trace again if the model's variables changed since the last call (``enable_lora`` adds
        some): a compiled program reads exactly the variables it was traced with, and would
        otherwise generate without the adapter."""
        weights = self.model.trainable_variables + self.model.non_trainable_variables
        if [id(v) for v in weights] != [id(v) for v in self._weights]:
            self._weights = weights
            queries = {id(layer.attention.query_dense._kernel) for layer in self.model.backbone.transformer_layers}
            self._query_kernels = [i for i, v in enumerate(weights) if id(v) in queries]
            self._prefill = _compile(self._prefill_fn, static_argnames="cache_length")
            self._decode = _compile(self._decode_fn)

    def initial_sampler_state(self) -> list[np.ndarray]:
        return [np.copy(v) for v in self._initial_sampler_state]

    def __call__(self, token_ids: np.ndarray, prompt_lengths: np.ndarray, max_new_tokens: int, sampler_state):
        """Returns (token_ids with each row's answer written after its prompt, each row's end: the
        first position it did not write, the sampler state to pass to the next call)."""
        batch_size, total_length = token_ids.shape
        longest = int(prompt_lengths.max())
        if longest + max_new_tokens > total_length:
            raise ValueError(f"total_length {total_length} is too short for prompts of up to "
                             f"{longest} tokens plus {max_new_tokens} new tokens")
        self._follow_model_variables()
        weights = self._weight_values()
        cache = self._prefill_in_groups(weights, token_ids, prompt_lengths)
        token_ids, steps, sampler_state = self._decode(
            weights, self._sampler_values(sampler_state), ops.convert_to_tensor(token_ids, dtype="int32"), cache,
            ops.convert_to_tensor(prompt_lengths, dtype="int32"), ops.convert_to_tensor(max_new_tokens, dtype="int32"))
        if not self._stateless:
            sampler_state = self.sampler.variables
        return (ops.convert_to_numpy(token_ids), np.asarray(prompt_lengths) + int(ops.convert_to_numpy(steps)),
                [ops.convert_to_numpy(v) for v in sampler_state])

    def _prefill_in_groups(self, weights, token_ids: np.ndarray, prompt_lengths: np.ndarray):
        """The cache after every row's prompt: rows of similar length are prefilled together, each group
        only up to its longest prompt, and the groups' caches are put back in the rows' order."""
        batch_size, total_length = token_ids.shape
        order = np.argsort(prompt_lengths, kind="stable")
        groups = [order[i:i + PREFILL_GROUP] for i in range(0, batch_size, PREFILL_GROUP)]
        caches = []
        for rows in groups:
            length = prefill_length(int(prompt_lengths[rows].max()), total_length)
            caches.append(self._prefill(weights, ops.convert_to_tensor(token_ids[rows, :length], dtype="int32"),
                                        cache_length=total_length))
        if len(caches) == 1 and np.array_equal(order, np.arange(batch_size)):
            return caches[0]
        return self._regroup(caches, ops.convert_to_tensor(np.argsort(order), dtype="int32"))

    # On JAX the compiled functions take the variables' values as arguments and run them in a stateless
    # scope; on TensorFlow they read the variables themselves (weights and sampler state go in empty), and
    # the sampler's seed state is set on its variables before the call (and read back from them after).
    def _weight_values(self) -> list:
        return [v.value for v in self._weights] if self._stateless else []

    def _sampler_values(self, sampler_state) -> list:
        if self._stateless:
            return list(sampler_state)
        for variable, value in zip(self.sampler.variables, sampler_state):
            variable.assign(value)
        return []

    def _scope(self, weights, sampler_state=()):
        if not self._stateless:
            return contextlib.nullcontext()
        mapping = itertools.chain(zip(self._weights, weights), zip(self.sampler.variables, sampler_state))
        return keras.StatelessScope(state_mapping=mapping)

    def _prefill_fn(self, weights, prefix, cache_length: int):
        backbone = self.model.backbone
        shape = (ops.shape(prefix)[0], cache_length, backbone.num_key_value_heads, backbone.head_dim)
        zeros = partial(ops.zeros, shape, dtype=self.model.compute_dtype)
        empty = tuple((zeros(), zeros()) for _ in range(backbone.num_layers))
        # Prompts are right-padded and attention is causal, so no prompt position sees the padding
        # after it, and the decode loop overwrites each padding position before a query can see it.
        with self._scope(weights):
            _, _, cache = self.model.call_with_cache(prefix, empty, 0)
        return cache

    @staticmethod
    def _regroup_fn(caches, place):
        """One cache from the groups' caches, row r from the sorted row at ``place[r]``."""
        return tuple(tuple(ops.take(ops.concatenate([c[layer][part] for c in caches], axis=0), place, axis=0)
                           for part in range(2)) for layer in range(len(caches[0])))

    # A query kernel is stored (heads, hidden, head_dim) and its einsum contracts the middle axis, so XLA
    # on CPU copies it to (hidden, heads, head_dim) before the matmul, at every step: loop-invariant code
    # motion does not hoist a transpose. On JAX the loop gets each one transposed once before it starts
    # (kept so by an optimization barrier) and hands the layer a transposed view, which the matmul reads
    # in place.
    def _queries_stored_for_the_step(self, weights) -> dict:
        if not self._stateless:
            return {}
        import jax

        return {i: jax.lax.optimization_barrier(ops.transpose(weights[i], (1, 0, 2))) for i in self._query_kernels}

    @staticmethod
    def _queries_as_the_layer_reads_them(weights, stored: dict) -> list:
        return [ops.transpose(stored[i], (1, 0, 2)) if i in stored else w for i, w in enumerate(weights)]

    def _next_token(self, logits):
        if type(self.sampler) is keras_hub.samplers.GreedySampler:
            return greedy_next_token(logits)
        return self.sampler.get_next_token(self.sampler.compute_probabilities(logits))

    def _batch_step(self, tokens, cache, positions):
        """One token of every row, each at its own position: (logits (batch, vocabulary), the cache)."""
        with vllm_context_scope(paged_attention_func=partial(attend_at_positions, positions), positions=positions,
                                kv_caches=list(cache)):
            # The cache and index given here only feed the dense path's mask, which the hook bypasses.
            logits, _, _ = self.model.call_with_cache(tokens[:, None], cache, 0)
            cache = tuple(tuple(layer) for layer in get_vllm_context().updated_kv_caches)
        return logits[:, 0], cache

    def _decode_fn(self, weights, sampler_state, token_ids, cache, prompt_lengths, max_new_tokens):
        stored = self._queries_stored_for_the_step(weights)
        batch_size = ops.shape(token_ids)[0]
        rows = ops.arange(batch_size, dtype="int32")
        stops = ops.convert_to_tensor(self.stop_token_ids, dtype="int32")

        def unfinished(token_ids, cache, step, done, sampler_state):
            return ops.logical_and(step < max_new_tokens, ops.logical_not(ops.all(done)))

        def step(token_ids, cache, step, done, sampler_state):
            position = prompt_lengths - 1 + step  # of the token fed; it predicts the one after
            fed = ops.take_along_axis(token_ids, position[:, None], axis=1)[:, 0]
            with self._scope(self._queries_as_the_layer_reads_them(weights, stored), sampler_state) as scope:
                logits, cache = self._batch_step(fed, cache, position)
                chosen = self._next_token(logits)
            sampler_state = [_updated(scope, v, old) for v, old in zip(self.sampler.variables, sampler_state)]
            chosen = ops.cast(chosen, "int32")
            token_ids = ops.scatter_update(token_ids, ops.stack([rows, position + 1], axis=1), chosen)
            done = ops.logical_or(done, ops.any(ops.equal(chosen[:, None], stops[None, :]), axis=1))
            return token_ids, cache, step + 1, done, sampler_state

        done = ops.zeros((batch_size,), dtype="bool")
        token_ids, _, steps, _, sampler_state = ops.while_loop(
            unfinished, step, (token_ids, cache, ops.convert_to_tensor(0, dtype="int32"), done, list(sampler_state)))
        return token_ids, steps, sampler_state


def attend_at_positions(positions, cache, query, key, value, scale, head_dim, num_heads, kv_heads,
                        sliding_window=None, soft_cap=None):
    """One new token per row at that row's position: its key and value are written there, then it
    attends to the row's positions up to it (within the sliding window), as keras-hub's dense path
    does. The serving hook's signature: ``query`` (batch, heads x head_dim), ``key``/``value``
    (batch, kv heads x head_dim); returns (the layer's new cache, the attention output)."""
    key_cache, value_cache = cache
    batch, length = ops.shape(key_cache)[0], ops.shape(key_cache)[1]
    at = ops.stack([ops.arange(batch, dtype="int32"), positions], axis=1)
    key_cache = ops.scatter_update(key_cache, at, ops.cast(ops.reshape(key, (batch, kv_heads, head_dim)),
                                                           key_cache.dtype))
    value_cache = ops.scatter_update(value_cache, at, ops.cast(ops.reshape(value, (batch, kv_heads, head_dim)),
                                                               value_cache.dtype))
    query = ops.reshape(query, (batch, kv_heads, num_heads // kv_heads, head_dim)) * ops.cast(scale, query.dtype)
    # Scores as (batch, kv heads, positions, query heads): the cache is the left operand with head_dim,
    # the contracted axis, innermost, as it is stored. Contracted against the query's head_dim in the
    # other order, XLA on CPU copied each layer's key cache into a transposed layout at every step.
    logits = ops.einsum("bskh,bkhg->bksg", key_cache, ops.swapaxes(query, 2, 3))
    if soft_cap is not None:
        logits = ops.tanh(logits / soft_cap) * soft_cap
    distance = positions[:, None] - ops.arange(length, dtype="int32")[None, :]
    visible = distance >= 0
    if sliding_window is not None:
        visible = ops.logical_and(visible, distance < sliding_window)
    logits = ops.where(visible[:, None, :, None], logits, ops.cast(-1e9, logits.dtype))
    # The probabilities turned back to (..., query heads, positions) (a small copy), so the output comes
    # out as (batch, heads, head_dim): in the other order XLA transposed the output projection's kernel.
    out = ops.einsum("bkgs,bskh->bkgh", ops.swapaxes(ops.softmax(logits, axis=2), 2, 3), value_cache)
    return (key_cache, value_cache), ops.reshape(out, (batch, num_heads * head_dim))


def prefill_length(longest_prompt: int, cache_length: int) -> int:
    """How far a prefill runs: the longest prompt rounded up to ``PREFILL_BUCKET``, within the cache."""
    return min(cache_length, PREFILL_BUCKET * math.ceil(longest_prompt / PREFILL_BUCKET))


def greedy_next_token(logits, chunk: int = 512):
    """The argmax over the vocabulary of (batch, vocabulary) logits, the first index on ties: the token
    keras-hub's ``GreedySampler`` picks from the softmax of the same logits (the softmax keeps their
    order). XLA on CPU runs one argmax over 262,144 words as a single sequential reduction; the max of
    each chunk first, then the argmax within the first chunk holding it, finds the same index sooner
    (bench/RESULTS.md, Generation)."""
    batch, vocabulary = ops.shape(logits)
    chunks = -(-vocabulary // chunk)
    if chunks * chunk != vocabulary:
        logits = ops.pad(logits, [[0, 0], [0, chunks * chunk - vocabulary]], constant_values=-np.inf)
    pieces = ops.reshape(logits, (batch, chunks, chunk))
    best = ops.argmax(ops.max(pieces, axis=-1), axis=-1)
    within = ops.argmax(ops.take_along_axis(pieces, ops.reshape(best, (batch, 1, 1)), axis=1)[:, 0], axis=-1)
    return ops.cast(best, "int32") * chunk + ops.cast(within, "int32")


def _compile(fn, static_argnames=None):
    if keras.config.backend() == "jax":
        import jax

        return jax.jit(fn, static_argnames=static_argnames)
    import tensorflow as tf

    # Shapes stay symbolic in the trace and XLA compiles each concrete one; cache_length (the prefill's)
    # is a Python int, so each value has its own trace, as jax.jit's static argument does.
    return tf.function(fn, jit_compile=True, reduce_retracing=True)


def _updated(scope, variable, old):
    value = scope.get_current_value(variable)
    return old if value is None else value
