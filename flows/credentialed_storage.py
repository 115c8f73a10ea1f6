"""A result storage block for an fsspec URL that holds a credential (``s3://KEY:SECRET@bucket/prefix``).

Prefect only takes a remote result storage on a task once it is saved as a block on the server, and a
plain ``RemoteFileSystem`` keeps its URL in ``basepath``, a plain field: the API returns it and the
Blocks page shows it. This block keeps the whole URL in ``url``, a secret field (Prefect stores it
encrypted and the API masks it), and saves only the redacted URL as ``basepath``; a process that
loads the block (a worker reading another run's result) gets the whole URL back into ``basepath``, so
fsspec receives it intact.

Imported by :func:`flows.storage.make_result_storage`, which every flow calls at its start: a
process must have imported the class before Prefect can load a block of its type.
"""

from __future__ import annotations

from typing import Any

from prefect.filesystems import RemoteFileSystem
from pydantic import Field, SecretStr, model_validator

from gemma_core.redact import redact_text

_MASKED = "*" * 8  # how Prefect's API shows a secret field it does not reveal


class CredentialedFileSystem(RemoteFileSystem):
    """``RemoteFileSystem`` whose URL, credential included, is a secret; ``basepath`` shows it redacted."""

    _block_type_name = "Gemma LoRA Credentialed File System"

    url: SecretStr = Field(description="the storage URL, credential included (kept secret)")

    @model_validator(mode="before")
    @classmethod
    def _basepath_is_the_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("url") is not None:
            url = data["url"]
            url = url.get_secret_value() if isinstance(url, SecretStr) else str(url)
            if _MASKED not in url:  # a document read without its secrets keeps the redacted basepath
                data = {**data, "basepath": url}
        return data

    def _to_block_document(self, *args: Any, **kwargs: Any):
        document = super()._to_block_document(*args, **kwargs)
        document.data["basepath"] = redact_text(self.basepath)
        return document
