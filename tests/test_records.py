"""records.py: strict JSONL reading, atomic writes, and crash-safe resumable appends."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from storage.records import (LockedError, ResumableJsonl, WriterLock, atomic_write_json, atomic_write_text, read_jsonl,
                     read_records)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def test_read_jsonl_skips_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    write(p, '{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    write(p, '{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 "):
        read_jsonl(p)


def test_read_records_json_list_and_jsonl(tmp_path):
    write(tmp_path / "d.json", json.dumps([{"id": "x"}, {"id": "y"}]))
    write(tmp_path / "d.jsonl", '{"id": "x"}\n{"id": "y"}\n')
    assert read_records(tmp_path / "d.json") == read_records(tmp_path / "d.jsonl") == [{"id": "x"}, {"id": "y"}]


def test_read_records_rejects_non_list_json(tmp_path):
    write(tmp_path / "d.json", '{"id": "x"}')
    with pytest.raises(ValueError, match=r"d\.json: expected a JSON list"):
        read_records(tmp_path / "d.json")


def test_atomic_write_replaces_whole_file_and_leaves_no_tmp(tmp_path):
    p = tmp_path / "out.json"
    atomic_write_text(p, "old text that is longer\n")
    atomic_write_json(p, {"k": [1, 2]})
    assert json.loads(p.read_text()) == {"k": [1, 2]}
    assert os.listdir(tmp_path) == ["out.json"]


def test_resumable_append_then_reopen_knows_done_keys(tmp_path):
    p = tmp_path / "r.jsonl"
    out = ResumableJsonl(p, "index")
    assert out.done_keys == set()
    out.append([{"index": 0, "v": "a"}, {"index": 1, "v": "b"}])
    out.append([])
    assert out.done_keys == {0, 1}
    assert ResumableJsonl(p, "index").done_keys == {0, 1}
    assert read_jsonl(p) == [{"index": 0, "v": "a"}, {"index": 1, "v": "b"}]


def test_torn_last_line_without_newline_is_dropped(tmp_path, capsys):
    p = tmp_path / "r.jsonl"
    write(p, '{"index": 0}\n{"index": 1}\n{"index": 2, "caption": "hal')
    out = ResumableJsonl(p, "index")
    assert out.done_keys == {0, 1}
    assert p.read_text() == '{"index": 0}\n{"index": 1}\n'
    assert "torn last line" in capsys.readouterr().err
    out.append([{"index": 2}])
    assert [r["index"] for r in read_jsonl(p)] == [0, 1, 2]


def test_complete_record_missing_only_its_newline_is_dropped(tmp_path):
    p = tmp_path / "r.jsonl"
    write(p, '{"index": 0}\n{"index": 1}')
    assert ResumableJsonl(p, "index").done_keys == {0}
    assert p.read_text() == '{"index": 0}\n'


def test_invalid_json_last_line_with_newline_is_dropped(tmp_path):
    p = tmp_path / "r.jsonl"
    write(p, '{"index": 0}\n{"index": 1, "capt\n')
    assert ResumableJsonl(p, "index").done_keys == {0}
    assert p.read_text() == '{"index": 0}\n'


def test_malformed_middle_line_is_an_error_not_a_repair(tmp_path):
    p = tmp_path / "r.jsonl"
    write(p, '{"index": 0}\n{"ind\n{"index": 2}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl: line 2 "):
        ResumableJsonl(p, "index")


def test_append_rejects_record_without_key_before_writing(tmp_path):
    p = tmp_path / "r.jsonl"
    out = ResumableJsonl(p, "index")
    with pytest.raises(ValueError, match="no key 'index'"):
        out.append([{"index": 0}, {"caption": "x"}])
    assert not p.exists() or p.read_text() == ""


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "caf\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not UTF-8 \(byte 0xff"):
        read_jsonl(str(path))
    listing = tmp_path / "bad.json"
    listing.write_bytes(b'[{"b": "\xff"}]')
    with pytest.raises(ValueError, match=r"bad\.json: not UTF-8"):
        read_records(str(listing))


def test_a_duplicated_key_is_refused_naming_file_line_and_key(tmp_path):
    p = tmp_path / "r.jsonl"
    write(p, '{"index": 0}\n{"index": 1}\n{"index": 0, "caption": "again"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl: line 3 repeats index 0 of line 1"):
        ResumableJsonl(p, "index")
    with pytest.raises(ValueError, match=r"line 3 repeats index 0"):
        read_jsonl(p, unique="index")
    assert len(read_jsonl(p)) == 3   # without `unique`, a plain reader
    out = ResumableJsonl(tmp_path / "s.jsonl", "index")
    out.append([{"index": 0}])
    with pytest.raises(ValueError, match=r"refusing to append index \[0\] again"):
        out.append([{"index": 1}, {"index": 0}])
    assert read_jsonl(tmp_path / "s.jsonl") == [{"index": 0}]


def test_writer_lock_refuses_a_second_writer_naming_the_lock_and_holder(tmp_path):
    lock = tmp_path / "out.jsonl.lock"
    with WriterLock(lock, "test"):
        with pytest.raises(LockedError, match=rf"out\.jsonl\.lock: locked by pid {os.getpid()} on host "
                                               rf"{socket.gethostname()}"):
            WriterLock(lock).acquire()
    with WriterLock(lock):   # released on exit: the next writer gets it
        pass


def test_writer_lock_of_a_killed_process_never_blocks(tmp_path):
    """The kernel drops a flock when its holder dies, even by kill -9: a lock file left behind (holding a pid
    that is gone) never blocks the next writer."""
    lock = tmp_path / "train.lock"
    code = (f"import time; from storage import records; records.WriterLock({str(lock)!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LockedError, match=f"pid {holder.pid} "):
            WriterLock(lock).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid   # the stale file stays ...
    with WriterLock(lock):                                      # ... and does not block
        assert json.loads(lock.read_text())["pid"] == os.getpid()
