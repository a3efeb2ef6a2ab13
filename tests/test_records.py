"""records.py: strict JSONL reading, atomic writes, and crash-safe resumable appends."""
import json
import os

import pytest

from records import ResumableJsonl, atomic_write_json, atomic_write_text, read_jsonl, read_records


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
