"""Qwen3/Qwen2 core: parity with transformers, padding, KV cache, strict loading, saving."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from weights import checkpoints
import model

VOCAB = 320


def hf_model(kind="qwen3", tied=True, seed=0):
    """A tiny transformers model with large random weights and non-unit norms, so any
    mistake in RoPE, q/k norm, GQA grouping or the head shows up in the logits."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                  tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=24, **common)   # head_dim != hidden/heads, like 0.6B
        m = transformers.Qwen3ForCausalLM(cfg)
    else:
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    m.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return m.eval()


def saved(m, path, **kw):
    m.save_pretrained(path, **kw)
    return str(path)


@pytest.mark.parametrize("kind,tied", [("qwen3", True), ("qwen3", False), ("qwen2", True)])
def test_logits_match_transformers_fp32(tmp_path, kind, tied):
    ref = hf_model(kind, tied)
    ours = checkpoints.load_model(saved(ref, tmp_path))
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_logits_match_transformers_bf16(tmp_path):
    ref = hf_model().to(torch.bfloat16)
    ours = checkpoints.load_model(saved(ref, tmp_path), dtype="bf16")
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        a, b = ours(ids).float().flatten(), ref(ids).logits.float().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.999


def test_qwen2_flags_come_from_config(tmp_path):
    ours = checkpoints.load_model(saved(hf_model("qwen2"), tmp_path))
    assert ours.config.attention_bias and not ours.config.qk_norm
    assert ours.layers[0].self_attn.q_proj.bias is not None and ours.layers[0].self_attn.o_proj.bias is None


def test_pad_rows_by_hand():
    ids, mask, lab = model.pad_rows([[5, 6], [7]], "left")
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]] and lab is None
    ids, mask, lab = model.pad_rows([[5, 6], [7]], "right", pad_id=9, labels=[[-100, 6], [7]])
    assert ids.tolist() == [[5, 6], [7, 9]] and mask.tolist() == [[1, 1], [1, 0]]
    assert lab.tolist() == [[-100, 6], [7, model.IGNORE_INDEX]]
    with pytest.raises(ValueError, match="padding side"):
        model.pad_rows([[1]], "middle")


def test_left_padded_batch_equals_each_row_alone(tmp_path):
    ours = checkpoints.load_model(saved(hf_model(), tmp_path))
    rows = [torch.randint(0, VOCAB, (n,)) for n in (9, 4, 7)]
    ids, mask, _ = model.pad_rows([r.tolist() for r in rows], "left")
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = ours(r[None])[0]
            assert (batch[i, -len(r):] - alone).abs().max() < 1e-5


def test_kv_cache_decode_equals_full_forward(tmp_path):
    ours = checkpoints.load_model(saved(hf_model(), tmp_path))
    rows = [torch.randint(0, VOCAB, (n,)).tolist() for n in (10, 6)]
    ids, mask, _ = model.pad_rows(rows, "left")
    T = ids.shape[1]
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)                      # (B, T, V)
        cache = model.KVCache(2, T, ours.config)
        prefix = 5
        step = ours(ids[:, :prefix], attention_mask=mask[:, :prefix], kv_cache=cache)
        assert (step - full[:, :prefix]).abs().max() < 1e-5
        for t in range(prefix, T):                                 # one token at a time
            step = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache)
            assert (step[:, 0] - full[:, t]).abs().max() < 1e-5
    assert cache.pos == T


def test_kv_cache_overflow_is_an_error():
    cfg = model.Qwen3Config.preset("tiny", vocab_size=VOCAB)
    cache = model.KVCache(1, 4, cfg)
    with pytest.raises(ValueError, match="KV cache full"):
        model.Qwen3(cfg)(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_checkpoints_load(tmp_path, tied):
    ref = hf_model(tied=tied)
    path = saved(ref, tmp_path, max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    ours = checkpoints.load_model(path)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4


def _edit_checkpoint(path, edit):
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight|layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}), "layers.0.extra.weight"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(65)}), "norm.weight: checkpoint \\(65,\\)"),
])
def test_bad_keys_raise_one_error_naming_the_key(tmp_path, edit, needle):
    path = saved(hf_model(), tmp_path)
    _edit_checkpoint(path, edit)
    with pytest.raises(checkpoints.CheckpointError, match=needle):
        checkpoints.load_model(path)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no config.json"):
        checkpoints.load_model(str(tmp_path))
    with pytest.raises(checkpoints.CheckpointError, match="not a checkpoint folder"):
        checkpoints.load_model(str(tmp_path / "nowhere"))


