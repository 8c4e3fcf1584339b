"""Prompt rows from local JSONL / Parquet files, TFDS datasets, JSON array_record files or HF
`datasets` names.

Every row becomes an example dict with four string fields:
  id         "<benchmark>/<row id>" (row `id`, `idx` or `unique_id`; else the 1-based row number)
  problem    the row's `problem`, else its `question`
  gold       `gold_answer(benchmark, row)` (egrc_jax.data.gold)
  benchmark  the gold-extraction rule used (one of gold.BENCHMARKS)

A malformed row (bad JSON, an undecodable TFDS example, not an object, no problem text, no
gold answer) is reported with its file and row number ("path:line 7: ..."), then skipped
(counted, logged) or raised as `BadRowError`, per `on_bad_row`.

TFDS datasets (kind "tfds") are read through tensorflow-datasets itself, without TensorFlow:
a prepared dataset directory (`<data_dir>/<name>/<version>`, the one holding
dataset_info.json; any file format TFDS can random-access, e.g. array_record) with
`tfds.builder_from_directory(dir).as_data_source(split)`, or `"tfds:<name>"` with
`tfds.data_source(name, split=..., data_dir=$TFDS_DATA_DIR, download=False)` (never a
download). Text features arrive as UTF-8 bytes and become str; numpy values become Python
values. Kind "array_record" is a different thing: array_record files whose every record is
one JSON object as bytes (not TFDS-encoded).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from egrc_jax.data.gold import BENCHMARKS, gold_answer

SOURCE_KINDS = ("auto", "jsonl", "parquet", "tfds", "array_record", "hf")
ON_BAD_ROW = ("skip", "error")
_ID_FIELDS = ("id", "idx", "unique_id")
_HF_PREFIX = "hf:"
_TFDS_PREFIX = "tfds:"
TFDS_DEFAULT_SPLIT = "train"
_TFDS_INFO = "dataset_info.json"  # what every prepared TFDS dataset directory holds

log = logging.getLogger(__name__)


class BadRowError(ValueError):
  """A malformed source row; the message names the file and row."""


@dataclasses.dataclass(frozen=True)
class Examples:
  """Normalised examples of one source and the reports of the rows that were skipped."""

  examples: list[dict[str, str]]
  bad_rows: list[str]  # one "where: why" message per skipped row

  @property
  def num_bad(self) -> int:
    return len(self.bad_rows)


class _Bad(Exception):
  """A row-level problem; `read_examples` adds the location and applies on_bad_row."""


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue  # blank lines (e.g. a trailing newline) are not rows
      where = f"{path}:line {lineno}"
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        yield where, _Bad(f"bad JSON ({e})")


def _parquet_rows(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
  import pyarrow.parquet as pq  # local: only Parquet users pay for the import

  for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
    yield f"{path}:row {i}", row


def array_record_files(directory: pathlib.Path, split: str | None) -> list[pathlib.Path]:
  """The array_record shards in a directory (`<name>-<split>.array_record-0000i-of-n`)."""
  files = sorted(p for p in directory.iterdir() if ".array_record" in p.name)
  if split:
    files = [p for p in files if f"-{split}.array_record" in p.name]
  if not files:
    raise FileNotFoundError(
      f"no array_record files{f' for split {split!r}' if split else ''} in {directory}; "
      "expected names like '<name>-<split>.array_record-00000-of-00001'"
    )
  return files


def _array_record_rows(directory: pathlib.Path, split: str | None) -> Iterator[tuple[str, Any]]:
  import grain  # local: keeps `import egrc_jax.data.sources` light

  if (directory / _TFDS_INFO).is_file():
    raise ValueError(
      f"{directory} is a TFDS dataset directory (it has {_TFDS_INFO}): its records are "
      "TFDS-encoded examples, not JSON; read it with kind='tfds' (or kind='auto')"
    )
  for path in array_record_files(directory, split):
    source = grain.sources.ArrayRecordDataSource([str(path)])
    for i in range(len(source)):
      where = f"{path}:record {i + 1}"
      try:
        yield where, json.loads(source[i])
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        yield where, _Bad(f"bad JSON record ({e})")


def python_value(value: Any) -> Any:
  """A decoded TFDS value as plain Python: bytes -> str (UTF-8), numpy scalars and arrays ->
  Python numbers and lists, dicts and lists recursively. Raises UnicodeDecodeError on bytes
  that are not UTF-8 text."""
  import numpy as np

  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: python_value(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return [python_value(v) for v in value.tolist()] if value.ndim else python_value(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, list | tuple):
    return [python_value(v) for v in value]
  return value


def _tfds_data_source(source: str, split: str):
  """(where-prefix, random-access source of decoded examples) for a TFDS source."""
  import tensorflow_datasets as tfds  # local: only TFDS users pay for the import

  if source.startswith(_TFDS_PREFIX):
    name = source.removeprefix(_TFDS_PREFIX)
    data_dir = os.environ.get("TFDS_DATA_DIR") or None
    try:
      return f"{source}[{split}]", tfds.data_source(
        name, split=split, data_dir=data_dir, download=False
      )
    except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; all mean "not readable"
      raise FileNotFoundError(
        f"cannot read TFDS dataset {name!r} split {split!r} from data_dir "
        f"{data_dir or '(the TFDS default, ~/tensorflow_datasets)'}: {type(e).__name__}: {e}. "
        "Prepare it there first (builder.download_and_prepare()), set TFDS_DATA_DIR, or point "
        "the source at the prepared <data_dir>/<name>/<version> directory"
      ) from e
  directory = pathlib.Path(source)
  builder = tfds.builder_from_directory(directory)
  if any(part.split("[")[0].strip() not in builder.info.splits for part in split.split("+")):
    raise ValueError(
      f"TFDS dataset {directory} has no split {split!r}; it has "
      f"{sorted(builder.info.splits)} (set split=...)"
    )
  return f"{directory}[{split}]", builder.as_data_source(split=split)


def _tfds_rows(source: str, split: str | None) -> Iterator[tuple[str, Any]]:
  prefix, data = _tfds_data_source(source, split or TFDS_DEFAULT_SPLIT)
  for i in range(len(data)):
    where = f"{prefix}:record {i + 1}"
    try:
      yield where, python_value(data[i])
    except UnicodeDecodeError as e:
      yield where, _Bad(f"a text field is not UTF-8 ({e})")
    except Exception as e:  # noqa: BLE001 -- a corrupt record raises whatever its decoder does
      yield where, _Bad(f"undecodable TFDS example ({type(e).__name__}: {e})")


def _hf_rows(name: str, split: str | None) -> Iterator[tuple[str, Any]]:
  try:
    import datasets  # optional dependency, needs network for hub names
  except ImportError as e:
    raise ImportError(
      f"loading the Hugging Face dataset {name!r} needs the `datasets` package "
      "(pip install datasets) and network access; or download it once and point the "
      "source at a local JSONL/Parquet file"
    ) from e
  ds = datasets.load_dataset(name, split=split or "train")
  for i, row in enumerate(ds, start=1):
    yield f"{name}[{split or 'train'}]:row {i}", row


def detect_kind(source: str) -> str:
  """auto-detection: .jsonl/.json -> jsonl, .parquet -> parquet, a directory with
  dataset_info.json or "tfds:<name>" -> tfds, another directory -> array_record (JSON
  records), "hf:<name>" -> hf."""
  if source.startswith(_HF_PREFIX):
    return "hf"
  if source.startswith(_TFDS_PREFIX):
    return "tfds"
  path = pathlib.Path(source)
  if path.is_dir():
    return "tfds" if (path / _TFDS_INFO).is_file() else "array_record"
  if path.is_file():
    if path.suffix in (".jsonl", ".json"):
      return "jsonl"
    if path.suffix == ".parquet":
      return "parquet"
    raise ValueError(f"cannot tell the format of {source!r}: use .jsonl or .parquet, or set kind")
  raise FileNotFoundError(
    f"no such file or directory: {source!r}; for a Hugging Face dataset write "
    f"'hf:<name>' (e.g. 'hf:agentica-org/DeepScaleR-Preview-Dataset') or set kind='hf'"
  )


def raw_rows(source: str, kind: str = "auto", split: str | None = None):
  """(where, row) pairs of a source; a row that cannot be decoded is a `_Bad` instance."""
  if kind not in SOURCE_KINDS:
    raise ValueError(f"source kind must be one of {SOURCE_KINDS}, got {kind!r}")
  kind = detect_kind(source) if kind == "auto" else kind
  if kind == "hf":
    return _hf_rows(source.removeprefix(_HF_PREFIX), split)
  if kind == "tfds":
    return _tfds_rows(source, split)
  path = pathlib.Path(source)
  if kind == "jsonl":
    return _jsonl_rows(path)
  if kind == "parquet":
    return _parquet_rows(path)
  return _array_record_rows(path, split)


def normalise_row(row: Any, benchmark: str, fallback_id: int) -> dict[str, str]:
  """One raw row -> {id, problem, gold, benchmark}; raises `_Bad` with the reason."""
  if isinstance(row, _Bad):
    raise row
  if not isinstance(row, dict):
    raise _Bad(f"row is a {type(row).__name__}, expected a JSON object")
  problem = row.get("problem") or row.get("question")
  if not isinstance(problem, str) or not problem.strip():
    raise _Bad("missing field: needs a non-empty 'problem' or 'question'")
  try:
    gold = gold_answer(benchmark, row)
  except KeyError as e:
    raise _Bad(f"missing field {e} needed for the {benchmark} gold answer") from None
  except (ValueError, TypeError) as e:
    raise _Bad(f"no gold answer: {e}") from None
  if not gold.strip():
    raise _Bad("empty gold answer")
  raw_id = next((row[k] for k in _ID_FIELDS if row.get(k) is not None), fallback_id)
  return {"id": f"{benchmark}/{raw_id}", "problem": problem, "gold": gold, "benchmark": benchmark}


def read_examples(
  source: str | pathlib.Path,
  benchmark: str,
  *,
  kind: str = "auto",
  split: str | None = None,
  on_bad_row: str = "skip",
) -> Examples:
  """All examples of a source, normalised with the `benchmark` gold rule.

  on_bad_row="skip" logs a warning per malformed row and counts it (Examples.bad_rows);
  "error" raises BadRowError at the first one. Either way the message names file and row.
  """
  if benchmark not in BENCHMARKS:
    raise ValueError(f"unknown benchmark (gold rule) {benchmark!r}; expected one of {BENCHMARKS}")
  if on_bad_row not in ON_BAD_ROW:
    raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
  examples, bad = [], []
  for n, (where, row) in enumerate(raw_rows(str(source), kind, split), start=1):
    try:
      examples.append(normalise_row(row, benchmark, fallback_id=n))
    except _Bad as e:
      msg = f"{where}: {e}"
      if on_bad_row == "error":
        raise BadRowError(msg + " (set on_bad_row='skip' to drop such rows)") from None
      log.warning("skipping malformed row %s", msg)
      bad.append(msg)
  if bad:
    log.warning("%s: skipped %d malformed rows of %d", source, len(bad), len(bad) + len(examples))
  return Examples(examples=examples, bad_rows=bad)
