"""The champion registry: which adapter a pipeline currently uses, how it got there, and every change.

One champion per pipeline name, stored under ``<output.root>/registry/<name>/`` so that every worker
sharing ``output.root`` sees the same one::

    registry/default/
      champion.json              the pointer: {"sequence": 3, "record": "history/000003.json", ...}
      history/000001.json        one immutable record per promotion, rollback included
      history/000003.json
      adapters/<sha256>.lora.h5  the registry's own copy of every promoted adapter
      .lock                      held while a promotion or rollback writes

Every JSON file is ``{"sha256": <sha256 of the canonical JSON of body>, "body": {...}}``, written
atomically; a file whose checksum, JSON or shape is wrong, a history record that is missing, or an
adapter copy whose sha256 differs from its record raises :class:`RegistryError` naming the path,
what is wrong and the fix. The champion never silently becomes "none".

- Before any promotion there is no ``champion.json`` (or one that names no record, left by a first
  promotion that was interrupted): the champion is the base model and :meth:`Registry.champion`
  returns None, :meth:`Registry.token` returns "".
- A promotion writes its history record first, then points ``champion.json`` at it (the commit
  point). A crash between the two leaves an unreferenced record after the champion's, which the
  next promotion overwrites (it was never published); records 1..champion are the history.
- The champion is always the newest record: a rollback writes a NEW record (``promoted_by``
  "rollback") with the content of the one it returns to. Rolling back the first promotion returns
  to the base model, recorded as a record whose ``adapter`` is None: :meth:`Registry.champion`
  returns that record (``is_base_model`` is True), not None, so its lineage stays visible.
- Promotions are compare-and-swap: :meth:`Registry.token` (the sha256 recorded in
  ``champion.json``) is read before deciding, and :meth:`Registry.promote` refuses with
  :class:`ChampionChanged` when another process promoted in the meantime (checked under a file
  lock, so two promotions at once cannot both win).

Nothing here imports Prefect or Keras.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, ValidationError

from gemma_core.atomic import atomic_path, atomic_write_text, remove_leftovers
from gemma_core.manifest import sha256_bytes, sha256_file
from gemma_core.redact import redact

REGISTRY_DIRNAME = "registry"  # under output.root
CHAMPION_FILE = "champion.json"
HISTORY_DIRNAME = "history"
ADAPTERS_DIRNAME = "adapters"
LOCK_FILE = ".lock"
LOCK_TIMEOUT_S = 120.0
DEFAULT_NAME = "default"

# Also a valid Prefect Variable name once prefixed (``gemma-lora-champion-<name>``): Prefect allows
# lowercase letters, digits, dashes and underscores only, so "Prod" and "prod" cannot collide there.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}")
_PROMOTED_BY = re.compile(r"(gate|user|rollback|approval(:.*)?)", re.DOTALL)

FIX_RESTORE = "restore it from backup"


class RegistryError(Exception):
    """A registry file is damaged or an operation cannot proceed; the message names the path, what is
    wrong and the fix."""


class ChampionChanged(RegistryError):
    """Another process promoted (or rolled back) since the caller read the token it decided against."""

    def __init__(self, message: str, expected: str, actual: str, current: "Champion | None"):
        super().__init__(message)
        self.expected, self.actual, self.current = expected, actual, current


class NothingToRollBack(RegistryError):
    """The champion is already the base model."""


class Champion(BaseModel):
    """One history record: the champion it made, and why. ``adapter`` is the absolute path of the
    registry's own copy (None: the base model); on disk it is stored relative to the registry."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    sequence: int  # 1, 2, ... in history order
    run_id: str | None = None  # flow run id of the pipeline run that promoted it
    adapter: str | None = None
    adapter_sha256: str | None = None
    lora: dict[str, Any] | None = None  # rank and target_layer_names: how to load the adapter
    model_spec: str
    model_hash: str
    data_hash: str | None = None
    config: dict[str, Any] = {}
    metrics: dict[str, Any] = {}  # overall metrics at promotion
    report: str | None = None  # report.html of the promoting run
    promoted_by: str  # "gate", "approval:<comment>", "user" or "rollback"
    promoted_at: str  # ISO-8601, UTC
    reason: str
    rollback_to: int = 0  # the record `rollback` returns to (0: the base model)

    @property
    def is_base_model(self) -> bool:
        return self.adapter is None


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"registry name {name!r}: use 1-100 lowercase letters, digits, '-' or '_', starting with a "
            "letter or digit (it also names the Prefect Variable gemma-lora-champion-<name>)"
        )
    return name


