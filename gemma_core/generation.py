"""Batched generation over many prompts, compiled once.

Prompts are sorted by length and batched with their peers; every call uses one batch size (the
last batch is padded with copies of its first prompt), total lengths rounded up to multiples of 64,
and one stop-token tuple, so the decode loop compiles once per length bucket, and JAX keeps the
executables on disk across runs.

Two decode loops, chosen by ``GenerationConfig.compact_decode``:
- compact (default, Gemma 3 on JAX or TensorFlow): ``gemma_core.decode.CompactDecoder`` prefills
  only the prompts, decodes each row from its own prompt's end, and stops once every row has ended
  or produced ``max_new_tokens``;
- keras-hub's own ``generate_step`` (the plain path, and the one other backends and models use).
  Its sampler is set without calling ``compile()``, which would throw the compiled loop away.

>>> outputs = generate_answers(model, ["Instruction:\\nName a colour.\\n\\nResponse:\\n"],
...                            GenerationConfig(max_new_tokens=16))   # doctest: +SKIP
>>> outputs[0].text, outputs[0].new_tokens, outputs[0].ended_by                     # doctest: +SKIP

Both loops stop a row on any of :func:`stop_token_ids` (``<eos>`` and Gemma's ``<end_of_turn>``, which
ends a turn in the ``gemma_chat`` format); the answer records which one ended it and never holds it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import keras
import keras_hub
import numpy as np

from gemma_core.config import GenerationConfig
from gemma_core.decode import CompactDecoder
from gemma_core.prompts import END_OF_TURN

# The total length (prompt + answer) is rounded up to this, so batches with slightly different
# prompts reuse one compiled loop.
LENGTH_BUCKET = 64


@dataclass(frozen=True)
class GeneratedAnswer:
    prompt: str
    text: str
    new_tokens: int
    ended: bool  # stopped on a stop token (<eos> or <end_of_turn>) before the max_new_tokens limit
    ended_by: str | None = None  # which: "eos" or "end_of_turn" (the token without its brackets); None: the limit


@dataclass(frozen=True)
class GenerationRun:
    answers: list[GeneratedAnswer]
    seconds: float
    first_batch_seconds: float  # includes compilation

    @property
    def new_tokens_per_second(self) -> float:
        return sum(a.new_tokens for a in self.answers) / self.seconds if self.seconds else float("nan")


def make_sampler(cfg: GenerationConfig) -> keras_hub.samplers.Sampler:
    if cfg.sampler == "greedy":
        return keras_hub.samplers.GreedySampler(temperature=cfg.temperature)
    if cfg.sampler == "top_k":
        return keras_hub.samplers.TopKSampler(k=cfg.top_k, seed=cfg.seed, temperature=cfg.temperature)
    return keras_hub.samplers.TopPSampler(p=cfg.top_p, seed=cfg.seed, temperature=cfg.temperature)


def stop_token_ids(model) -> tuple[int, ...]:
    """The tokens that end an answer: ``<eos>``, and ``<end_of_turn>`` where the vocabulary has it."""
    tokenizer = model.preprocessor.tokenizer
    ids = {tokenizer.end_token_id}
    try:
        ids.add(tokenizer.token_to_id(END_OF_TURN))
    except (KeyError, ValueError):
        pass
    return tuple(sorted(i for i in ids if i is not None))


def stop_token_name(tokenizer, token_id: int) -> str:
    """``<end_of_turn>`` -> ``end_of_turn``: how an evaluation row records what ended the answer."""
    return str(tokenizer.id_to_token(int(token_id))).strip("<>")


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
    """``tokenizer.detokenize`` as a Python string (keras-hub returns a tensor or bytes on some backends)."""
    text = tokenizer.detokenize(np.asarray(ids, dtype="int32"))
    if not isinstance(text, str):
        text = keras.ops.convert_to_numpy(text).item()
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
    return text


def _compiled_generate(model, cfg: GenerationConfig):
    """The model's compiled generate loop for this sampler, with the sampler's RNG rewound.

    Setting ``model.sampler`` directly keeps the compiled loop (``compile()`` would discard it);
    rewinding the seed state makes answers depend on ``cfg.seed`` alone, not on earlier calls.
    """
    key = (cfg.sampler, cfg.top_k, cfg.top_p, cfg.temperature, cfg.seed)
    if getattr(model, "_sampler_key", None) != key or model.generate_function is None:
        model.sampler = make_sampler(cfg)
        model.generate_function = None
        model._sampler_key = key
        model._sampler_initial_state = [keras.ops.convert_to_numpy(v) for v in model.sampler.variables]
    for variable, value in zip(model.sampler.variables, model._sampler_initial_state):
        variable.assign(value)
    return model.make_generate_function()


def _keras_hub_loop(model, cfg: GenerationConfig, stops: tuple[int, ...]):
    generate = _compiled_generate(model, cfg)

    def run(inputs):
        outputs = generate(inputs, stop_token_ids=stops)
        return (keras.ops.convert_to_numpy(outputs["token_ids"]),
                keras.ops.convert_to_numpy(outputs["padding_mask"]).astype(bool))
    return run


def _compact_loop(model, cfg: GenerationConfig, stops: tuple[int, ...]):
    """The compact decoder for this sampler, kept on the model so its compiled loop is reused; each
    call starts from the sampler's initial seed state, so answers depend on ``cfg.seed`` alone."""
    key = (cfg.sampler, cfg.top_k, cfg.top_p, cfg.temperature, cfg.seed, stops)
    decoders = model.__dict__.setdefault("_compact_decoders", {})  # past Keras's attribute tracking
    if key not in decoders:
        decoders[key] = CompactDecoder(model, make_sampler(cfg), stops)
    decoder = decoders[key]
    sampler_state = decoder.initial_sampler_state()

    def run(inputs):
        nonlocal sampler_state
        prompt_lengths = keras.ops.convert_to_numpy(inputs["padding_mask"]).sum(axis=1)
        token_ids, ends, sampler_state = decoder(keras.ops.convert_to_numpy(inputs["token_ids"]), prompt_lengths,
                                                 cfg.max_new_tokens, sampler_state)
        return token_ids, np.arange(token_ids.shape[1])[None, :] < ends[:, None]
    return run


