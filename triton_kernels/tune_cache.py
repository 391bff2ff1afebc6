"""Autotuning results kept on disk between processes: one JSON file per kernel family in the cache directory.

Directory: $MIXPREC_CACHE_DIR, else ~/.cache/mixprec_ops. File (e.g. matmul_autotune.json):

    {"schema": 1, "entries": {"<key>": {"config": {...}, "us": 123.4, "candidates": 7, "offered": "<crc32 of the set>",
    "tuned": "<UTC time>"}}}

The key is a string that the kernel module builds from everything the best config depends on (GPU name and compute
capability, Triton and torch versions, shape bucket, dtypes, epilogue, operand layouts); the value's "config" is a
plain dict that the kernel module validates on use (an entry it cannot use is ignored, never launched).

Writes are atomic: the file is re-read (entries written meanwhile by other processes are kept), the new entry
merged in, the whole written to a temporary file in the same directory and moved over the old one with
os.replace, so a reader sees either the old or the new file, never a partial one. Two processes storing at once
may lose one of their entries (the next run tunes that key again); nothing is ever corrupted. A corrupt or
unreadable file, or a directory that cannot be written, gives one RuntimeWarning per process and is otherwise
ignored: the tuning result is then kept in memory only (a corrupt file is replaced by the next successful store).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import warnings

ENV = "MIXPREC_CACHE_DIR"
SCHEMA = 1


def cache_dir() -> str:
    """$MIXPREC_CACHE_DIR, else ~/.cache/mixprec_ops (read on every use, so a test or a user can change it)."""
    return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mixprec_ops")


class TuneCache:
    """The on-disk entries of one kernel family (file `name` in cache_dir()), loaded once per directory."""

    def __init__(self, name: str):
        self.name = name
        self._loaded_from: str | None = None  # the path the in-memory entries were read from
        self._entries: dict[str, dict] = {}
        self._warned = False

    @property
    def path(self) -> str:
        return os.path.join(cache_dir(), self.name)

    def _warn(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"mixprec_ops autotune cache: {msg}; tuning results are kept in memory only",
                          RuntimeWarning, stacklevel=4)

    def _read(self, path: str) -> dict[str, dict]:
        """The entries in `path`; {} if it does not exist; {} and one warning if it cannot be read or parsed."""
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (FileNotFoundError, NotADirectoryError):  # no such file (the write will say if the dir is bad)
            return {}
        except (OSError, ValueError) as e:  # unreadable, or not JSON (ValueError includes UnicodeDecodeError)
            self._warn(f"ignoring {path} ({type(e).__name__}: {e})")
            return {}
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("entries"), dict):
            self._warn(f"ignoring {path} (not a schema-{SCHEMA} autotune file)")
            return {}
        return {k: v for k, v in doc["entries"].items() if isinstance(k, str) and isinstance(v, dict)}

    def get(self, key: str) -> dict | None:
        path = self.path
        if self._loaded_from != path:
            self._entries = self._read(path)
            self._loaded_from = path
        return self._entries.get(key)

    def put(self, key: str, value: dict) -> bool:
        """Store one entry (merged into what is on disk now); False if it could only be kept in memory."""
        path = self.path
        if self._loaded_from != path:
            self._entries = self._read(path)
            self._loaded_from = path
        value = {**value, "tuned": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        self._entries[key] = value
        entries = {**self._read(path), key: value}
        d = os.path.dirname(path)
        tmp = None
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.name + ".", suffix=".tmp", dir=d)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"schema": SCHEMA, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            self._warn(f"cannot write {path} ({type(e).__name__}: {e})")
            return False
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        self._entries.update(entries)
        return True
