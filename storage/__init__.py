"""Run files: strict JSON / JSONL readers, atomic writes, resumable JSONL and the writer lock (records.py);
--shard i/n over machines and the merge that checks every doc once (shards.py)."""