def generate_answers(
    model,
    prompts: Sequence[str],
    cfg: GenerationConfig,
    on_batch: Callable[[int, int], None] | None = None,
) -> GenerationRun:
    """Answer every prompt; the same ``cfg.seed`` gives the same answers."""
    if not prompts:
        return GenerationRun([], 0.0, 0.0)
    tokenizer = model.preprocessor.tokenizer
    lengths = [len(tokenizer(p)) + 1 for p in prompts]  # + start token
    # Prompts sorted by length share batches with their peers: the compact loop prefills every row
    # to the batch's longest prompt, keras-hub's steps from its shortest, so similar lengths waste little.
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    stops = stop_token_ids(model)
    compact = cfg.compact_decode and CompactDecoder.supports(model)
    generate = (_compact_loop if compact else _keras_hub_loop)(model, cfg, stops)

    answers: list[GeneratedAnswer | None] = [None] * len(prompts)
    batches = math.ceil(len(prompts) / cfg.batch_size)
    started = time.perf_counter()
    first_batch_seconds = 0.0
    for b in range(batches):
        members = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        chunk = [prompts[i] for i in members]
        padded = chunk + [chunk[0]] * (cfg.batch_size - len(chunk))
        inputs = model.preprocessor.generate_preprocess(
            padded, sequence_length=total_length(max(lengths[i] for i in members), cfg.max_new_tokens)
        )
        token_ids, out_mask = generate(inputs)
        prompt_mask = keras.ops.convert_to_numpy(inputs["padding_mask"]).astype(bool)
        for row, i in enumerate(members):
            answers[i] = _answer(tokenizer, prompts[i], token_ids[row], out_mask[row], prompt_mask[row], stops, cfg)
        if b == 0:
            first_batch_seconds = time.perf_counter() - started
        if on_batch:
            on_batch(b + 1, batches)
    return GenerationRun(answers, time.perf_counter() - started, first_batch_seconds)


def total_length(prompt_tokens: int, max_new_tokens: int) -> int:
    """Prompt plus answer, rounded up so that batches of similar prompts share one compiled shape."""
    return LENGTH_BUCKET * math.ceil((prompt_tokens + max_new_tokens) / LENGTH_BUCKET)


def _answer(tokenizer, prompt, token_ids, out_mask, prompt_mask, stops, cfg) -> GeneratedAnswer:
    new = token_ids[out_mask & ~prompt_mask][: cfg.max_new_tokens]
    stop_at = np.flatnonzero(np.isin(new, stops))
    ended = bool(len(stop_at))
    ended_by = stop_token_name(tokenizer, new[stop_at[0]]) if ended else None
    if ended:
        new = new[: stop_at[0]]
    text = decode_ids(tokenizer, new) if len(new) else ""
    return GeneratedAnswer(prompt=prompt, text=text.strip(), new_tokens=len(new) + int(ended), ended=ended,
                           ended_by=ended_by)
