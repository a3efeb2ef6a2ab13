"""quantize.py: the int8 and int4 layers against their dequantized weights (int8 by hand), loading with quantize=
(every linear of the LLM and the LM head swapped, nothing else touched), generation, the trained toy backbones'
greedy agreement and held-out accuracy, and the --quantize flag of reason.py and evaluate.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from weights import checkpoints
import model
from storage import records
from shapes_world import train_backbones, world
import vision
from vlm import VLM, build_vlm
from weights.quantize import Int4Linear, Int8Linear, quantize_model  # noqa: E402

BACKBONES = train_backbones.BACKBONES
MANIFEST = json.load(open(os.path.join(BACKBONES, "manifest.json")))


# ----------------------------------------------------------------------------- the layer

def test_int8_linear_by_hand():
    # row 0: multiples of 2^-7 up to 127 * 2^-7, so s = 2^-7 exactly and q = w * 2^7; row 1: 4x row 0, s = 2^-5
    ints = torch.tensor([127, -127, 0, 1, -1, 64, -3, 5, 100, -100, 7, 8, -9, 10, 11, -12], dtype=torch.float32)
    lin = nn.Linear(16, 2, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([ints / 128, ints / 32]))
        lin.bias.copy_(torch.tensor([0.5, -2.0]))
    q = Int8Linear.from_linear(lin)
    assert q.weight.dtype == torch.int8 and q.weight.tolist() == [ints.int().tolist()] * 2
    assert q.scales.tolist() == [2 ** -7, 2 ** -5]
    x = torch.linspace(-1, 1, 3 * 16).view(3, 16)
    x_bf16 = x.bfloat16().double()                                   # the CPU kernel sees bf16 activations
    want = x_bf16 @ (ints.double()[:, None] * torch.tensor([2 ** -7, 2 ** -5], dtype=torch.double)) + \
        torch.tensor([0.5, -2.0], dtype=torch.double)
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (3, 2)
    assert torch.allclose(got.double(), want, rtol=2 ** -7, atol=1e-3)   # bf16 output rounding


def test_a_rounded_weight_is_within_half_a_step_and_matches_its_dequantized_reference():
    torch.manual_seed(0)
    for k in (64, 24):   # 64: PyTorch's int8 kernel; 24 (not a multiple of 16): the dequantize path
        lin = nn.Linear(k, 40, bias=False)
        q = Int8Linear.from_linear(lin)
        step = q.scales.float()[:, None]
        assert ((lin.weight - q.dequantized()).abs() <= step / 2 + 1e-7).all()
        assert q.weight.abs().max() == 127
        x = torch.randn(2, 5, k)
        ref = x @ q.dequantized().T                                     # (2, 5, 40)
        assert torch.allclose(q(x), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_int4_linear_equals_its_dequantized_groups():
    torch.manual_seed(0)
    for out in (48, 40):   # 40: not a multiple of 16, padded for the kernel and cut
        lin = nn.Linear(128, out, bias=True)
        q, s, z = Int4Linear.quantize_groups(lin.weight)                  # (out, 128), (out, 2) x 2
        assert q.min() >= 0 and q.max() <= 15
        deq = ((q.float() - 8).view(out, 2, 64) * s.float()[..., None] + z.float()[..., None]).view(out, 128)
        assert ((deq - lin.weight).abs() <= s.float().repeat_interleave(64, 1) / 2 + 1e-6).all()
        x = torch.randn(3, 4, 128)
        ref = x.bfloat16().float() @ deq.T + lin.bias
        got = Int4Linear.from_linear(lin)(x)
        assert got.shape == (3, 4, out) and torch.allclose(got, ref, rtol=1e-2, atol=1e-2)


def test_int4_refuses_rows_it_cannot_group():
    with pytest.raises(ValueError, match=r"quantize 'int4'.*multiples of 64.*\[8, 48\]"):
        Int4Linear.from_linear(nn.Linear(48, 8))


def test_an_all_zero_row_stays_zero():
    lin = nn.Linear(16, 3, bias=False)
    with torch.no_grad():
        lin.weight[1] = 0
    q = Int8Linear.from_linear(lin)
    assert q.weight[1].abs().sum() == 0 and torch.isfinite(q.scales.float()).all()


# ----------------------------------------------------------------------------- loading

def hf_checkpoint(path, kind="qwen3", tied=True):
    """A tiny checkpoint written by transformers (save_pretrained): the real layout, Qwen2 biases included."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tied)
    m = (transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common)) if kind == "qwen3" else
         transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)))
    m.save_pretrained(path)
    return str(path)


