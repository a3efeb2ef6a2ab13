"""The whole Shapes run in miniature, with the same code as `python shapes.py` (shapes.QUICK sizes, LLM S):
data -> connector pretraining -> e2e / extraction / caption fine-tuning -> evaluate.py (stage 1 -> stage 2 ->
score) -> summary, gallery; then a rerun that must skip every finished step."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest

from storage import records
import shapes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The main job as a user runs it: `python shapes.py --quick --sizes S` (the default two worker processes);
    -> (the RunConfig of that run, for reruns in this process, and its summary.json)."""
    out = tmp_path_factory.mktemp("shapes_run")
    done = subprocess.run([sys.executable, "shapes.py", "--quick", "--sizes", "S", "--out", str(out)],
                          cwd=shapes.ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "python train.py --stage pretrain" in done.stdout and "try it (offline" in done.stdout
    cfg = shapes.RunConfig(out=str(out), seed=0, jobs=1, **shapes.QUICK)
    cfg.sizes = {"S": cfg.sizes["S"]}
    with open(out / "summary.json") as f:
        return cfg, json.load(f)


def beats(p_hat, p0, n, alpha=0.01):
    """One-sided exact binomial test: is an accuracy p_hat over n questions above p0? (P[X >= k | p0] < alpha,
    k = round(p_hat n); the run's seed is fixed, so the test is too.)"""
    k = round(p_hat * n)
    tail = sum(math.comb(n, j) * p0 ** j * (1 - p0) ** (n - j) for j in range(k, n + 1))
    return tail < alpha


def test_summary_has_every_method_and_the_promised_shape(run):
    _, summary = run
    by = summary["sizes"]["S"]
    for method in (*shapes.METHODS, "blind"):
        s = by[method]
        assert 0 <= s["accuracy"] <= 1 and s["n"] >= 100 and set(s["categories"]) <= set(shapes.world.ASKERS)
    assert set(by["description_facts"]) == set(by["detail_stated"]) == {"extract", "caption"}
    assert set(by["e2e"]["groups"]) == {"stated", "omitted"} and by["e2e"]["groups"]["omitted"]["n"] > 0
    assert {"downscaling", "perception_module", "thinking", "final"} <= set(summary["analyses"])
    assert {"extract+think-nothink", "caption+think-nothink"} <= set(by)   # one size: no decoupled grid
    for name, analysis in summary["analyses"].items():
        assert analysis["rows"] and analysis["verdict"] and analysis["table"].count("\n") == len(analysis["rows"]) + 1
        assert set(analysis["rows"][-1]["groups"]) == {"stated", "omitted"}, name
    if summary["plot"]:   # matplotlib is installed: one figure per analysis
        assert set(summary["analysis_figures"]) == set(summary["analyses"])
        assert all(os.path.getsize(path) > 5_000 for path in summary["analysis_figures"].values())
    assert summary["wall_seconds"] > 0 and os.path.getsize(summary["gallery"]) > 10_000
    on_disk = json.load(open(os.path.join(summary["out"], "summary.json")))
    assert on_disk["sizes"]["S"]["e2e"]["accuracy"] == by["e2e"]["accuracy"]


@pytest.mark.parametrize("method", ["e2e", "extract+think", "caption+think"])
def test_every_method_beats_the_blind_baseline(run, method):
    """Each trained method answers held-out questions above the best image-blind guess (one-sided binomial test
    at a fixed seed), and the reasoner alone, given the true descriptions, is near perfect."""
    _, summary = run
    by = summary["sizes"]["S"]
    blind, n = by["blind"]["accuracy"], by[method]["n"]
    assert beats(by[method]["accuracy"], blind, n), (method, by[method]["accuracy"], blind)
    assert by["true-descriptions"]["accuracy"] >= 0.95


def test_extraction_states_the_omitted_detail_more_often_than_the_captioner(run):
    """The detail captions omit (fill): the extraction-tuned module states it, correctly, on more of the
    questions that need it than the captioner, which was never taught the word."""
    _, summary = run
    stated = summary["sizes"]["S"]["detail_stated"]
    assert stated["extract"]["share"] > stated["caption"]["share"], stated


def test_the_printed_example_runs_as_printed_and_says_the_truth(run, tmp_path, monkeypatch):
    """The reason.py command the run prints works from where it was printed and from another folder once its
    relative paths are rebased; its answer is the one printed, next to the truth from the scene graph."""
    _, summary = run
    ex = summary["example"]
    command = ex["command"][1:]
    assert os.path.samefile(command[0], os.path.join(shapes.ROOT, "reason.py"))
    assert os.path.isdir(command[command.index("--reasoner") + 1])
    assert not [a for a in command if a.startswith(os.pardir)]   # relative only below the working directory
    elsewhere = [a if a.startswith("-") or not os.path.exists(a) else os.path.abspath(a) for a in command]
    monkeypatch.chdir(tmp_path)
    assert shapes.shown(elsewhere[0]) == elsewhere[0]       # outside the working directory: absolute
    assert shapes.shown(str(tmp_path / "a" / "b")) == os.path.join("a", "b")
    reply = subprocess.run([sys.executable, *elsewhere, "--json"], capture_output=True, text=True, check=True)
    assert json.loads(reply.stdout)["final"] == ex["answer"]
    row = records.read_jsonl(os.path.join(summary["out"], "data", "eval.jsonl"))[0]
    assert ex["truth"] == row["answer_text"] and row["question"] in command


def test_rerun_skips_every_finished_step(run, capsys):
    cfg, first = run
    again = shapes.run(cfg)
    printed = capsys.readouterr().out
    assert "python train.py" not in printed and "python evaluate.py" not in printed
    assert printed.count("done before") == 4   # connector pretraining, captioning, QA and extraction tuning
    assert first["steps_done_before"] == []     # the first run ran every step; the rerun none (10: 4 train, 6 eval)
    assert len(again["steps_done_before"]) == 10 and "eval e2e-S" in again["steps_done_before"]
    assert again["sizes"]["S"]["extract+think"] == first["sizes"]["S"]["extract+think"]


def test_a_retrained_model_is_evaluated_again(tmp_path, capsys):
    """A step is skipped only if what it read is unchanged: new tuning steps retrain the two post-trained models,
    and then their evaluations run again (their stamps hold the models' stamps), while the captioner's and the
    true descriptions' evaluations, whose inputs did not change, are still skipped. (Its own run at a few steps:
    retraining the shared run's models, and then restoring them, would cost minutes.)"""
    cfg = shapes.RunConfig(out=str(tmp_path), seed=0, jobs=1, n_train=40, n_eval=12, pretrain_steps=2,
                           caption_steps=2, finetune_steps=2)
    cfg.sizes = {"S": cfg.sizes["S"]}
    shapes.run(cfg)
    capsys.readouterr()
    shapes.run(dataclasses.replace(cfg, finetune_steps=3))
    printed = capsys.readouterr().out
    assert printed.count("done before") == 2                     # connector pretraining and captioning
    evaluated = [line for line in printed.splitlines() if "python evaluate.py" in line]
    # e2e, Extract+Think, and thinking off on Extract+Think's new descriptions
    assert len(evaluated) == 3 and any("models/e2e-S" in x for x in evaluated)
    assert any("models/extract-S" in x for x in evaluated)


def timed_step(seconds, log, say):
    """A stand-in for train_step / evaluate_step in run_plan: sleeps; -> ((start, end) wall times, ran now)."""
    t0 = time.time()
    time.sleep(seconds)
    return (t0, time.time()), True


def test_qa_and_extraction_tuning_differ_only_in_data_and_learning_rate():
    """The end-to-end baseline and the Extract+Think perception module start from the same captioning model with
    the same steps and batch (paper section 4.1); each has its own learning rate (RunConfig)."""
    cfg = shapes.RunConfig()
    data = {k: f"data/{k}.jsonl" for k in ("pretrain", "caption", "extract", "qa", "eval")}
    steps, models = shapes.train_plan(cfg, data, "S")
    options = {step.name: step.args[0] for step in steps}
    e2e, extract = options.pop("e2e-S"), options.pop("extract-S")
    assert e2e["init"] == extract["init"] == models["caption"] == options["caption-S"]["out"]
    assert (e2e["data"], e2e["lr"]) == (data["qa"], cfg.finetune_lr)
    assert (extract["data"], extract["lr"]) == (data["extract"], cfg.extract_lr)
    same = lambda o: {k: v for k, v in o.items() if k not in ("data", "lr", "out")}
    assert same(e2e) == same(extract) and e2e["max_steps"] == cfg.finetune_steps


def toy_plan():
    """The real plan's shape (shapes.train_plan + evaluate_plan) with sleeps for steps, L's chain the longest."""
    steps = []
    for size, k in (("S", 1), ("L", 2)):
        chain = [("pretrain", (), 0.1), ("caption", ("pretrain",), 0.3 * k), ("extract", ("caption",), 0.2 * k),
                 ("e2e", ("caption",), 0.15 * k)]
        steps += [shapes.Step(f"{n}-{size}", size, "train", tuple(f"{d}-{size}" for d in needs), timed_step, (t,))
                  for n, needs, t in chain]
        steps += [shapes.Step(f"eval {m}-{size}", size, "eval", (f"{n}-{size}",) if n else (), timed_step, (0.05,))
                  for m, n in (("e2e", "e2e"), ("extract+think", "extract"), ("true", None))]
    return steps


def test_run_plan_in_one_process_takes_training_first_then_the_larger_size(tmp_path):
    done = shapes.run_plan(toy_plan(), 1, str(tmp_path / "logs"), time.time())
    order = sorted(done, key=lambda name: done[name].value[0])
    assert order == ["pretrain-L", "caption-L", "extract-L", "e2e-L", "pretrain-S", "caption-S", "extract-S",
                     "e2e-S", "eval e2e-L", "eval extract+think-L", "eval true-L", "eval e2e-S",
                     "eval extract+think-S", "eval true-S"]


def test_run_plan_in_two_workers_starts_each_step_after_what_it_needs_and_runs_two_at_a_time(tmp_path):
    steps = toy_plan()
    t0 = time.time()
    done = shapes.run_plan(steps, 2, str(tmp_path / "logs"), t0)
    spans = {name: step.value for name, step in done.items()}
    assert set(spans) == {s.name for s in steps}
    for s in steps:
        assert all(spans[s.name][0] >= spans[n][1] for n in s.needs), s.name
    edges = sorted([(a, 1) for a, _ in spans.values()] + [(b, -1) for _, b in spans.values()])   # ends first
    running = [sum(d for _, d in edges[:i + 1]) for i in range(len(edges))]
    assert max(running) == 2                                              # side by side, never more than two
    # L's two fine-tunes go side by side once S's chain no longer holds a worker
    assert spans["extract-L"][0] < spans["e2e-L"][1] and spans["e2e-L"][0] < spans["extract-L"][1]


def test_data_only_writes_the_data_set_and_prints_its_paths_as_json(tmp_path):
    done = subprocess.run([sys.executable, "shapes.py", "--quick", "--data-only", "--json", "--out", str(tmp_path)],
                          cwd=shapes.ROOT, capture_output=True, text=True, timeout=300, check=True)
    paths = json.loads(done.stdout)
    assert set(paths) >= {"pretrain", "qa", "extract", "caption", "eval", "hints", "scenes"}
    rows = records.read_jsonl(paths["eval"])
    assert len({r["scene_seed"] for r in rows}) == shapes.QUICK["n_eval"] and not (tmp_path / "models").exists()
