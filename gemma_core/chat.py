"""A chat's turns, kept within the model's context: what ``gemma-lora chat`` feeds the model each turn.

The turns are rendered with :func:`gemma_core.prompts.chat_prompt` (the one place that knows
Gemma's turn format). Each new prompt must leave room for an answer of ``answer_tokens`` within
``context_tokens``; when it would not, the oldest exchanges (a user turn and the model's answer)
are dropped, and :meth:`ChatHistory.ask` says how many, so the terminal can tell the user.

>>> history = ChatHistory(lambda text: len(text.split()), context_tokens=12, answer_tokens=4)
>>> history.ask("one two three")
('<start_of_turn>user\\none two three<end_of_turn>\\n<start_of_turn>model\\n', 0)
>>> history.answer("four five")
>>> history.ask("six seven")[1]   # the first exchange no longer fits beside an answer: dropped
2
>>> history.turns
[('user', 'six seven')]
"""

from __future__ import annotations

from typing import Callable

from gemma_core.prompts import chat_prompt


class MessageTooLong(ValueError):
    """One message alone, with room for the answer, exceeds the context; the message says by how much."""


class ChatHistory:
    def __init__(self, count_tokens: Callable[[str], int], context_tokens: int, answer_tokens: int):
        if answer_tokens >= context_tokens:
            raise ValueError(f"an answer of up to {answer_tokens} tokens (generation.max_new_tokens) leaves no room "
                             f"for a prompt in a context of {context_tokens} tokens: lower generation.max_new_tokens "
                             "or raise the context (--context-tokens)")
        self.count_tokens = count_tokens  # tokens the model is fed for a prompt text, start token included
        self.context_tokens = context_tokens
        self.answer_tokens = answer_tokens
        self.turns: list[tuple[str, str]] = []

    @property
    def prompt_budget(self) -> int:
        return self.context_tokens - self.answer_tokens

    def ask(self, message: str) -> tuple[str, int]:
        """Add the user's ``message``; return the prompt to answer and how many old turns were dropped.

        Raises :class:`MessageTooLong` (and keeps the history as it was) when even the message alone
        does not fit.
        """
        alone = self.count_tokens(chat_prompt([("user", message)]))
        if alone > self.prompt_budget:
            raise MessageTooLong(
                f"that message is {alone} tokens as a prompt; with room for an answer of {self.answer_tokens} "
                f"tokens the context of {self.context_tokens} holds prompts of up to {self.prompt_budget}: "
                "shorten it (or lower generation.max_new_tokens, or raise --context-tokens)")
        turns = [*self.turns, ("user", message)]
        dropped = 0
        while self.count_tokens(chat_prompt(turns)) > self.prompt_budget:
            # Drop whole exchanges, so that the turns still alternate user, model, user...
            cut = 2 if len(turns) > 2 and turns[1][0] == "model" else 1
            turns, dropped = turns[cut:], dropped + cut
        self.turns = turns
        return chat_prompt(turns), dropped

    def answer(self, text: str) -> None:
        """Record the model's answer to the last message (what the user saw, also when stopped early)."""
        self.turns.append(("model", text))

    def reset(self) -> None:
        self.turns = []
