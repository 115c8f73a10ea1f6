"""Token-by-token decoding for one prompt, so that a terminal can show each token as it is produced.

The batched decoders (``gemma_core/decode.py``'s compiled ``while_loop``, keras-hub's
``generate_step``) return only when the whole answer is done. This one prefills the prompt once
into a key/value cache of ``cache_length`` positions, then runs one compiled step per token (the
model's ``call_with_cache`` at the next position, then the keras-hub sampler) and hands each token
to Python before the next step. Between steps the caller may stop: Ctrl-C raises
``KeyboardInterrupt`` in the caller's loop, and the cache of that answer is simply dropped.

It reuses :class:`gemma_core.decode.CompactDecoder`'s prefill, stateless scope and variable
tracking, so greedy streaming picks the same tokens as batched generation (a test checks it).
Gemma 3 on JAX only (``CompactDecoder`` also runs on TensorFlow): elsewhere
:meth:`StreamingDecoder.supports` is False and the constructor says what to do.

:class:`TextStream` turns the token ids into the text to print next: SentencePiece pieces only
decode correctly in context (a leading space, a character split over byte tokens), so it decodes
the whole answer so far and emits what is new.

>>> decoder = StreamingDecoder(model, keras_hub.samplers.GreedySampler(), stop_token_ids=(1, 106),
...                            cache_length=1024)                                    # doctest: +SKIP
>>> text = TextStream(model.preprocessor.tokenizer)                                   # doctest: +SKIP
>>> for token in decoder.stream(prompt_ids, max_new_tokens=64):                       # doctest: +SKIP
...     print(text.push(token), end="", flush=True)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import keras
import numpy as np

from gemma_core.decode import CompactDecoder, _updated, prefill_length
from gemma_core.generation import decode_ids


class StreamingDecoder(CompactDecoder):
    """Answers one prompt at a time into a cache of ``cache_length`` positions (prompt plus answer).

    Compiles the step once per ``cache_length`` and the prefill once per prompt length rounded up
    to ``PREFILL_BUCKET``. The sampler's seed state runs on from one answer to the next (a chat's
    sampled answers differ turn by turn); :meth:`reset_sampler` rewinds it.
    """

    BACKENDS = ("jax",)

    def __init__(self, model, sampler, stop_token_ids: tuple[int, ...], cache_length: int):
        if not self.supports(model):
            raise ValueError(
                f"streaming runs a Gemma3CausalLM on the JAX backend; this is {type(model).__name__} on "
                f"{keras.config.backend()!r}: use --set backend=jax (with a Gemma 3 model), or answer without "
                "streaming (`gemma-lora generate`)")
        if cache_length < 2:
            raise ValueError(f"cache_length={cache_length}: needs room for a prompt and an answer")
        self.cache_length = cache_length
        super().__init__(model, sampler, stop_token_ids)
        self._stops = set(int(i) for i in stop_token_ids)
        self.sampler_state = self.initial_sampler_state()

    def _follow_model_variables(self) -> None:
        traced = self._weights
        super()._follow_model_variables()
        if self._weights is not traced:
            self._step = jax.jit(self._step_fn)

    def reset_sampler(self) -> None:
        self.sampler_state = self.initial_sampler_state()

    def is_stop(self, token: int) -> bool:
        return token in self._stops

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Yield the answer's token ids one at a time; a stop token, if one ends it, is yielded last.

        ``prompt_ids`` include the start token. Raises ValueError when prompt plus ``max_new_tokens``
        does not fit in ``cache_length``.
        """
        length = len(prompt_ids)
        if length < 1 or length + max_new_tokens > self.cache_length:
            raise ValueError(f"a prompt of {length} tokens plus {max_new_tokens} new tokens does not fit in "
                             f"the context of {self.cache_length} tokens")
        self._follow_model_variables()
        weights = [v.value for v in self._weights]
        prefix = np.zeros((1, prefill_length(length, self.cache_length)), dtype="int32")
        prefix[0, :length] = prompt_ids
        cache = self._prefill(weights, jnp.asarray(prefix), cache_length=self.cache_length)
        token = jnp.int32(prompt_ids[-1])
        for step in range(max_new_tokens):
            # The last prompt token is fed again at its own position: its cache entry is rewritten
            # with the same values, and its logits give the first answer token (CompactDecoder's order).
            token, cache, self.sampler_state = self._step(weights, self.sampler_state, token, cache,
                                                          jnp.int32(length - 1 + step))
            chosen = int(token)
            yield chosen
            if chosen in self._stops:
                return

    def _step_fn(self, weights, sampler_state, token, cache, position):
        with self._scope(weights, sampler_state) as scope:
            logits, _, cache = self.model.call_with_cache(token[None, None], cache, position)
            chosen = self._next_token(logits[:, 0, :])
        sampler_state = [_updated(scope, v, old) for v, old in zip(self.sampler.variables, sampler_state)]
        return chosen[0].astype("int32"), cache, sampler_state


class TextStream:
    """The printable text of a streamed answer, piece by piece.

    :meth:`push` takes each token id and returns the text it adds. Stop tokens add nothing; a
    character still incomplete (its UTF-8 bytes split over byte-fallback tokens, decoded as U+FFFD
    so far) is held back until the rest arrives.
    """

    def __init__(self, tokenizer, stop_token_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stops = set(int(i) for i in stop_token_ids)
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        if token in self.stops:
            return ""
        self.ids.append(int(token))
        text = decode_ids(self.tokenizer, self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""  # wait: the next token completes the character (or re-segments the tail)
        new, self.shown = text[len(self.shown):], text
        return new

    @property
    def text(self) -> str:
        """Everything the answer holds so far, fully decoded."""
        return decode_ids(self.tokenizer, self.ids) if self.ids else ""


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids the model is fed for ``prompt``: the start token, then the prompt's pieces
    (as ``generate_preprocess`` builds them; chat markers such as ``<start_of_turn>`` are one piece each)."""
    pieces = keras.ops.convert_to_numpy(tokenizer(prompt)).tolist()
    return [int(tokenizer.start_token_id), *pieces]

