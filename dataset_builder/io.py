"""Reading tables from disk into `datasets.Dataset`: JSON Lines, JSON, Parquet, CSV or a
`save_to_disk` directory. Errors name the file (and the line of a malformed JSON line) instead of
surfacing a pyarrow traceback, and an empty table is an error, not a silent zero."""

import json
from pathlib import Path

from server.errors import DataError

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def check_jsonl(path: Path) -> None:
    """Every non-blank line must be one JSON object."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON line: {exc.msg} (column {exc.colno})") from exc
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")


def count_rows(path: Path) -> int | None:
    """Rows of a file table, cheaply, when the format allows it (None: let the loader count)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    return None


def load_table(path: str | Path, split: str = "train"):
    """One table from disk; a `DatasetDict` directory gives its `split`."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_file() and path.suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unknown format; expected a save_to_disk directory or one of {TABLE_SUFFIXES}")
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise DataError(f"{path} holds splits {list(data)} but no {split!r} split")
                data = data[split]
        else:
            if path.suffix == ".jsonl":
                check_jsonl(path)
            if count_rows(path) == 0:
                raise DataError(f"{path} has no rows")
            loader = {".jsonl": datasets.Dataset.from_json, ".json": datasets.Dataset.from_json,
                      ".parquet": datasets.Dataset.from_parquet, ".csv": datasets.Dataset.from_csv}[path.suffix]
            data = loader(str(path))
    except DataError:
        raise
    except Exception as exc:  # pyarrow and datasets raise many types for unreadable files
        raise DataError(f"{path} cannot be read: {exc}") from exc
    if len(data) == 0:
        raise DataError(f"{path} has no rows")
    return data
