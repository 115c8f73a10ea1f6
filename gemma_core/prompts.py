"""The prompt formats shared by training, generation, evaluation and chat.

Two formats (``data.prompt_format``):

* ``instruction``: the Keras Gemma LoRA tutorial's template, plus a ``Context:`` section for rows
  that carry one (the tutorial drops those rows, which loses most closed_qa,
  information_extraction and summarization examples). The response is the bare answer; the model
  learns to stop with ``<eos>`` (gemma_core.encoding appends it).
* ``gemma_chat``: Gemma 3's own turns. The Dolly context goes inside the user turn and the response
  ends with ``<end_of_turn>`` (and no ``<eos>``), so a tuned instruct model keeps ending its chat turns.

Prompt and response stay separate strings so that training can put the loss on the response tokens
only (for ``gemma_chat`` that includes the closing ``<end_of_turn>``).

>>> print(format_prompt("Name a primary colour.", ""), end="")
Instruction:
Name a primary colour.
<BLANKLINE>
Response:
>>> format_prompt("Who wrote it?", "It was written by Ann.").splitlines()[3]
'Context:'
>>> format_prompt("Name a primary colour.", prompt_format="gemma_chat")
'<start_of_turn>user\\nName a primary colour.<end_of_turn>\\n<start_of_turn>model\\n'
>>> format_response("Red.", "gemma_chat")
'Red.<end_of_turn>'
>>> chat_prompt([("user", "Hi"), ("model", "Hello."), ("user", "Bye")]).count(START_OF_TURN)
4
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PROMPT_FORMATS = ("instruction", "gemma_chat")
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
CHAT_ROLES = ("user", "model")

_CITATION = re.compile(r"\s?\[\d+\]")
# An instruction-tuned checkpoint: a keras-hub preset such as gemma3_instruct_1b, or a Hub repo such as
# google/gemma-3-1b-it (the '-it' suffix, possibly followed by a variant such as -it-qat).
_INSTRUCT_SPEC = re.compile(r"instruct|-it(?:$|[-_.])", re.IGNORECASE)


def default_prompt_format(model_spec: str) -> str:
    """What ``data.prompt_format: auto`` means for a model: Gemma's own turns for an instruct model,
    whose chat habits the tuning should keep, the tutorial's template for a base model.

    >>> default_prompt_format("gemma3_instruct_1b"), default_prompt_format("hf://google/gemma-3-270m-it")
    ('gemma_chat', 'gemma_chat')
    >>> default_prompt_format("embedded:gemma3-270m"), default_prompt_format("gemma3_1b")
    ('instruction', 'instruction')
    """
    name = model_spec.rstrip("/").rsplit("/", 1)[-1]
    return "gemma_chat" if _INSTRUCT_SPEC.search(name) else "instruction"


class PromptFormatMismatchError(ValueError):
    """A model was trained in one prompt format and is asked in another."""


def check_same_prompt_format(trained: str | None, wanted: str, what: str) -> None:
    """Refuse to use ``what`` (an adapter, a checkpoint), trained in ``trained``, in the ``wanted`` format.

    ``trained`` None means unknown (nothing recorded it), which is let through.

    >>> check_same_prompt_format("gemma_chat", "instruction", "adapter a.lora.h5")
    Traceback (most recent call last):
    ...
    gemma_core.prompts.PromptFormatMismatchError: adapter a.lora.h5 was trained in the 'gemma_chat' prompt format, but this run uses 'instruction': use --set data.prompt_format=gemma_chat to use it, or train a new adapter in the 'instruction' format
    """
    if trained is not None and trained != wanted:
        raise PromptFormatMismatchError(
            f"{what} was trained in the {trained!r} prompt format, but this run uses {wanted!r}: use "
            f"--set data.prompt_format={trained} to use it, or train a new adapter in the {wanted!r} format")


def check_prompt_format(prompt_format: str) -> str:
    """Return ``prompt_format`` if it is a known format; otherwise fail naming the choices and the fix."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(
            f"unknown prompt format {prompt_format!r}; choose one of {', '.join(PROMPT_FORMATS)} "
            f"(--set data.prompt_format=gemma_chat)"
        )
    return prompt_format


def chat_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """Render earlier ``(role, text)`` turns as Gemma 3 turns, ending where the model's answer starts.

    Roles are ``user`` and ``model``. The single-turn ``gemma_chat`` prompt is this function applied
    to one user turn, so training, evaluation and the chat loop share one rendering.

    >>> chat_prompt([("user", "Hi")])
    '<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
    """
    rendered = []
    for role, text in turns:
        if role not in CHAT_ROLES:
            raise ValueError(f"unknown chat role {role!r}; a turn's role is one of {', '.join(CHAT_ROLES)}")
        rendered.append(f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n")
    return "".join(rendered) + f"{START_OF_TURN}model\n"


def format_prompt(instruction: str, context: str = "", prompt_format: str = "instruction") -> str:
    """Everything the model sees before its answer, ending right where the response starts."""
    if check_prompt_format(prompt_format) == "gemma_chat":
        user_text = f"{instruction}\n\n{context}" if context else instruction
        return chat_prompt([("user", user_text)])
    if context:
        return f"Instruction:\n{instruction}\n\nContext:\n{context}\n\nResponse:\n"
    return f"Instruction:\n{instruction}\n\nResponse:\n"


def format_response(response: str, prompt_format: str) -> str:
    """The training target after the prompt: the answer, closed by ``<end_of_turn>`` in the chat format.

    >>> format_response("Red.", "instruction")
    'Red.'
    """
    if check_prompt_format(prompt_format) == "gemma_chat":
        return f"{response}{END_OF_TURN}"
    return response


def strip_citations(text: str) -> str:
    """Remove Wikipedia citation marks such as ``[42]``, as Dolly's dataset card recommends.

    >>> strip_citations("Paris is the capital [3] of France.[12]")
    'Paris is the capital of France.'
    """
    return _CITATION.sub("", text)
