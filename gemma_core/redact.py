"""Credentials inside URLs never reach what the project writes: files, logs, artifacts, printed lines.

A URL such as ``s3://KEY:SECRET@bucket/prefix`` or ``https://user:TOKEN@host/path`` carries its
credential in the userinfo part; a signed or token URL carries it in the query string
(``?token=...``, ``X-Amz-Signature=...``). :func:`redact_text` replaces those parts with ``***``
and keeps the rest, so a redacted value still says where things went. The value itself is never
changed where it is used: redaction applies to copies on their way to a file, a log record or a
terminal.

>>> redact_text("results in s3://AKIAEXAMPLE:wJalrXUtnFEMI@my-bucket/gemma")
'results in s3://AKIAEXAMPLE:***@my-bucket/gemma'
>>> redact_text("https://ghp_abc123@github.com/org/repo.git")
'https://***@github.com/org/repo.git'
>>> redact_text("https://host/file.jsonl?token=abc&page=2")
'https://host/file.jsonl?token=***&page=2'
>>> redact({"data": {"source": "https://u:p@host/d.jsonl"}, "steps": [1, "s3://k:s@b"]})
{'data': {'source': 'https://u:***@host/d.jsonl'}, 'steps': [1, 's3://k:***@b']}
>>> has_credentials("s3://bucket/prefix"), has_credentials("s3://k:s@bucket")
(False, True)
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePath
from typing import Any, TextIO

MASK = "***"

# scheme://userinfo@ : userinfo is anything up to the first '@' that holds no '/', space or quote (RFC 3986
# allows no unescaped '/' or '@' there). Username kept when a password follows it, else the whole userinfo
# is the secret (a token passed as the username, as GitHub and many object stores take it).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^\s/@'\"<>`]+)@")
# Query parameters that carry a credential in signed, token or presigned URLs (case-insensitive names).
_QUERY_SECRET = re.compile(
    r"(?P<lead>[?&](?:access_token|api_key|apikey|auth|key|password|passwd|secret|sig|signature|token"
    r"|x-amz-credential|x-amz-security-token|x-amz-signature|x-goog-credential|x-goog-signature)=)"
    r"(?P<value>[^&#\s'\"<>`]+)",
    re.IGNORECASE,
)


# Every credential this process has found in a URL. Libraries pass the value on in other shapes, e.g.
# fsspec logs a memory:// or s3:// path without its scheme ("open file /KEY:SECRET@bucket/..."), so a
# credential once seen is hidden wherever it appears later. Short ones are not: hiding every "s" of a
# line because a test used "s3://k:s@b" would wreck the text and protect nothing.
_SEEN_SECRETS: set[str] = set()
_REMEMBERED_FROM = 8  # characters


def _remember(secret: str) -> None:
    if len(secret) >= _REMEMBERED_FROM and secret != MASK:
        _SEEN_SECRETS.add(secret)


def _userinfo(match: re.Match) -> str:
    user, colon, password = match["userinfo"].partition(":")
    _remember(password if colon and user else match["userinfo"])
    kept = f"{user}:{MASK}" if colon and user else MASK
    return f"{match['scheme']}{kept}@"


def _query_secret(match: re.Match) -> str:
    _remember(match["value"])
    return match["lead"] + MASK


def redact_text(text: str) -> str:
    """``text`` with every credential inside a URL replaced by ``***`` (see the module's examples), and
    every credential seen so far in a URL wherever else it appears.

    >>> _ = redact_text("s3://KEY:long-secret-value@bucket")
    >>> redact_text("DEBUG open file /KEY:long-secret-value@bucket/x")
    'DEBUG open file /KEY:***@bucket/x'
    """
    if "@" in text or "=" in text:  # else the common case, a log line without URLs: no regex work
        text = _USERINFO.sub(_userinfo, text)
        if "=" in text:
            text = _QUERY_SECRET.sub(_query_secret, text)
    for secret in tuple(_SEEN_SECRETS):  # a snapshot: another thread may add one meanwhile
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def has_credentials(text: str) -> bool:
    """Whether ``text`` holds a credential inside a URL (what :func:`redact_text` would hide)."""
    return redact_text(text) != text


def redact(value: Any) -> Any:
    """A copy of ``value`` with every string redacted, through dicts (keys too), lists, tuples, sets and
    pydantic models (as their JSON dump); paths stay paths. Other values are returned as they are.

    >>> from pathlib import Path
    >>> redact((Path("runs"), "memory://k:s@b", 3.5))
    (PosixPath('runs'), 'memory://k:***@b', 3.5)
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, PurePath):
        text = str(value)
        cleaned = redact_text(text)
        return value if cleaned == text else type(value)(cleaned)
    dump = getattr(value, "model_dump", None)  # a pydantic model: its JSON form, as it would be written
    if callable(dump) and hasattr(type(value), "model_fields"):
        return redact(dump(mode="json"))
    return value


# --- logs and printed lines --------------------------------------------------------------------------------

_installed_factory = None


def install_log_redaction() -> None:
    """Redact every log record of this process as it is created, whatever logger or handler it goes to
    (Prefect's API handler, its console, pytest's capture). A record factory rather than a filter:
    filters sit on one logger or handler, and a handler added later (Prefect configures its own on
    import) would miss them. The message is formatted once, here, and so are exception texts.

    >>> install_log_redaction(); install_log_redaction()  # idempotent
    >>> logging.getLogRecordFactory()("x", logging.INFO, __file__, 1, "to %s", ("s3://k:s@b",), None).getMessage()
    'to s3://k:***@b'
    """
    global _installed_factory
    current = logging.getLogRecordFactory()
    if current is _installed_factory:
        return

    def redacting_factory(*args, **kwargs) -> logging.LogRecord:
        record = current(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error report
            return record
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    _installed_factory = redacting_factory
    logging.setLogRecordFactory(redacting_factory)


class RedactingStream:
    """A text stream that redacts what is written to it before passing it on (``print`` writes each
    line in one call, so a URL is never split between two writes).

    >>> import io
    >>> out = io.StringIO(); print("stored in s3://k:s@b/p", file=RedactingStream(out)); out.getvalue()
    'stored in s3://k:***@b/p\\n'
    """

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding...: the wrapped stream's
        return getattr(self._stream, name)
