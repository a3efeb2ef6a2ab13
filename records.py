"""Shared JSON / JSONL helpers: strict readers, atomic writes, and a resumable append-only JSONL.

A JSONL file written by ResumableJsonl survives a crash at any moment: every batch is
flushed and fsync'ed, and a torn last line (the write the crash interrupted) is dropped
when the file is opened again, so a restart skips finished keys and duplicates nothing.
"""
import json
import os
import sys


def read_jsonl(path):
    """One dict per non-empty line; a malformed line (bad JSON, or bytes that are not UTF-8) raises ValueError
    naming the file and line number."""
    records = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {line_no} is not UTF-8 (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from None
    return records


def read_records(path):
    """A .json file holding a list, or a .jsonl file (one JSON object per line) -> list[dict]."""
    if str(path).endswith(".jsonl"):
        return read_jsonl(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON at line {e.lineno} ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def atomic_write_text(path, text):
    """Write text to path via a temporary file + os.replace: readers see the old or the new file, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj, indent=2):
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


class ResumableJsonl:
    """Append-only JSONL keyed by record[key]; reopening it repairs a torn tail and reports done_keys."""

    def __init__(self, path, key):
        self.path, self.key = str(path), key
        self.done_keys = set()
        if os.path.exists(self.path):
            self._repair_and_scan()

    def _repair_and_scan(self):
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")  # a complete file ends with "\n", so the last piece is b""
        keep = len(data)
        if lines[-1]:  # the final line has no newline: a write was interrupted
            keep -= len(lines[-1])
            print(f"{self.path}: dropping torn last line ({len(lines[-1])} bytes, no newline)", file=sys.stderr)
        elif len(lines) > 1 and lines[-2].strip() and not _is_json(lines[-2]):
            keep -= len(lines[-2]) + 1
            print(f"{self.path}: dropping torn last line (not valid JSON)", file=sys.stderr)
        if keep != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        for record in read_jsonl(self.path):  # any other malformed line is a real error: named by read_jsonl
            if self.key not in record:
                raise ValueError(f"{self.path}: record without key {self.key!r}: {str(record)[:200]}")
            self.done_keys.add(record[self.key])

    def append(self, records):
        """Write a batch of dicts (one line each), then flush + fsync so a crash loses at most this batch."""
        if not records:
            return
        for r in records:
            if self.key not in r:
                raise ValueError(f"{self.path}: record to append has no key {self.key!r}: {str(r)[:200]}")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.done_keys.update(r[self.key] for r in records)


def _is_json(line):
    try:
        json.loads(line)
        return True
    except ValueError:
        return False
