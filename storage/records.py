"""Shared JSON / JSONL helpers: strict readers, the image path rule of data records, atomic writes, a resumable
append-only JSONL, and the writer lock.

A JSONL file written by ResumableJsonl survives a crash at any moment: every batch is
flushed and fsync'ed, and a torn last line (the write the crash interrupted) is dropped
when the file is opened again, so a restart skips finished keys and duplicates nothing.
Two processes must never append to one file: every tool holds a WriterLock on what it resumes.
"""
import fcntl
import json
import os
import socket
import sys
import time


class LockedError(ValueError):
    """Another process holds the WriterLock of an output (a ValueError, so every CLI prints it as one line)."""


def read_jsonl(path, unique=None):
    """One dict per non-empty line; a malformed line (bad JSON, or bytes that are not UTF-8) raises ValueError
    naming the file and line number. unique: a key no two records may share (a resumable file's key); a repeat
    raises ValueError naming the file, both lines and the value (records without the key are not checked)."""
    records, seen = [], {}
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
            if unique is not None and isinstance(records[-1], dict) and unique in records[-1]:
                value = json.dumps(records[-1][unique], sort_keys=True)
                if value in seen:
                    raise ValueError(f"{path}: line {line_no} repeats {unique} {value} of line {seen[value]} (two "
                                     "writers at once, or lines copied by hand); remove the duplicate")
                seen[value] = line_no
    return records


def read_json(path):
    """A JSON file -> its value; bad JSON, bytes that are not UTF-8 or an empty file raise ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON at line {e.lineno} ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def read_records(path):
    """A .json file holding a list, or a .jsonl file (one JSON object per line) -> list[dict]."""
    if str(path).endswith(".jsonl"):
        return read_jsonl(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def resolve_image_path(folder, path, where, allow_outside=False):
    """The one rule for an image path written in a data record: relative to `folder` ("" = the current folder)
    and, once ".." is resolved, inside it. An absolute path or one that climbs out of the folder is refused with
    a ValueError naming `where` (the record), unless allow_outside (the tools' --allow-outside-images). The check
    is on the path's text: a symlink inside the folder is followed wherever it points (the folder owner's choice)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: image path must be a non-empty string, got {path!r}")
    full = os.path.join(folder, path)
    root = os.path.abspath(folder or ".")
    if not allow_outside and os.path.commonpath([root, os.path.abspath(full)]) != root:
        raise ValueError(f"{where}: image path {path!r} is outside the image folder {root}; "
                         "pass --allow-outside-images to allow it")
    return full


def atomic_write(path, write):
    """write(tmp) fills a temporary file beside path, then os.replace puts it in place: readers see the old or the
    new file, never half of one. The temporary name keeps path's extension (PIL and matplotlib pick the format
    from it) and the writer's pid (two writers never share it); it is removed if write fails."""
    base, ext = os.path.splitext(str(path))
    tmp = f"{base}.tmp-{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def atomic_write_bytes(path, data):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


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
        repair_torn_tail(self.path)
        # any other malformed line, or a key written twice, is a real error: named by read_jsonl
        for record in read_jsonl(self.path, unique=self.key):
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
        again = [r[self.key] for r in records if r[self.key] in self.done_keys]
        if again or len({r[self.key] for r in records}) < len(records):
            raise ValueError(f"{self.path}: refusing to append {self.key} {again[:5] or 'twice in one batch'} again")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.done_keys.update(r[self.key] for r in records)


def repair_torn_tail(path):
    """Drop the line a crash interrupted: a last line without its newline, or a last line that is not JSON.
    Reports what it dropped on stderr; any earlier malformed line is left for read_jsonl to name."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")  # a complete file ends with "\n", so the last piece is b""
    keep = len(data)
    if lines[-1]:  # the final line has no newline: a write was interrupted
        keep -= len(lines[-1])
        print(f"{path}: dropping torn last line ({len(lines[-1])} bytes, no newline)", file=sys.stderr)
    elif len(lines) > 1 and lines[-2].strip() and not _is_json(lines[-2]):
        keep -= len(lines[-2]) + 1
        print(f"{path}: dropping torn last line (not valid JSON)", file=sys.stderr)
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())


class WriterLock:
    """The one rule for "one writer per resumable output": an exclusive fcntl.flock on a lock file (created if
    missing), holding the writer's pid and host. A second writer gets LockedError naming the lock file and the
    holder. The kernel drops the lock when its holder exits or dies, even by kill -9, so a lock file left behind by
    a dead process never blocks (there is no stale lock to clean up); the file itself is kept, since deleting it
    would let two writers lock two different files. Use as a context manager, or acquire() / release()."""

    def __init__(self, path, tool=""):
        self.path, self.tool, self.fd = str(path), tool, None

    def acquire(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"null")
                who = f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
            except (ValueError, TypeError, KeyError):
                who = "a writer that has not written its pid yet"
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise LockedError(f"{self.path}: locked by {who}: another process is writing this output; "
                                  "wait for it to finish or stop it") from None
            raise LockedError(f"{self.path}: cannot lock ({e.strerror}); put the output on a file system "
                              "with flock") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "tool": self.tool,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)   # closing the file drops the flock
            self.fd = None

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def _is_json(line):
    try:
        json.loads(line)
        return True
    except ValueError:
        return False
