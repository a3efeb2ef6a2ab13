"""Benchmark sets and scores (mmstar.py: MMStar and JSONL sets, the release's answer parse, lmms-eval's
aggregation) and the reports evaluate.py writes (reports.py: score tables, the grid's CSV and plots)."""