def test_save_reload_round_trip_is_exact_and_transformers_reads_it(tmp_path):
    ours = checkpoints.load_model(saved(hf_model(tied=False), tmp_path / "a"))
    checkpoints.save_model(ours, tmp_path / "b", max_shard_bytes=50_000)
    assert os.path.exists(tmp_path / "b" / "model.safetensors.index.json")
    again = checkpoints.load_model(str(tmp_path / "b"))
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    hf = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert (again(ids) - hf(ids).logits).abs().max() < 1e-4


def test_config_round_trip_through_json():
    cfg = model.Qwen3Config.preset("8B")
    again = checkpoints.qwen3_from_hf(json.loads(json.dumps(checkpoints.qwen3_to_hf(cfg))))
    assert again == cfg


@pytest.mark.parametrize("size", ["0.6B", "1.7B", "4B", "8B"])
def test_real_shape_parameter_count_equals_transformers(size):
    cfg = model.Qwen3Config.preset(size)
    with torch.device("meta"):
        ours = model.Qwen3(cfg)
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**checkpoints.qwen3_to_hf(cfg)))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(ours) == count(hf)
    if size == "0.6B":
        assert ours.layers[0].self_attn.q_proj.weight.shape == (16 * 128, 1024)   # q_proj out != hidden


def test_encode_puts_the_image_sentinel_where_image_marks_stand():
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert model.encode(tok, "a <image> b<image>") == [0, model.IMAGE_TOKEN_ID, 1, model.IMAGE_TOKEN_ID]


def test_a_hub_failure_is_one_line_naming_the_id(monkeypatch):
    """huggingface_hub's offline / not-found errors span several lines; the CheckpointError is one."""
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find the requested files\nin the local cache.\n"
                                                             "Please check your connection.")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.load_model("owner/name")
    assert "\n" not in str(err.value) and str(err.value).startswith("owner/name: could not fetch from the hub")


def test_one_device_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert checkpoints.device_and_dtype("auto") == ("cpu", "float32") and checkpoints.device_and_dtype(None, "bfloat16") == ("cpu",
                                                                                                         "bfloat16")
    with pytest.raises(ValueError, match="CUDA is not available"):
        checkpoints.device_and_dtype("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert checkpoints.device_and_dtype("auto") == ("cuda", "bfloat16") and checkpoints.device_and_dtype("cpu") == ("cpu", "float32")


def _corrupt(folder, name, edit):
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(edit(data))


def _retyped(key, value):
    return lambda data: json.dumps({**json.loads(data), key: value}).encode()


@pytest.mark.parametrize("name,edit,needle", [
    ("config.json", lambda d: d[:len(d) // 2], r"config\.json: not valid JSON"),
    ("config.json", lambda d: b"\xff\xfe garbage", r"config\.json: not UTF-8"),
    ("config.json", lambda d: b"[1, 2]", r"config\.json: expected a JSON object, got a list"),
    ("config.json", _retyped("num_hidden_layers", "two"), r"config\.json: num_hidden_layers is 'two', expected int"),
    ("config.json", _retyped("tie_word_embeddings", 1), r"config\.json: tie_word_embeddings is 1, expected bool"),
    ("config.json", _retyped("rope_parameters", "big"), r"config\.json: 'str' object has no attribute"),
    ("model.safetensors", lambda d: d[:len(d) // 2], r"model\.safetensors: not a readable safetensors file"),
    ("model.safetensors", lambda d: (2**40).to_bytes(8, "little") + d[8:], r"model\.safetensors: not a readable"),
    ("model.safetensors", lambda d: __import__("pickle").dumps({"w": [1.0]}), r"model\.safetensors: not a readable"),
])
def test_a_corrupt_checkpoint_file_is_one_error_naming_it(tmp_path, name, edit, needle):
    checkpoints.save_model(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=VOCAB)), tmp_path)
    _corrupt(tmp_path, name, edit)
    with pytest.raises(checkpoints.CheckpointError, match=needle) as e:
        checkpoints.load_model(str(tmp_path))
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d[:len(d) // 2], r"index\.json: not valid JSON"),
    (lambda d: b'{"weight_map": {"embed_tokens.weight": "../elsewhere.safetensors"}}', r"index\.json: weight_map must"),
])
def test_a_corrupt_shard_index_is_one_error_naming_it(tmp_path, edit, needle):
    checkpoints.save_model(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=VOCAB)), tmp_path, max_shard_bytes=20_000)
    _corrupt(tmp_path, "model.safetensors.index.json", edit)
    with pytest.raises(checkpoints.CheckpointError, match=needle):
        checkpoints.load_model(str(tmp_path))
