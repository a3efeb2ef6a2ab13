"""The toy backbones shipped in shapes_world/backbones/ (shapes_world/train_backbones.py): they load strictly, are the files the manifest
names, and reproduce the held-out numbers the manifest recorded when they were trained (greedy, one thread)."""
import hashlib
import json
import os

import pytest
import torch

from weights import checkpoints
import model
from vlm import VLM, build_vlm
from shapes_world import train_backbones

FOLDER = train_backbones.BACKBONES
MANIFEST = json.load(open(os.path.join(FOLDER, "manifest.json")))


def test_shipped_files_are_the_manifests_and_small():
    total = 0
    for rel, digest in MANIFEST["files"].items():
        data = open(os.path.join(FOLDER, rel), "rb").read()
        assert hashlib.sha256(data).hexdigest() == digest, rel
        total += len(data)
    assert set(MANIFEST["files"]) == {f"{m}/{f}" for m in ("lm-S", "lm-L", "captioner") for f in train_backbones.SHIPPED}
    assert total <= 20 * 2 ** 20, total


def test_backbones_load_strictly_with_the_recorded_shapes():
    for size, overrides in train_backbones.SIZES.items():
        lm = checkpoints.load_model(os.path.join(FOLDER, f"lm-{size}"))   # load_model refuses a missing or extra key
        assert isinstance(lm, model.Qwen3) and lm.lm_head is not None   # untied head (see train_backbones.SIZES)
        for item in overrides.split(","):
            key, value = item.split("=")
            assert str(getattr(lm.config, key)).lower() == value.lower(), (size, key)
    captioner = checkpoints.load_model(os.path.join(FOLDER, "captioner"))
    assert isinstance(captioner, VLM) and captioner.config.vision.image_size == 56
    assert checkpoints.load_model(os.path.join(FOLDER, "lm-S")).config == captioner.llm.config


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as when the numbers were recorded
    work = tmp_path_factory.mktemp("backbones")
    yield work, train_backbones.heldout_data(str(work / "heldout"))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("size", sorted(train_backbones.SIZES))
@pytest.mark.parametrize("kind", ["extract", "caption"])
def test_language_models_reproduce_their_held_out_accuracy(heldout, size, kind):
    work, data = heldout
    got = train_backbones.reasoner_accuracy(os.path.join(FOLDER, f"lm-{size}"), data, kind, str(work / f"{size}-{kind}"))
    assert got == MANIFEST["heldout"][f"lm-{size} on true {kind} descriptions"]


def test_captioner_reproduces_its_held_out_facts(heldout):
    work, data = heldout
    got = train_backbones.captioner_facts(os.path.join(FOLDER, "captioner"), data, str(work / "captioner"))
    assert got == MANIFEST["heldout"]["captioner: confirmed facts in held-out captions"]


def test_world_tokenizer_reproduces_the_shipped_one():
    from shapes_world import world
    ours = json.loads(world.world_tokenizer().to_str())
    for name in ("lm-S", "lm-L", "captioner"):
        assert json.load(open(os.path.join(FOLDER, name, "tokenizer.json"))) == ours, name


@pytest.mark.parametrize("plain", [True, False])
def test_the_language_models_corpus_is_regenerated_exactly(plain):
    """Both phases' corpora (phase 1: the plain world; phase 2: the world itself) are the ones the shipped models
    were trained on."""
    recorded = MANIFEST["plain"]["corpus_sha256"] if plain else MANIFEST["corpus_sha256"]
    assert hashlib.sha256(train_backbones.corpus_text(plain).encode()).hexdigest() == recorded


def test_the_command_trains_both_phases_and_ships_what_it_measured(tmp_path, monkeypatch):
    """`python -m shapes_world.train_backbones` at toy budgets: phase 1 on the plain world (tokenizer, two LMs, the
    captioner from lm-S), phase 2 from phase 1's weights, then the shipped files, their hashes and held-out numbers
    in the manifest; a second call skips every finished run."""
    for name, value in {"LM_SCENES": 20, "LM_STEPS": {"S": 2, "L": 2}, "CAPTION_SCENES": 16, "CAPTION_STEPS": 2,
                        "MORE_STEPS": {"lm-S": 2, "lm-L": 2, "captioner": 2}, "EVAL_SCENES": 2}.items():
        monkeypatch.setattr(train_backbones, name, value)
    out, work = tmp_path / "shipped", tmp_path / "work"
    train_backbones.main(["--out", str(out), "--work", str(work)])
    manifest = json.load(open(out / "manifest.json"))
    assert set(manifest["commands"]) == set(manifest["plain"]["commands"]) == {"lm-S", "lm-L", "captioner"}
    assert all(f"--init {work / 'plain' / name}" in manifest["commands"][name] for name in ("lm-S", "lm-L", "captioner"))
    assert "--llm-path " + str(work / "plain" / "lm-S") in manifest["plain"]["commands"]["captioner"]
    assert manifest["files"] == train_backbones.file_hashes(str(out)) and len(manifest["files"]) == 9
    from shapes_world import world
    plain = "".join(json.dumps(d) + "\n" for d in world.lm_documents(20, plain=True))
    assert manifest["plain"]["corpus_sha256"] == hashlib.sha256(plain.encode()).hexdigest()
    assert json.load(open(out / "lm-S" / "tokenizer.json")) == json.loads(world.world_tokenizer().to_str())
    assert set(manifest["heldout"]) == set(MANIFEST["heldout"])
    logs = {name: os.path.getsize(work / f"{name}.log") for name in ("lm-S", "lm-L", "captioner")}
    train_backbones.main(["--out", str(out), "--work", str(work)])   # finished runs are not started again
    assert logs == {name: os.path.getsize(work / f"{name}.log") for name in ("lm-S", "lm-L", "captioner")}
