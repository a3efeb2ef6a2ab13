"""--shard i/n: the one rule for splitting work over machines (extract_data.py, evaluate.py), and the check that
joins the parts of a sharded evaluate.py run (`evaluate.py merge`; extract_data.py merges its captions files).

    parse_shard("1/4") -> (1, 4)                  a bad spec is a ValueError naming it
    shard_range(i, n, total) -> (start, end)      contiguous blocks: [i * total // n, (i + 1) * total // n)
    shard_docs(docs, spec, batch_size) -> docs    whole batches of the unsharded run, in doc order: every batch,
                                                  and so every record (the batch's seed included), is the one an
                                                  unsharded run makes, and the parts merge to its files
    merge_parts(dirs, out) -> (manifest, {file: (records, config)})     the parts' files into out, checked
    ranges([1, 2, 3, 7]) -> "1-3, 7"

Each part of an evaluate.py run writes MANIFEST (shard.json: its shard, the run's mode and doc count, its
doc_ids); each part resumes on its own, like any evaluate.py output folder.
"""
import glob
import json
import os

from storage import records

MANIFEST = "shard.json"


def parse_shard(spec):
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def shard_range(i, n, total):
    return i * total // n, (i + 1) * total // n


def shard_docs(docs, spec, batch_size):
    """The docs of shard `spec`: batches of batch_size cut from the whole list (as evaluate.py cuts them), split
    into n contiguous blocks of batches."""
    i, n = parse_shard(spec)
    batches = -(-len(docs) // batch_size)
    start, end = shard_range(i, n, batches)
    if start == end:
        raise ValueError(f"--shard {spec}: no docs ({len(docs)} docs are {batches} batches of {batch_size}, "
                         f"fewer than {n} shards); use fewer shards or a smaller --batch-size")
    return docs[start * batch_size:end * batch_size]


def ranges(ids):
    """[1, 2, 3, 7] -> "1-3, 7" (the first 10 runs)."""
    runs = []
    for i in ids:
        if runs and isinstance(i, int) and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs[:10])
    return text + (" ..." if len(runs) > 10 else "")


def _read_parts(dirs):
    """-> [(folder, i, manifest)] in shard order, and the manifest fields every part shares."""
    parts = []
    for d in dirs:
        path = os.path.join(d, MANIFEST)
        if not os.path.exists(path):
            raise ValueError(f"{d}: not a part of a sharded evaluate.py run (no {MANIFEST}: run with --shard i/n)")
        m = records.read_json(path)
        parts.append((d, *parse_shard(m["shard"]), m))
    common = lambda m: {k: v for k, v in m.items() if k not in ("shard", "doc_ids")}
    first, n, seen = parts[0][0], parts[0][2], {}
    problems = [f"{d}: another run than {first} ({MANIFEST}: shard {m['shard']}, "
                f"{ {k: v for k, v in common(m).items() if common(parts[0][3]).get(k) != v} })"
                for d, _, k, m in parts[1:] if common(m) != common(parts[0][3]) or k != n]
    for d, i, _, _ in parts:
        if i in seen:
            problems.append(f"shard {i}/{n} given twice ({seen[i]} and {d})")
        seen.setdefault(i, d)
    problems += [f"shard {i}/{n} missing" for i in range(n) if i not in seen]
    parts.sort(key=lambda p: p[1])
    ids = [x for _, _, _, m in parts for x in m["doc_ids"]]
    if not problems and (len(set(ids)) != len(ids) or len(ids) != parts[0][3]["n_docs"]):
        problems.append(f"the parts' doc_ids do not cover the run's {parts[0][3]['n_docs']} docs exactly once")
    if problems:
        raise ValueError("merge refused:\n  " + "\n  ".join(problems[:20]))
    return parts, common(parts[0][3])


def _jsonl_files(folder):
    """The resumable outputs of an evaluate.py folder, as paths relative to it (stage1/, stage2/ for the grid)."""
    found = glob.glob(os.path.join(folder, "*.jsonl")) + glob.glob(os.path.join(folder, "*", "*.jsonl"))
    return sorted(os.path.relpath(p, folder) for p in found)


def _config(folder, name, out):
    """A part's run config for output `name`, as the unsharded run in `out` records it (stage-1 file moved)."""
    cfg = records.read_json(os.path.join(folder, name[:-len(".jsonl")] + ".config.json"))
    stage1 = cfg.get("stage1_file")
    if stage1 and os.path.commonpath([stage1, os.path.abspath(folder)]) == os.path.abspath(folder):
        cfg["stage1_file"] = os.path.abspath(os.path.join(out, os.path.relpath(stage1, folder)))
    return {**cfg, "shard": None}


def merge_parts(dirs, out):
    """The parts of one sharded evaluate.py run -> out: every resumable JSONL file with each doc exactly once (the
    parts' lines in shard order: the unsharded file) and its config, as an unsharded run in out writes them.
    -> (the run's manifest fields, {relative path: (records, config)}). Any gap or overlap: one ValueError."""
    if any(os.path.exists(out) and os.path.samefile(d, out) for d in dirs) or \
            os.path.exists(os.path.join(out, MANIFEST)):
        raise ValueError(f"--out {out}: is a part (holds {MANIFEST}); merge into a new folder")
    parts, manifest = _read_parts(dirs)
    names = sorted({name for d, _, _, _ in parts for name in _jsonl_files(d)})
    problems = [f"{d} lacks {name}" for d, _, _, _ in parts for name in names if name not in _jsonl_files(d)]
    merged = {}
    for name in names if not problems else []:
        recs, owner, configs = [], {}, []
        for d, i, n, m in parts:
            mine = set(m["doc_ids"])
            for r in records.read_jsonl(os.path.join(d, name), unique="doc_id"):
                x = r["doc_id"]
                if x in owner:
                    problems.append(f"{name}: doc_id {x} appears twice ({owner[x]} and {d})")
                elif x not in mine:
                    problems.append(f"{name}: doc_id {x} is in {d} (shard {i}/{n}), but belongs to another shard")
                owner.setdefault(x, d)
                recs.append(r)
            missing = [x for x in m["doc_ids"] if x not in owner]
            if missing:
                problems.append(f"{name}: {len(missing)} docs of shard {i}/{n} missing in {d} (doc_ids "
                                f"{ranges(missing)}); finish that shard (rerun its command) first")
            configs.append(_config(d, name, out))
        if any(c != configs[0] for c in configs):
            problems.append(f"{name}: the parts ran with other settings ({dirs[0]} vs the others' .config.json)")
        merged[name] = (recs, configs[0])
    if problems:
        raise ValueError("merge refused:\n  " + "\n  ".join(problems[:20]))
    for name, (recs, config) in merged.items():
        path = os.path.join(out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        records.atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        records.atomic_write_json(path[:-len(".jsonl")] + ".config.json", config)
    return manifest, merged
