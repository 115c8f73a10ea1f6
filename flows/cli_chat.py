"""``gemma-lora chat``: talk to the model in the terminal, each token shown as it is produced.

The conversation is kept as Gemma's turns (:class:`gemma_core.chat.ChatHistory`, rendered by
``gemma_core.prompts.chat_prompt``) within ``--context-tokens`` (default: the model's preprocessor
sequence length, 1024 for the embedded 270M model); the oldest exchanges are dropped, with a note,
when a new prompt and its answer would not fit. Answers stream from
:class:`gemma_core.streaming.StreamingDecoder` (JAX) with the config's sampler and stop at
``<end_of_turn>``, ``<eos>`` or ``generation.max_new_tokens``.

At the ``you>`` prompt: ``/reset`` forgets the conversation, ``/exit`` (or Ctrl-D, or Ctrl-C) leaves.
Ctrl-C while an answer streams stops that answer (what was shown stays in the conversation) and
asks again. Plain, not a Prefect flow, for the reasons ``flows/cli_generate.py`` gives.
"""

from __future__ import annotations

import argparse
import sys

from gemma_core.config import PipelineConfig

PROMPT = "you> "
ANSWER = "model> "
STOPPED = " [stopped]"
HELP = "/reset forgets the conversation, /exit or Ctrl-D leaves; Ctrl-C stops an answer"


def add_chat_parser(commands, config_options) -> None:
    from flows.model_choice import MODEL_HELP

    chat = commands.add_parser("chat", help="talk to the model in the terminal (streamed answers, Gemma turns)",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_options(chat)
    chat.add_argument("--model", help=MODEL_HELP)
    chat.add_argument("--name", help="registry name for champion (default: promotion.registry)")
    chat.add_argument("--context-tokens", type=int, metavar="N",
                      help="tokens of conversation plus answer kept (default: the model's sequence length)")


def chat_command(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from flows.cli_champion import CommandError
    from flows.cli_generate import USAGE_ERROR
    from flows.model_choice import choose_model, given_fields, load_choice
    from gemma_core.chat import ChatHistory
    from gemma_core.generation import make_sampler, stop_token_ids
    from gemma_core.registry import RegistryError
    from gemma_core.streaming import StreamingDecoder, prompt_ids

    try:
        if args.context_tokens is not None and args.context_tokens < 2:
            raise ValueError(f"--context-tokens {args.context_tokens}: give at least a few hundred tokens")
        choice = choose_model(cfg, args.model, args.name, given_fields(args.config, args.overrides))
        if choice.note:
            print(f"gemma-lora: {choice.note}", file=sys.stderr)
        print(f"gemma-lora: loading {choice.what}", file=sys.stderr)
        model = load_choice(choice)
        context = args.context_tokens or int(model.preprocessor.sequence_length)
        tokenizer = model.preprocessor.tokenizer
        history = ChatHistory(lambda text: len(prompt_ids(tokenizer, text)), context, cfg.generation.max_new_tokens)
        stops = stop_token_ids(model)
        decoder = StreamingDecoder(model, make_sampler(cfg.generation), stops, cache_length=context)
    except (ValueError, CommandError, RegistryError) as err:  # bad input (see generate_command), or no JAX
        print(f"gemma-lora: {err}", file=sys.stderr)
        return USAGE_ERROR
    if choice.prompt_format != "gemma_chat":
        print(f"gemma-lora: note: {choice.what} was tuned on the {choice.prompt_format!r} template; chat speaks "
              "Gemma's turn format", file=sys.stderr)
    print(f"chatting with {choice.what} ({context} tokens of context). {HELP}", flush=True)
    return chat_loop(history, decoder, tokenizer, stops, cfg.generation.max_new_tokens)


def chat_loop(history, decoder, tokenizer, stops, max_new_tokens: int) -> int:
    from gemma_core.chat import MessageTooLong
    from gemma_core.streaming import TextStream, prompt_ids

    while True:
        try:
            message = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
            print()
            return 0
        if not message:
            continue
        if message == "/exit":
            return 0
        if message == "/reset":
            history.reset()
            print("(conversation cleared)")
            continue
        if message.startswith("/"):
            print(f"(unknown command {message.split()[0]!r}: {HELP})")
            continue
        try:
            prompt, dropped = history.ask(message)
        except MessageTooLong as err:
            print(f"({err})")
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest turns to stay within {history.context_tokens} tokens)")
        text = TextStream(tokenizer, stops)
        sys.stdout.write(ANSWER)
        sys.stdout.flush()
        try:
            for token in decoder.stream(prompt_ids(tokenizer, prompt), max_new_tokens):
                sys.stdout.write(text.push(token))
                sys.stdout.flush()
            print()
        except KeyboardInterrupt:  # Ctrl-C while streaming: stop this answer, keep the conversation
            print(STOPPED, flush=True)
        history.answer(text.text.strip())