def linears(module):
    return {n for n, m in module.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("kind,tied,mode", [("qwen3", True, "int8"), ("qwen3", False, "int8"), ("qwen2", True, "int8"),
                                            ("qwen3", True, "int4"), ("qwen2", False, "int4")])
def test_loading_quantized_swaps_every_linear_and_the_head_and_nothing_else(tmp_path, kind, tied, mode):
    folder = hf_checkpoint(tmp_path, kind, tied)
    ref, q = checkpoints.load_model(folder), checkpoints.load_model(folder, quantize=mode)
    layer = {"int8": Int8Linear, "int4": Int4Linear}[mode]
    swapped = {n for n, m in q.named_modules() if isinstance(m, layer)}
    assert not linears(q) and swapped == linears(ref) | {"lm_head"}
    assert len(swapped) == 7 * 2 + 1
    head = ref.embed_tokens.weight if tied else ref.lm_head.weight
    x = torch.randn(5, 64)
    with torch.no_grad():   # the head is a quantized copy of the right matrix (another one: error ~1.4)
        err = (q.lm_head(x) - x @ head.T).norm() / (x @ head.T).norm()
    assert err < {"int8": 0.02, "int4": 0.2}[mode], err
    floats = {k: v for k, v in ref.state_dict().items() if k.rsplit(".", 1)[0] not in swapped}
    assert floats and all(torch.equal(v, q.state_dict()[k]) for k, v in floats.items())   # norms, embedding, biases
    if kind == "qwen2":
        assert torch.equal(q.layers[0].self_attn.q_proj.bias, ref.layers[0].self_attn.q_proj.bias)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_vlm_quantizes_its_llm_only(tmp_path, mode):
    torch.manual_seed(0)
    vlm = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=120)), vision.SiglipConfig.preset("tiny"))
    checkpoints.save_model(vlm.eval(), str(tmp_path))
    q = checkpoints.load_model(str(tmp_path), quantize=mode)
    assert not linears(q.llm) and isinstance(q.llm.lm_head, {"int8": Int8Linear, "int4": Int4Linear}[mode])
    assert linears(q.vision) == linears(vlm.vision) and linears(q.projector) == linears(vlm.projector)
    for part in ("vision", "projector"):
        assert all(torch.equal(v, getattr(vlm, part).state_dict()[k]) for k, v in getattr(q, part).state_dict().items())


def test_bad_quantize_values_and_saving_a_quantized_model_are_clear_errors(tmp_path):
    folder = hf_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"quantize 'int2' is not supported \(choose from int8, int8-compiled, int4\)"):
        checkpoints.load_model(folder, quantize="int2")
    with pytest.raises(ValueError, match="int8-quantized"):
        checkpoints.save_model(checkpoints.load_model(folder, quantize="int8"), str(tmp_path / "out"))


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generation_runs_and_a_left_padded_batch_equals_each_row_alone(tmp_path, mode):
    q = checkpoints.load_model(hf_checkpoint(tmp_path), quantize=mode)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    batched = model.generate(q, rows, max_new_tokens=6)
    assert [len(r) for r in batched] == [6] * 4
    assert batched == [model.generate(q, [r], max_new_tokens=6)[0] for r in rows]


HAS_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.skipif(not HAS_CXX, reason="int8-compiled needs a C++ compiler (torch.compile's inductor)")
def test_the_compiled_int8_path_takes_one_row_and_every_layer_multiplies_by_its_own_weights(tmp_path):
    q = checkpoints.load_model(hf_checkpoint(tmp_path, kind="qwen2"), quantize="int8-compiled")
    layers = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(layers) > 8 and all(m.compiled is not None for m in layers)   # more than dynamo's recompile limit
    assert not any(k.startswith("compiled") or ".compiled" in k for k in q.state_dict())
    with torch.inference_mode():
        # several layers share each shape (q/o, k/v, every layer's MLP): each must use its own frozen q and s. The
        # oracle is the kernel on the same bf16 activations; it rounds its output to bf16 and the compiled product
        # does not, so they agree up to that rounding (|y| * 2^-8), far below the gap between two layers' products
        for lin in layers:
            x = torch.randn(1, 1, lin.in_features)
            got = lin(x)                                                # one fp32 row: the compiled product
            fn, lin.compiled = lin.compiled, None
            want = lin(x)                                               # the kernel, as uncompiled
            lin.compiled = fn
            assert torch.allclose(got, want, rtol=2 ** -7, atol=1e-3)
            ref = x @ lin.dequantized().T + (0 if lin.bias is None else lin.bias)    # Qwen2's q/k/v: a bias too
            assert torch.allclose(got, ref, rtol=2 ** -6, atol=2e-2)
        rows = torch.randn(3, layers[0].in_features)                    # more rows: the kernel, as uncompiled
        fn, layers[0].compiled = layers[0].compiled, None
        want = layers[0](rows)
        layers[0].compiled = fn
        assert torch.equal(layers[0](rows), want)
    assert [len(r) for r in model.generate(q, [[5, 6, 7]], max_new_tokens=4)] == [4]


