"""Durable answer cache for endpoint calls: one SQLite file in WAL mode, one row per finished answer.

A row is committed (and fsynced, ``synchronous=FULL``) before the caller counts the answer as done,
so a process killed at any moment loses at most the requests that were still in flight.

The key is a SHA-256 over everything that decides the answer: endpoint, model, the teacher-side
system prompt and few-shot context, the messages, and the sampling parameters. It never includes
the API key, and the cache stores neither the key nor the endpoint URL (URLs can carry secrets).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from gad_megatron.config import ConfigError

KEY_VERSION = 1
_FLOAT_PARAMS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


def normalize_sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling params in a canonical form (``1`` and ``1.0`` give the same key; ``None`` values dropped)."""
    out: dict[str, Any] = {}
    for name, value in sampling.items():
        if value is None:
            continue
        if name in _FLOAT_PARAMS and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        out[name] = value
    return out


def _normalize_url(url: str) -> str:
    return url.strip().rstrip("/")


def cache_key(
    *,
    base_url: str,
    model: str,
    system_prompt: str | None,
    context_messages: Sequence[Mapping[str, str]],
    messages: Sequence[Mapping[str, str]],
    sampling: Mapping[str, Any],
) -> str:
    """Hex SHA-256 identifying one request: same key, same question to the same model."""
    payload = {
        "v": KEY_VERSION,
        "endpoint": _normalize_url(base_url),
        "model": model,
        "system": system_prompt,
        "context": [{"role": m["role"], "content": m["content"]} for m in context_messages],
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "sampling": normalize_sampling(sampling),
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Key -> JSON value store. Safe to share between threads of one process and between processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: autocommit, each put is its own durable transaction.
        self._conn = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=60000")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS answers ("
                " key TEXT PRIMARY KEY, value TEXT NOT NULL, created_at REAL NOT NULL)"
            )
        except sqlite3.DatabaseError as err:
            self._conn.close()
            raise ConfigError(f"{self.path}: not a usable answer cache ({err}); move it away to start afresh") from None

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for key, value in self._conn.execute(f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk):
                    found[key] = json.loads(value)
        return found

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store and commit; when this returns the answer survives a crash of the process."""
        text = json.dumps(dict(value), ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers (key, value, created_at) VALUES (?, ?, ?)", (key, text, time.time())
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "ResponseCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
