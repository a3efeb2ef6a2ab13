"""The whole Shapes run in miniature, with the same code as `python shapes.py` (shapes.QUICK sizes, LLM S):
data -> connector pretraining -> e2e / extraction / caption fine-tuning -> evaluate.py (stage 1 -> stage 2 ->
score) -> summary, gallery; then a rerun that must skip every finished step."""
import dataclasses
import json
import math
import os

import pytest

import shapes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_run")
    cfg = shapes.RunConfig(out=str(out), seed=0, jobs=1, **shapes.QUICK)
    cfg.sizes = {"S": cfg.sizes["S"]}
    return cfg, shapes.run(cfg)


def beats(p_hat, p0, n, z=2.33):
    """One-sided binomial test at ~1 %: is an accuracy p_hat over n questions above p0 (normal approximation)?"""
    return p_hat > p0 + z * math.sqrt(p0 * (1 - p0) / n)


def test_summary_has_every_method_and_the_promised_shape(run):
    _, summary = run
    by = summary["sizes"]["S"]
    for method in (*shapes.METHODS, "blind"):
        s = by[method]
        assert 0 <= s["accuracy"] <= 1 and s["n"] >= 100 and set(s["categories"]) <= set(shapes.W.ASKERS)
    assert set(by["description_facts"]) == {"extract", "caption"}
    assert summary["wall_seconds"] > 0 and os.path.getsize(summary["gallery"]) > 10_000
    on_disk = json.load(open(os.path.join(summary["out"], "summary.json")))
    assert on_disk["sizes"]["S"]["e2e"]["accuracy"] == by["e2e"]["accuracy"]


def test_two_stage_answers_beat_the_blind_baseline(run):
    """The trained perception module (stage 1) + the untouched toy LM (stage 2) answer held-out questions above
    the best image-blind guess (binomial test), and the reasoner alone, given the true descriptions, is near
    perfect. At these smoke-test steps the captioner's descriptions are the better ones (as in the full run), so
    that chain is the one asserted; Extract+Think's number is in the summary."""
    _, summary = run
    by = summary["sizes"]["S"]
    blind, n = by["blind"]["accuracy"], by["caption+think"]["n"]
    assert beats(by["caption+think"]["accuracy"], blind, n), (by["caption+think"]["accuracy"], blind)
    assert by["true-descriptions"]["accuracy"] >= 0.95


def test_rerun_skips_every_finished_step(run, capsys):
    cfg, first = run
    again = shapes.run(cfg)
    printed = capsys.readouterr().out
    assert "python train.py" not in printed and "python evaluate.py" not in printed
    assert printed.count("done before") == 4   # connector pretraining, captioning, QA and extraction tuning
    assert again["sizes"]["S"]["extract+think"] == first["sizes"]["S"]["extract+think"]


def test_a_retrained_model_is_evaluated_again(run, capsys):
    """A step is skipped only if what it read is unchanged: new tuning steps retrain the two post-trained models,
    and then their evaluations run again (their stamps hold the models' stamps), while the captioner's and the
    true descriptions' evaluations, whose inputs did not change, are still skipped."""
    cfg, first = run
    shapes.run(dataclasses.replace(cfg, finetune_steps=cfg.finetune_steps + 1))
    printed = capsys.readouterr().out
    assert printed.count("done before") == 2                     # connector pretraining and captioning
    evaluated = [line for line in printed.splitlines() if "python evaluate.py" in line]
    assert len(evaluated) == 2 and any("models/e2e-S" in x for x in evaluated)
    assert any("models/extract-S" in x for x in evaluated)