def test_int8_compiled_names_a_model_off_the_cpu_and_leaves_it_as_it_was():
    with torch.device("meta"):
        m = model.Qwen3(model.Qwen3Config.preset("0.6B", num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"^quantize 'int8-compiled': needs a CPU model \(got meta\); use int8$"):
        quantize_model(m, "int8-compiled")
    assert not any(isinstance(x, Int8Linear) for x in m.modules())


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as test_backbones.py
    work = tmp_path_factory.mktemp("quantize_backbones")
    yield work, train_backbones.heldout_data(str(work / "heldout"))
    torch.set_num_threads(threads)


def test_the_trained_toy_lm_quantized_agrees_with_fp32_and_keeps_its_held_out_accuracy(heldout):
    # measured on lm-S and the true captions (its hardest check): 414 of 431 greedy replies identical to fp32 in
    # int8 (96.1 %), 331 in int4 (76.8 %); accuracy 63.8 % in all three (the manifest's fp32 number)
    work, data = heldout
    lm = os.path.join(BACKBONES, "lm-S")
    replies, accuracy = {}, {}
    for q in (None, "int8", "int4"):
        accuracy[q] = train_backbones.reasoner_accuracy(lm, data, "caption", str(work / f"lm-S-{q}"), quantize=q)
        recs = records.read_jsonl(str(work / f"lm-S-{q}" / "stage2-caption.jsonl"))
        replies[q] = {r["doc_id"]: r["response"] for r in recs}
    assert accuracy[None] == MANIFEST["heldout"]["lm-S on true caption descriptions"] and len(replies[None]) == 431
    for q, agreement in (("int8", 0.95), ("int4", 0.72)):
        assert accuracy[q] == pytest.approx(accuracy[None], abs=0.01), q
        assert replies[q].keys() == replies[None].keys()
        assert sum(replies[None][k] == replies[q][k] for k in replies[None]) / len(replies[None]) >= agreement, q


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_trained_toy_captioner_quantized_keeps_its_held_out_facts(heldout, mode):
    work, data = heldout
    got = train_backbones.captioner_facts(os.path.join(BACKBONES, "captioner"), data, str(work / f"captioner-{mode}"), quantize=mode)
    assert got == pytest.approx(MANIFEST["heldout"]["captioner: confirmed facts in held-out captions"], abs=0.01)


# ----------------------------------------------------------------------------- the command line

def run_cli(script, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, timeout=240, env=env, cwd=ROOT)


def test_reason_cli_runs_int8_and_int8_compiled_and_names_an_unsupported_mode(tmp_path):
    from PIL import Image
    Image.new("RGB", (112, 112), (200, 30, 30)).save(tmp_path / "red.png")
    common = ["--image", tmp_path / "red.png", "--question", "Which colour?\nOptions: A: red, B: blue",
              "--perception-model", os.path.join(BACKBONES, "captioner"), "--reasoner",
              os.path.join(BACKBONES, "lm-S"), "--hint", "none", "--budget", 8, "--max-new-tokens", 8, "--greedy"]
    r = run_cli("reason.py", *common, "--quantize", "int8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["description"]
    if HAS_CXX:   # the compiled path: the same weights, fp32 activations; greedy on a trained model, same reply
        r = run_cli("reason.py", *common, "--quantize", "int8-compiled", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["description"] == out["description"]
    r = run_cli("reason.py", *common, "--quantize", "int2")
    assert r.returncode != 0 and "reason.py: error: argument --quantize: invalid choice: 'int2'" in r.stderr
    assert "Traceback" not in r.stderr


def test_evaluate_cli_stage2_int8_on_the_trained_toy_lm(heldout, tmp_path):
    _, data = heldout
    from shapes_world import world
    stage1 = world.true_stage1(data, str(tmp_path / "true-caption.jsonl"), "caption")
    r = run_cli("evaluate.py", "--mode", "stage2", "--data", data["eval"], "--stage1-file", stage1, "--reasoner",
                os.path.join(BACKBONES, "lm-S"), "--budget", 64, "--answer-tokens", world.ANSWER_TOKENS, "--greedy",
                "--answer-match", "text", "--batch-size", 64, "--quantize", "int8", "--out", tmp_path / "eval",
                "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    recs = list(records.read_jsonl(str(tmp_path / "eval" / "stage2.jsonl")))   # ("average" is per category)
    assert len(recs) == 431 and sum(x["correct"] for x in recs) / len(recs) == pytest.approx(
        MANIFEST["heldout"]["lm-S on true caption descriptions"], abs=0.01)