def canonical_json(body: Any) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _token_of(pointer: tuple[str, dict[str, Any]] | None) -> str:
    """The CAS token of a champion pointer: its sha256, "" while nothing is promoted."""
    return "" if pointer is None or not pointer[1]["sequence"] else pointer[0]


def _write_checked(path: Path, body: dict[str, Any]) -> str:
    """Write ``{"sha256", "body"}`` atomically, credentials in URLs redacted (a record's config holds
    every config value); returns the sha256 of what was written."""
    body = redact(body)
    digest = sha256_bytes(canonical_json(body).encode("utf-8"))
    atomic_write_text(path, json.dumps({"sha256": digest, "body": body}, indent=1, sort_keys=True) + "\n")
    return digest


class Registry:
    """The champion of pipeline ``name`` under ``<root>/registry/<name>/`` (``root`` is output.root)."""

    def __init__(self, root: str | os.PathLike, name: str = DEFAULT_NAME):
        self.name = validate_name(name)
        self.dir = Path(root) / REGISTRY_DIRNAME / name
        self.champion_path = self.dir / CHAMPION_FILE
        self.history_dir = self.dir / HISTORY_DIRNAME
        self.adapters_dir = self.dir / ADAPTERS_DIRNAME

    def __repr__(self) -> str:
        return f"Registry({str(self.dir)!r})"

    def record_path(self, sequence: int) -> Path:
        return self.history_dir / f"{sequence:06d}.json"

    # --- reading ---------------------------------------------------------------------------------

    def champion(self) -> Champion | None:
        """The current champion (its adapter copy verified), or None before any promotion."""
        record = self._current_record(self._pointer())
        if record is not None:
            self._verify_adapter(record)
        return record

    def token(self) -> str:
        """The compare-and-swap token: the sha256 recorded in champion.json ("" before any promotion)."""
        return _token_of(self._pointer())

    def history(self) -> list[Champion]:
        """Records 1..champion, oldest first (each record verified; adapter copies are not)."""
        pointer = self._pointer()
        last = pointer[1]["sequence"] if pointer else 0
        current = self._current_record(pointer)
        return [self._read_record(seq) for seq in range(1, last)] + ([current] if current else [])

    def record(self, sequence: int) -> Champion:
        """History record ``sequence`` (1..champion), its adapter copy verified."""
        pointer = self._pointer()
        last = pointer[1]["sequence"] if pointer else 0
        if not 1 <= sequence <= last:
            held = f"records 1..{last}" if last else "no records yet"
            raise RegistryError(f"{self.dir}: no history record {sequence} (the history holds {held})")
        record = self._current_record(pointer) if sequence == last else self._read_record(sequence)
        self._verify_adapter(record)
        return record

    def _pointer(self) -> tuple[str, dict[str, Any]] | None:
        """(sha256, body) of champion.json; None when there is none and nothing was ever recorded."""
        path = self.champion_path
        if not path.exists():
            if any(self.history_dir.glob("*.json")):
                raise RegistryError(
                    f"{path}: missing, but {self.history_dir} holds history records: {FIX_RESTORE}, or run "
                    f"`gemma-lora champion --repair --name {self.name}` to point it at the newest intact record"
                )
            return None
        digest, body = self._read_checked(path, fix=self._champion_fix())
        sequence = body.get("sequence")
        record = body.get("record")
        ok = isinstance(sequence, int) and sequence >= 0 and (
            (sequence == 0 and record is None)
            or (sequence > 0 and record == f"{HISTORY_DIRNAME}/{sequence:06d}.json"
                and isinstance(body.get("record_sha256"), str))
        )
        if not ok or body.get("name") != self.name:
            raise RegistryError(f"{path}: not a champion pointer of registry {self.name!r} "
                                f"({canonical_json(body)[:120]}): {self._champion_fix()}")
        return digest, body

    def _champion_fix(self) -> str:
        return (f"{FIX_RESTORE}, or run `gemma-lora champion --repair --name {self.name}` to point it at "
                "the newest intact history record")

    def _current_record(self, pointer: tuple[str, dict[str, Any]] | None) -> Champion | None:
        if pointer is None or pointer[1]["sequence"] == 0:
            return None
        body = pointer[1]
        path = self.record_path(body["sequence"])
        fix = (f"{FIX_RESTORE}, or re-promote an intact record (`gemma-lora promote <N> --name {self.name}`) "
               "or a run (`gemma-lora promote latest`)")
        record, digest = self._read_record_checked(body["sequence"], fix)
        if digest != body["record_sha256"]:
            raise RegistryError(f"{path}: its sha256 {digest[:16]}... is not the {body['record_sha256'][:16]}... "
                                f"that {self.champion_path.name} recorded (replaced after promotion): {fix}")
        return record

    def _read_record(self, sequence: int) -> Champion:
        return self._read_record_checked(sequence, f"{FIX_RESTORE} (the champion's history depends on it)")[0]

    def _read_record_checked(self, sequence: int, fix: str) -> tuple[Champion, str]:
        path = self.record_path(sequence)
        if not path.exists():
            raise RegistryError(f"{path}: history record {sequence} is missing: {fix}")
        digest, body = self._read_checked(path, fix)
        adapter = body.get("adapter")
        try:
            if adapter is not None:
                if not isinstance(adapter, str) or Path(adapter).is_absolute() or ".." in Path(adapter).parts:
                    raise ValueError(f"adapter {adapter!r} is not a path inside the registry")
                body = {**body, "adapter": str((self.dir / adapter).resolve())}
            record = Champion.model_validate(body)
        except (ValidationError, ValueError) as err:
            summary = " ".join(str(err).split())[:200]
            raise RegistryError(f"{path}: not a champion record ({summary}): {fix}") from None
        if record.sequence != sequence or record.name != self.name:
            raise RegistryError(f"{path}: holds record {record.sequence} of registry {record.name!r}, "
                                f"not record {sequence} of {self.name!r}: {fix}")
        return record, digest

    @staticmethod
    def _read_checked(path: Path, fix: str) -> tuple[str, dict[str, Any]]:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise RegistryError(f"{path}: unreadable ({err.strerror or err}): {fix}") from None
        except ValueError as err:
            raise RegistryError(f"{path}: not valid JSON ({err}): {fix}") from None
        if not (isinstance(loaded, dict) and isinstance(loaded.get("sha256"), str)
                and isinstance(loaded.get("body"), dict)):
            raise RegistryError(f'{path}: not a checksummed registry file ({{"sha256", "body"}}): {fix}')
        actual = sha256_bytes(canonical_json(loaded["body"]).encode("utf-8"))
        if actual != loaded["sha256"]:
            raise RegistryError(f"{path}: damaged: the sha256 of its body is {actual[:16]}..., the file "
                                f"records {loaded['sha256'][:16]}...: {fix}")
        return loaded["sha256"], loaded["body"]

    def _verify_adapter(self, record: Champion) -> None:
        if record.adapter is None:
            return
        path = Path(record.adapter)
        fix = (f"{FIX_RESTORE}, or run `gemma-lora rollback --name {self.name}` (to the previous champion) "
               "or `gemma-lora promote latest`")
        if not path.is_file():
            raise RegistryError(f"{path}: the adapter copy of champion record {record.sequence} is missing: {fix}")
        actual = sha256_file(path)
        if actual != record.adapter_sha256:
            raise RegistryError(f"{path}: the adapter copy of champion record {record.sequence} is damaged "
                                f"(sha256 {actual[:16]}..., recorded {str(record.adapter_sha256)[:16]}...): {fix}")

    # --- writing ---------------------------------------------------------------------------------

    def _locked(self) -> FileLock:
        """The registry's lock, acquired (release it in a ``finally``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.dir / LOCK_FILE, timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except Timeout:
            raise RegistryError(f"{lock.lock_file}: another process has held the registry lock for over "
                                f"{LOCK_TIMEOUT_S:.0f} s; wait for its promotion to finish and retry") from None
        # Every write into the registry happens under this lock: a temporary file here is a killed writer's.
        remove_leftovers(self.dir, any_writer=True)
        return lock

    def promote(
        self,
        expected_token: str,
        *,
        adapter: str | os.PathLike | None,
        model_spec: str,
        model_hash: str,
        promoted_by: str,
        reason: str,
        adapter_sha256: str | None = None,
        lora: dict[str, Any] | None = None,
        data_hash: str | None = None,
        run_id: str | None = None,
        config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        report: str | os.PathLike | None = None,
    ) -> Champion:
        """Make this adapter the champion, if the champion is still the one ``expected_token`` names.

        ``adapter`` is the trained adapter file, copied into the registry (its sha256 checked against
        ``adapter_sha256`` when given); None promotes the base model. Raises :class:`ChampionChanged`
        when the token moved: nothing is written then.
        """
        if not _PROMOTED_BY.fullmatch(promoted_by or ""):
            raise ValueError(f"promoted_by={promoted_by!r}: one of 'gate', 'approval:<comment>', 'user', 'rollback'")
        if adapter is None and (adapter_sha256 or lora):
            raise ValueError("adapter_sha256/lora given without an adapter (None promotes the base model)")
        if adapter is not None and not lora:
            raise ValueError(f"promoting {adapter} needs its lora config (rank, target_layer_names) to load it")
        fields = dict(adapter=adapter, adapter_sha256=adapter_sha256, lora=lora, model_spec=model_spec,
                      model_hash=model_hash, data_hash=data_hash, run_id=run_id, config=config, metrics=metrics,
                      report=report, promoted_by=promoted_by, reason=reason)
        lock = self._locked()
        try:
            pointer = self._check_token(expected_token, "promoted")
            return self._write_record(pointer, fields, rollback_to=pointer[1]["sequence"] if pointer else 0)
        finally:
            lock.release()

    def rollback(self, by: str = "user", expected_token: str | None = None) -> Champion:
        """Make the champion before the current one the champion again, as a new history record
        (``promoted_by`` "rollback"). Rolling back the first promotion returns to the base model: the
        returned record then has ``adapter`` None. Raises :class:`NothingToRollBack` when the
        champion is the base model already, :class:`ChampionChanged` when ``expected_token`` is given
        and moved."""
        lock = self._locked()
        try:
            pointer = self._pointer()
            if expected_token is not None:
                pointer = self._check_token(expected_token, "rolled back")
            current = self._current_record(pointer)  # not its adapter copy: that may be the damage escaped
            if current is None or (current.is_base_model and current.rollback_to == 0):
                raise NothingToRollBack(f"{self.dir}: the champion is the base model already: nothing to roll back")
            if current.rollback_to == 0:
                fields: dict[str, Any] = dict(
                    adapter=None, model_spec=current.model_spec, model_hash=current.model_hash,
                    reason=f"rollback by {by} from record {current.sequence} to the base model",
                )
                rollback_to = 0
            else:
                target = self._read_record(current.rollback_to)
                self._verify_adapter(target)
                fields = {k: getattr(target, k) for k in (
                    "adapter", "adapter_sha256", "lora", "model_spec", "model_hash", "data_hash", "run_id",
                    "config", "metrics", "report")}
                fields["reason"] = (f"rollback by {by} from record {current.sequence} to record {target.sequence} "
                                    f"({target.promoted_by}: {target.reason})")
                rollback_to = target.rollback_to
            return self._write_record(pointer, {**fields, "promoted_by": "rollback"}, rollback_to=rollback_to)
        finally:
            lock.release()

    def repair(self) -> Champion | None:
        """Point a missing or damaged champion.json at the newest intact history record (the fix its
        error message names). An intact champion.json is left alone. Returns the champion."""
        lock = self._locked()
        try:
            try:
                pointer = self._pointer()
            except RegistryError:
                pass
            else:
                return self._current_record(pointer)
            for path in sorted(self.history_dir.glob("[0-9]*.json"), reverse=True):
                try:
                    record, digest = self._read_record_checked(int(path.stem), "")
                except (ValueError, RegistryError):
                    continue
                self._write_pointer(record.sequence, digest)
                return record
            self._write_pointer(0, None)
            return None
        finally:
            lock.release()

    # Callers hold the lock.

    def _check_token(self, expected_token: str, what: str) -> tuple[str, dict[str, Any]] | None:
        pointer = self._pointer()
        actual = _token_of(pointer)
        if actual != expected_token:
            current = self._current_record(pointer)
            who = ("the base model" if current is None else
                   f"record {current.sequence} ({current.promoted_by} at {current.promoted_at}"
                   f"{', run ' + current.run_id if current.run_id else ''}: {current.reason})")
            raise ChampionChanged(
                f"{self.champion_path}: the champion changed while this decision was being made: it is now "
                f"{who}; nothing was {what}. Rerun to gate against the new champion "
                f"(`gemma-lora champion --name {self.name}` shows it).",
                expected_token, actual, current,
            )
        return pointer

    def _write_record(self, pointer: tuple[str, dict[str, Any]] | None, fields: dict[str, Any],
                      rollback_to: int) -> Champion:
        """Write the next history record, then point champion.json at it (the commit point)."""
        sequence = (pointer[1]["sequence"] if pointer else 0) + 1
        adapter, report = fields.pop("adapter"), fields.get("report")
        body: dict[str, Any] = {
            **fields, "name": self.name, "sequence": sequence,
            "lora": dict(fields["lora"]) if fields.get("lora") else None,
            "config": fields.get("config") or {}, "metrics": fields.get("metrics") or {},
            "report": str(report) if report is not None else None,
            "promoted_at": _now(), "rollback_to": rollback_to, "adapter": None, "adapter_sha256": None,
        }
        if adapter is not None:
            digest = self._copy_adapter(Path(adapter), fields.get("adapter_sha256"))
            body["adapter"], body["adapter_sha256"] = f"{ADAPTERS_DIRNAME}/{digest}.lora.h5", digest
        Champion.model_validate(body)  # never write what could not be read back
        if pointer is None:
            # A first promotion that dies after its history record must still read as "never
            # promoted", not as a lost champion.json: publish the empty pointer first.
            self._write_pointer(0, None)
        self._write_pointer(sequence, _write_checked(self.record_path(sequence), body))
        return self._current_record(self._pointer())  # type: ignore[return-value]

    def _write_pointer(self, sequence: int, record_sha256: str | None) -> None:
        body: dict[str, Any] = {"name": self.name, "sequence": sequence, "record": None}
        if sequence:
            body.update(record=f"{HISTORY_DIRNAME}/{sequence:06d}.json", record_sha256=record_sha256)
        _write_checked(self.champion_path, body)

    def _copy_adapter(self, source: Path, expected_sha256: str | None) -> str:
        if not source.is_file():
            raise RegistryError(f"{source}: the adapter to promote is missing (its run directory was deleted?): "
                                "rerun the pipeline to train it again")
        digest = sha256_file(source)
        if expected_sha256 is not None and digest != expected_sha256:
            raise RegistryError(f"{source}: sha256 {digest[:16]}..., not the recorded {expected_sha256[:16]}... "
                                "(changed after training): rerun the pipeline to train it again")
        target = self.adapters_dir / f"{digest}.lora.h5"
        if target.is_file() and sha256_file(target) == digest:
            return digest  # already held (a re-promotion, or the same adapter twice)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
            if sha256_file(tmp) != digest:
                raise RegistryError(f"{source}: changed while it was copied to {target}; promote it again")
        return digest
