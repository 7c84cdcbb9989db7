"""Per-item results of the model stages, keyed by a hash of what produced them, in one append-only
JSONL file per stage: a re-run (or a run resumed after a crash) asks no model twice."""

import hashlib
import json
from pathlib import Path


def content_key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class ResultCache:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        if self.path and self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        entry = json.loads(line)
                        self.entries[entry["key"]] = entry["value"]

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put_many(self, items: dict[str, dict]) -> None:
        self.entries.update(items)
        if self.path and items:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                for key, value in items.items():
                    f.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
