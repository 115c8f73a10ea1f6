"""Read Dolly-shaped records from the offline sample, the Hugging Face Hub or a local file.

Every failure caused by the input becomes a :class:`DataSourceError` that names the file (and the
line, where one applies) and the fix; no raw parser traceback reaches the user.
"""

from __future__ import annotations

import io
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from gemma_core.manifest import sha256_bytes
from gemma_core.config import DOLLY_HUB_SOURCE, SAMPLE_SOURCE

DOLLY_COLUMNS = ("instruction", "context", "response", "category")
SAMPLE_PATH = Path(__file__).parent / "sample_data" / "dolly_sample.jsonl"
DOLLY_LICENSE = "CC BY-SA 3.0 (databricks-dolly-15k)"
SAMPLE_LICENSE = "offline sample written for gemma-lora-flow (not Dolly-15k); Apache-2.0"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataSourceError(ValueError):
    """The data source cannot be read as Dolly-shaped records."""


@dataclass(frozen=True)
class DollySource:
    """Raw records (one object column per Dolly field) and where they came from."""

    frame: pd.DataFrame
    source: str
    sha256: str
    is_sample: bool
    license: str


def read_dolly_source(source: str) -> DollySource:
    """Dispatch on the source form: ``sample``, ``hf://org/name`` or a local file path."""
    if source == SAMPLE_SOURCE:
        data = SAMPLE_PATH.read_bytes()
        frame = _parse(data, SAMPLE_PATH)
        return DollySource(frame, SAMPLE_SOURCE, sha256_bytes(data), True, SAMPLE_LICENSE)
    if source.startswith("hf://"):
        path = _download_from_hub(source)
        data = path.read_bytes()
        license_ = DOLLY_LICENSE if source == DOLLY_HUB_SOURCE else "see the dataset card on the Hub"
        return DollySource(_parse(data, path), source, sha256_bytes(data), False, license_)
    path = Path(source).expanduser()
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataSourceError(
            f"data source {source!r} is not understood: use '{SAMPLE_SOURCE}', "
            f"'{DOLLY_HUB_SOURCE}' (or another hf://org/name), or a local file ending in "
            + ", ".join(LOCAL_SUFFIXES)
        )
    if not path.is_file():
        raise DataSourceError(f"data file {path} does not exist (data.source={source!r})")
    data = path.read_bytes()
    license_ = "as provided by the user (Dolly-15k itself is CC BY-SA 3.0)"
    return DollySource(_parse(data, path), str(path), sha256_bytes(data), False, license_)


def _parse(data: bytes, path: Path) -> pd.DataFrame:
    if not data.strip():
        raise DataSourceError(f"data file {path} is empty: expected Dolly records ({', '.join(DOLLY_COLUMNS)})")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame = _parse_parquet(data, path)
    else:
        text = _decode_utf8(data, path)
        if suffix == ".csv":
            frame = _parse_csv(text, path)
        elif suffix == ".json" and text.lstrip().startswith("["):
            frame = _parse_json_array(text, path)
        else:
            frame = _parse_jsonl(text, path)
    missing = [c for c in DOLLY_COLUMNS if c not in frame.columns]
    if missing:
        found = frame.attrs.get("found_columns", list(frame.columns))
        raise DataSourceError(
            f"data file {path} is not Dolly-shaped: missing column(s) {', '.join(missing)}; "
            f"found {', '.join(map(str, found)) or 'none'}; "
            f"expected {', '.join(DOLLY_COLUMNS)}"
        )
    if frame.empty:
        raise DataSourceError(f"data file {path} has no records")
    return frame[list(DOLLY_COLUMNS)].astype(object)


def _decode_utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a BOM, as Windows editors write it
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataSourceError(
            f"data file {path}, line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset "
            f"{err.start}); re-save the file as UTF-8"
        ) from None


def _parse_jsonl(text: str, path: Path) -> pd.DataFrame:
    records, found = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"data file {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataSourceError(f"{where}: broken JSON line ({err.msg})") from None
        except RecursionError:
            raise DataSourceError(f"{where}: JSON nested too deeply to be a Dolly record") from None
        if not isinstance(record, dict):
            raise DataSourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append(_dolly_fields(record, where, found))
    return _frame(records, found)


def _parse_json_array(text: str, path: Path) -> pd.DataFrame:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataSourceError(f"data file {path}, line {err.lineno}: broken JSON ({err.msg})") from None
    except RecursionError:
        raise DataSourceError(f"data file {path}: JSON nested too deeply to hold Dolly records") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataSourceError(f"data file {path}: item {bad} of the JSON array is not an object")
    found: dict[str, None] = {}
    return _frame([_dolly_fields(r, f"data file {path}, item {i}", found) for i, r in enumerate(records)], found)


def _dolly_fields(record: dict, where: str, found: dict[str, None]) -> dict:
    """The Dolly fields of one record. Other keys are ignored (only remembered, for the error that
    lists the columns found): a frame of every unknown key would grow with rows x distinct keys."""
    picked = {key: record[key] for key in DOLLY_COLUMNS if key in record}
    found.update(dict.fromkeys(picked))
    if len(found) < 50:
        found.update(dict.fromkeys(record))
    for key, value in picked.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise DataSourceError(
                    f"{where}: field {key!r} holds an unpaired surrogate escape "
                    f"({value[err.start:err.end].encode('unicode_escape').decode()}): not valid Unicode text; "
                    "fix or remove that record"
                ) from None
    return picked


def _frame(records: list[dict], found: dict[str, None]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=[c for c in DOLLY_COLUMNS if c in found])
    frame.attrs["found_columns"] = list(found)
    return frame


def _parse_csv(text: str, path: Path) -> pd.DataFrame:
    try:
        # dtype=str and no NA parsing: an empty cell stays "", so it is dropped as empty, not as NaN.
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataSourceError(f"data file {path}: not a readable CSV ({str(err).strip()})") from None


def _parse_parquet(data: bytes, path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
        table.validate(full=True)  # e.g. a string column holding bytes that are not UTF-8
        # Converting can fail too (out-of-range timestamps).
        return table.to_pandas(types_mapper=None)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataSourceError(f"data file {path}: not a readable Parquet file ({err})") from None


def _download_from_hub(source: str) -> Path:
    """Fetch a dataset's JSONL/Parquet file from the Hub, failing fast when it cannot be reached."""
    repo_id = source.removeprefix("hf://").strip("/")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    alternatives = (
        f"use data.source={SAMPLE_SOURCE} (the offline sample) or a local Dolly file "
        "(data.source=/path/to/databricks-dolly-15k.jsonl)"
    )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataSourceError(f"cannot fetch {source}: HF_HUB_OFFLINE=1 is set; {alternatives}")
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as err:
        raise DataSourceError(f"cannot reach the Hugging Face Hub ({host}) to fetch {source}: {err}; {alternatives}") from None

    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        files = HfApi().list_repo_files(repo_id, repo_type="dataset")
        data_files = sorted(f for f in files if f.lower().endswith((".jsonl", ".parquet", ".csv")))
        if not data_files:
            raise DataSourceError(f"dataset {source} has no .jsonl, .parquet or .csv file; {alternatives}")
        return Path(hf_hub_download(repo_id, data_files[0], repo_type="dataset"))
    except HfHubHTTPError as err:
        raise DataSourceError(f"cannot fetch {source} from the Hugging Face Hub: {err}; {alternatives}") from None
