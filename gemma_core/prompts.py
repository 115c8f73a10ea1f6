"""The instruction template shared by training, generation and evaluation.

It is the Keras Gemma LoRA tutorial's template, plus a ``Context:`` section for rows that carry one
(the tutorial drops those rows, which loses most closed_qa, information_extraction and
summarization examples). Prompt and response stay separate strings so that training can put the
loss on the response tokens only.

>>> print(format_prompt("Name a primary colour.", ""), end="")
Instruction:
Name a primary colour.
<BLANKLINE>
Response:
>>> format_prompt("Who wrote it?", "It was written by Ann.").splitlines()[3]
'Context:'
"""

from __future__ import annotations

import re

_CITATION = re.compile(r"\s?\[\d+\]")


def format_prompt(instruction: str, context: str = "") -> str:
    """Everything the model sees before its answer, ending right where the response starts."""
    if context:
        return f"Instruction:\n{instruction}\n\nContext:\n{context}\n\nResponse:\n"
    return f"Instruction:\n{instruction}\n\nResponse:\n"


def strip_citations(text: str) -> str:
    """Remove Wikipedia citation marks such as ``[42]``, as Dolly's dataset card recommends.

    >>> strip_citations("Paris is the capital [3] of France.[12]")
    'Paris is the capital of France.'
    """
    return _CITATION.sub("", text)
