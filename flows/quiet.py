"""A quiet terminal: the CLI shows its own lines and Prefect's, not the start-up logging of the native
libraries under Keras (TensorFlow, XLA, absl, gRPC, SentencePiece), unless ``--verbose`` or
``GEMMA_LORA_VERBOSE=1`` asks for it.

Two layers, because much of that logging is written by C++ straight to file descriptor 2, some of
it before Python's logging exists and some regardless of any setting:

1. :data:`QUIET_ENV`, set before anything imports those libraries (flows/env.py applies it): the
   levels that builds reading them honour (``TF_CPP_MIN_LOG_LEVEL``, ``GRPC_VERBOSITY``,
   ``GLOG_minloglevel``). TensorFlow 2.21's absl logging ("oneDNN custom operations are on",
   "Could not find cuda drivers") does not read them.
2. :func:`filter_stderr`: fd 2 becomes a pipe read by a thread that drops the lines of
   :data:`NOISE` and passes every other byte on to the terminal, so Python's own stderr (Prefect's
   log lines, tracebacks) and the child processes', which inherit fd 2, still show. Info and warning
   lines in the C++ loggers' format are dropped; of their errors only the known start-up ones (no
   CUDA driver on a CPU machine), so a real native error still shows.

    >>> is_noise("I0000 00:00:1796169443.267 20783 cudart_stub.cc:31] Could not find cuda drivers on your machine")
    True
    >>> is_noise("normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.")
    True
    >>> is_noise("E0000 00:00:1796169443.1 20783 some_op.cc:12] a real error")
    False
    >>> is_noise("12:00:01.123 | INFO    | prefect.engine - Finished in state Completed()")
    False
"""

from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading

VERBOSE_ENV = "GEMMA_LORA_VERBOSE"

QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow's own C++ logging: errors only
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "2",
}

# The C++ loggers' line format: severity letter, MMDD, time, thread id, file:line] message.
_NATIVE = r"[IWEF]\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\]"
NOISE = re.compile("|".join([
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    rf"^[IW]\d{{4}} [\d:.]+\s+\d+ [\w./-]+:\d+\]",  # info and warnings of TensorFlow, XLA, absl, gRPC
    rf"^{_NATIVE} .*(cuInit|cuda|CUDA|cuDNN|cuFFT|cuBLAS|Unable to register|TPU)",  # no GPU here: not an error
    r"^\S+\.cc\(\d+\) LOG\((INFO|WARNING)\) ",  # SentencePiece ("precompiled_charsmap is empty")
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags",
    r"^WARNING: Logging before InitGoogleLogging\(\) is written to STDERR",
]))


def verbose(environ=os.environ) -> bool:
    return environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def is_noise(line: str) -> bool:
    return NOISE.search(line) is not None


class _StderrFilter:
    """fd 2 -> pipe -> this thread -> the original fd 2, less the noise lines."""

    def __init__(self):
        self.terminal = os.dup(2)
        read, write = os.pipe()
        sys.stderr.flush()
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, name="gemma-lora-stderr-filter", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def _pump(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self.read], [], [], 0.2)
            if not ready:
                if pending:  # a partial line (a prompt, a progress bar) waits no longer than this
                    self._write(pending)
                    pending = b""
                continue
            chunk = os.read(self.read, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            kept = [line for line in lines if not is_noise(line.decode("utf-8", "replace"))]
            if kept:
                self._write(b"\n".join(kept) + b"\n")
        if pending and not is_noise(pending.decode("utf-8", "replace")):
            self._write(pending)

    def _write(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.terminal, data):]

    def close(self) -> None:
        """Give fd 2 back to the terminal and pass on what is still in the pipe."""
        try:
            sys.stderr.flush()
        except (ValueError, OSError):
            pass
        os.dup2(self.terminal, 2)  # our end of the pipe closes; children still holding it keep it open
        self.thread.join(timeout=2)


_installed: _StderrFilter | None = None


def filter_stderr() -> None:
    """Drop the native libraries' start-up lines from fd 2, for this process and its children, and
    lower their log levels (unless verbose). Call it before importing Keras, TensorFlow or JAX."""
    global _installed
    if _installed is None and not verbose():
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        _installed = _StderrFilter()
