"""The VLM: logits parity with transformers' LlavaOnevisionForConditionalGeneration (tiny random weights),
checkpoint layouts (released LLaVA-NeXT, transformers, standalone SigLIP + Qwen3) and bad-input errors."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import anyres
from weights import checkpoints
import model
from model import IMAGE_TOKEN_ID
from vlm import VLM, build_vlm
from vision import SiglipConfig
from _tiny_llava import TILE, VISION, llava_onevision_config, text_config

transformers = pytest.importorskip("transformers")

VOCAB, HF_IMAGE_ID = 128, 127   # transformers needs an in-vocab image token; ours is the -200 sentinel
TEXT = text_config(VOCAB, rope_theta=1e6)


def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.data.copy_(1 + noise if "norm" in name else noise)   # norms near 1, everything else small


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random transformers LLaVA-OneVision (Qwen3 + SigLIP), saved with save_pretrained."""
    from transformers import LlavaOnevisionForConditionalGeneration
    config = llava_onevision_config(TEXT, HF_IMAGE_ID)
    torch.manual_seed(0)
    hf = LlavaOnevisionForConditionalGeneration(config).eval()
    randomise(hf, seed=0)
    folder = tmp_path_factory.mktemp("hf_llava_ov")
    hf.save_pretrained(folder)
    return hf, str(folder)


@pytest.fixture(scope="module")
def ours(hf_checkpoint):
    return checkpoints.load_model(hf_checkpoint[1])


def image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def text(n, seed):
    return torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(hf, vlm, ids, images, padding_side, image_id=HF_IMAGE_ID):
    """Run transformers on the same tiles: -200 expanded into runs of image_id of the documented length."""
    pixels, _, sizes = vlm.image_pixels(images)
    counts = iter(anyres.image_token_count(w, h, image_aspect_ratio="anyres_max_9" if len(row) == 1 else "pad",
                                           tile_size=TILE) for row in images for w, h in [im.size for im in row])
    rows = [[t for tok in row for t in ([image_id] * next(counts) if tok == IMAGE_TOKEN_ID else [tok])]
            for row in ids]
    T = max(map(len, rows))
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(T - len(row), T) if padding_side == "left" else slice(0, len(row))
        input_ids[b, span], mask[b, span] = torch.tensor(row), 1
    with torch.no_grad():
        out = hf(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 pixel_values=pixels, image_sizes=torch.tensor([[h, w] for w, h in sizes]),
                 batch_num_images=torch.tensor([len(row) for row in images]))
    return out.logits, mask


def our_logits(vlm, ids, images, padding_side):
    with torch.no_grad():
        batch = vlm.prepare_inputs(ids, images, padding_side=padding_side)
        return vlm.llm(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]), batch


def assert_parity(hf, vlm, ids, images, padding_side="left", image_id=HF_IMAGE_ID):
    got, batch = our_logits(vlm, ids, images, padding_side)
    want, mask = hf_logits(hf, vlm, ids, images, padding_side, image_id)
    assert got.shape == want.shape
    assert torch.equal(batch["attention_mask"], mask)
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("size", [(150, 100), (300, 280)])   # 3x2 tiles; 6x5 tiles, unpadded then downscaled
def test_single_image_logits_match_transformers(hf_checkpoint, ours, size):
    ids = [text(3, 1) + [IMAGE_TOKEN_ID] + text(6, 2)]
    assert_parity(hf_checkpoint[0], ours, ids, [[image(*size, 0)]])


def test_two_images_in_one_prompt_match_transformers(hf_checkpoint, ours):
    ids = [text(2, 3) + [IMAGE_TOKEN_ID] + text(3, 4) + [IMAGE_TOKEN_ID] + text(4, 5)]
    assert_parity(hf_checkpoint[0], ours, ids, [[image(90, 130, 1), image(70, 40, 2)]])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_of_two_samples_matches_transformers(hf_checkpoint, ours, padding_side):
    ids = [[IMAGE_TOKEN_ID] + text(4, 6),
           text(9, 7) + [IMAGE_TOKEN_ID] + text(2, 8) + [IMAGE_TOKEN_ID] + text(5, 9)]
    images = [[image(200, 60, 3)], [image(64, 64, 4), image(40, 90, 5)]]
    assert_parity(hf_checkpoint[0], ours, ids, images, padding_side)


# ----------------------------------------------------------------------------- checkpoint layouts

def test_released_and_transformers_layouts_give_identical_logits(hf_checkpoint, ours, tmp_path):
    checkpoints.save_model(ours, str(tmp_path / "released"))
    released = checkpoints.load_model(str(tmp_path / "released"))
    # transformers' in-memory names (model.language_model.*, model.vision_tower.*, tied lm_head.weight present)
    from safetensors.torch import save_file
    memory = tmp_path / "hf_memory_names"
    memory.mkdir()
    save_file({k: v.clone() for k, v in hf_checkpoint[0].state_dict().items()}, str(memory / "model.safetensors"))
    (memory / "config.json").write_text((open(os.path.join(hf_checkpoint[1], "config.json")).read()))
    in_memory = checkpoints.load_model(str(memory))
    ids = [text(3, 10) + [IMAGE_TOKEN_ID] + text(3, 11)]
    images = [[image(120, 80, 6)]]
    want, _ = our_logits(ours, ids, images, "left")
    for other in (released, in_memory):
        assert isinstance(other, VLM)
        assert torch.equal(our_logits(other, ids, images, "left")[0], want)


def test_saved_layout_uses_released_names_and_config(ours, tmp_path):
    from safetensors.torch import load_file
    checkpoints.save_model(ours, str(tmp_path))
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    tower = "model.vision_tower.vision_tower.vision_model."
    for key in (tower + "embeddings.patch_embedding.weight", tower + "encoder.layers.1.mlp.fc2.bias",
                tower + "post_layernorm.weight", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                "model.image_newline", "model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight"):
        assert key in keys
    assert "lm_head.weight" not in keys and tower + "encoder.layers.2.mlp.fc2.bias" not in keys
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_patch_merge_type"] == "spatial_unpad"
    assert cfg["image_aspect_ratio"] == "anyres_max_9" and cfg["mm_hidden_size"] == 32
    assert sorted(map(tuple, cfg["image_grid_pinpoints"])) == sorted(anyres.candidate_resolutions(TILE))
    assert "mm_vision_tower" in cfg and cfg["vision_config"]["num_hidden_layers"] == 3


def test_converted_llava_onevision_layout_loads_in_transformers_with_our_logits(tmp_path):
    """convert.py: a tiny VLM (with a real BPE tokenizer) -> transformers' LlavaOnevision layout, sharded; transformers
    loads every weight, its logits on our tiles equal ours, its tokenizer renders llava_chat from the chat template,
    and its image processor (the PIL one: no torchvision here) cuts the pixels we cut."""
    from weights import convert
    import prompts
    from shapes_world import world
    tok = world.train_tokenizer([prompts.llava_chat("<image>\nDescribe the red star.")] * 4, vocab_size=300)
    vlm = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=tok.get_vocab_size() + 2)),
                      SiglipConfig.preset("tiny")).eval()
    randomise(vlm, seed=3)
    checkpoints.save_model(vlm, str(tmp_path / "src"))
    tok.save(str(tmp_path / "src" / "tokenizer.json"))
    out = tmp_path / "ov"
    assert convert.main([str(tmp_path / "src"), str(out), "--max-shard-mb", "0.1"]) == 0
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    hf, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    image_id = hf.config.image_token_index
    assert image_id == tok.get_vocab_size() and hf.config.video_token_index == image_id + 1
    assert_parity(hf.eval(), vlm, [text(3, 1) + [IMAGE_TOKEN_ID] + text(6, 2)], [[image(150, 100, 0)]],
                  image_id=image_id)
    assert_parity(hf, vlm, [[IMAGE_TOKEN_ID] + text(4, 6), text(9, 7) + [IMAGE_TOKEN_ID] + text(2, 8)],
                  [[image(200, 60, 3)], [image(64, 90, 4)]], image_id=image_id)
    again = checkpoints.load_model(str(out))   # ours reads the converted layout back, bit for bit
    ids, images = [text(3, 10) + [IMAGE_TOKEN_ID] + text(3, 11)], [[image(120, 80, 6)]]
    assert torch.equal(our_logits(again, ids, images, "left")[0], our_logits(vlm, ids, images, "left")[0])
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    question = "Describe the red star."
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        prompts.llava_chat("<image>\n" + question)
    assert hf_tok.convert_tokens_to_ids("<image>") == image_id
    assert hf_tok(prompts.llava_chat(question))["input_ids"] == model.encode(tok, prompts.llava_chat(question))
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    photo = image(150, 100, 9)
    got = processor(images=[photo], return_tensors="pt")
    want, _, _ = vlm.image_pixels([[photo]])
    assert torch.equal(got["pixel_values"][0], want) and got["image_sizes"].tolist() == [[100, 150]]


def test_converter_names_what_it_cannot_convert(tmp_path, capsys):
    from weights import convert
    from shapes_world import world
    tok = world.train_tokenizer(["a red star"] * 4, vocab_size=300)
    rows = tok.get_vocab_size()   # every embedding row is a token: none left for the placeholders
    with pytest.raises(ValueError, match=f"fills the model's {rows} embedding rows; .* for <image> and <video>"):
        convert.add_media_tokens(tok, rows, "src")
    checkpoints.save_model(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=300)), str(tmp_path / "llm"))
    assert convert.main([str(tmp_path / "llm"), str(tmp_path / "out")]) == 1
    assert "a text LLM; its Qwen3 layout is already the one engines load" in capsys.readouterr().err


def test_loading_names_missing_and_unexpected_keys(ours, tmp_path):
    from safetensors.torch import load_file, save_file
    checkpoints.save_model(ours, str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.mm_projector.2.bias"]
    state["model.mm_projector.9.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(checkpoints.CheckpointError, match=r"missing keys.*projector\.2\.bias.*unexpected keys.*projector\.9"):
        checkpoints.load_model(str(tmp_path))


def test_released_config_for_so400m_checkpoint():
    cfg = {**checkpoints.qwen3_to_hf(model.Qwen3Config.preset("0.6B")), "model_type": "llava_qwen_3",
           "architectures": ["LlavaQwen3ForCausalLM"],
           "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
           "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_9",
           "image_grid_pinpoints": "(1x1),...,(6x6)", "mm_vision_select_layer": -2}
    config = checkpoints.vlm_from_hf(cfg)
    assert config.vision == SiglipConfig.preset("so400m") and config.llm.qk_norm
    assert config.image_grid_pinpoints == anyres.candidate_resolutions(384)


def test_fresh_assembly_from_standalone_siglip_and_qwen3(tmp_path):
    from transformers import SiglipConfig as HFSiglipConfig, SiglipModel
    torch.manual_seed(0)
    text_cfg = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    siglip = SiglipModel(HFSiglipConfig(text_config=text_cfg, vision_config={**VISION, "num_hidden_layers": 3,
                                                                             "vision_use_head": True}))
    randomise(siglip, seed=1)
    siglip.save_pretrained(tmp_path / "siglip")
    llm = model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=VOCAB))
    checkpoints.save_model(llm, str(tmp_path / "qwen3"))
    vlm = checkpoints.assemble_vlm(str(tmp_path / "siglip"), str(tmp_path / "qwen3"))
    assert len(vlm.vision.layers) == 2      # the last SigLIP layer and the pooling head are dropped
    assert torch.equal(vlm.vision.layers[1].mlp.fc1.weight, siglip.vision_model.encoder.layers[1].mlp.fc1.weight)
    assert torch.equal(vlm.llm.embed_tokens.weight, llm.embed_tokens.weight)
    assert 0.05 < vlm.image_newline.std().item() < 0.3   # ~ N(0, 1/64)
    logits = vlm([text(2, 0) + [IMAGE_TOKEN_ID]], [[image(80, 60, 0)]])
    assert logits.shape == (1, 3 + anyres.image_token_count(80, 60, tile_size=TILE) - 1, VOCAB)
    assert torch.isfinite(logits).all()


def test_build_vlm_from_configs_for_pretraining():
    llm = model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=VOCAB))
    vlm = build_vlm(llm, SiglipConfig.preset("tiny"), image_aspect_ratio="square")
    batch = vlm.prepare_inputs([[IMAGE_TOKEN_ID] + text(3, 0)], [[image(90, 30, 0)]], labels=[[5, 6, 7, 8]],
                               padding_side="right")
    assert batch["inputs_embeds"].shape == (1, 16 + 1 + 3, 64)   # 4x4 patches + newline + text


# ----------------------------------------------------------------------------- splicing details and bad input

def test_labels_ignore_image_and_pad_positions(ours):
    ids = [[1, IMAGE_TOKEN_ID, 2, 3], [4, 5]]
    images = [[image(56, 56, 0)], []]
    batch = ours.prepare_inputs(ids, images, labels=[[-100, 0, 12, 13], [14, 15]], padding_side="right")
    n = anyres.image_token_count(56, 56, tile_size=TILE)
    assert batch["labels"][0].tolist() == [-100] * (1 + n) + [12, 13]
    assert batch["labels"][1].tolist() == [14, 15] + [-100] * (n + 1)
    assert batch["attention_mask"].sum(1).tolist() == [n + 3, 2]
    assert torch.equal(batch["inputs_embeds"][1, 2:], torch.zeros_like(batch["inputs_embeds"][1, 2:]))
    assert torch.equal(batch["inputs_embeds"][1, :2], ours.llm.embed_tokens.weight[[4, 5]])


def test_generate_accepts_images_and_agrees_with_forward(ours):
    ids = [text(3, 1) + [IMAGE_TOKEN_ID] + text(2, 2), text(6, 3)]
    images = [[image(100, 70, 1)], []]
    new = ours.generate(ids, images, max_new_tokens=1, stop_ids=set())
    with torch.no_grad():
        last = ours(ids, images)[:, -1].argmax(-1).tolist()
    assert [row[0] for row in new] == last


def test_image_count_mismatch_is_a_clear_error(ours):
    with pytest.raises(ValueError, match="row 0: the prompt has 1 <image> marks but 2 images"):
        ours.prepare_inputs([[1, IMAGE_TOKEN_ID]], [[image(30, 30, 0), image(30, 30, 1)]])


def test_image_over_pixel_limit_is_a_clear_error(ours):
    ours.max_pixels = 1000
    try:
        with pytest.raises(ValueError, match=r"row 0 image 0: 50x40 = 2000 pixels is over the limit of 1000"):
            ours.prepare_inputs([[IMAGE_TOKEN_ID]], [[image(50, 40, 0)]])
    finally:
        ours.max_pixels = None


def test_corrupt_image_file_error_names_the_file(tmp_path):
    from vision import load_image
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(path)


# ----------------------------------------------------------------------------- the training fast paths

def _expand_reference(ids, lengths, labels):
    """The token-by-token splice prepare_inputs used before it was vectorised (kept here as the reference)."""
    lengths, rows = iter(lengths), []
    for r, row in enumerate(ids):
        out_ids, out_labels = [], []
        for j, tok in enumerate(row):
            n = next(lengths) if tok == IMAGE_TOKEN_ID else 1
            out_ids += [tok] * n
            out_labels += [-100 if tok == IMAGE_TOKEN_ID or labels is None else labels[r][j]] * n
        rows.append((out_ids, out_labels))
    return rows


def test_vectorised_expand_matches_the_token_by_token_reference():
    g = torch.Generator().manual_seed(0)
    ids = [text(3, 1) + [IMAGE_TOKEN_ID] + text(5, 2), [IMAGE_TOKEN_ID, IMAGE_TOKEN_ID] + text(4, 3), text(6, 4), []]
    labels = [[t if torch.rand(1, generator=g).item() < 0.5 else -100 for t in row] for row in ids]
    lengths = [17, 5, 9]
    for lab in (labels, None):
        got = VLM._expand([torch.tensor(r, dtype=torch.long) for r in ids], lengths,
                            None if lab is None else [torch.tensor(r, dtype=torch.long) for r in lab])
        assert [(a.tolist(), b.tolist()) for a, b in got] == _expand_reference(ids, lengths, lab)


def test_tiled_images_give_the_pixels_of_fresh_preprocessing(ours):
    """A TiledImage (what train.py caches per file: uint8 tiles) gives bit for bit the pixels of preprocessing the
    PIL image per tile as before, and prepare_inputs takes it wherever it takes the PIL image."""
    from vision import preprocess
    rows = [[image(150, 100, 0)], [image(60, 40, 1), image(40, 70, 2)]]          # anyres; two images: pad
    for row in rows:
        for im in row:
            mode = ours.tiling_mode(len(row))
            tiles = anyres.image_tiles(im, mode, ours.config.image_grid_pinpoints, TILE)
            fresh = torch.stack([preprocess(t, TILE) for t in tiles])
            tiled = ours.tile_image(im, len(row), key="x")
            assert tiled.tiles.dtype == torch.uint8 and tiled.size == im.size and tiled.mode == mode
            assert torch.equal(ours.image_pixels([[tiled] * len(row)])[0][:len(tiles)], fresh)
            assert torch.equal(ours.image_pixels([[im] * len(row)])[0], ours.image_pixels([[tiled] * len(row)])[0])
    ids = [text(3, 1) + [IMAGE_TOKEN_ID] + text(2, 2), [IMAGE_TOKEN_ID] + text(2, 3) + [IMAGE_TOKEN_ID]]
    tiled = [[ours.tile_image(im, len(row)) for im in row] for row in rows]
    with torch.no_grad():
        a = ours.prepare_inputs(ids, rows, padding_side="right")["inputs_embeds"]
        b = ours.prepare_inputs(ids, tiled, padding_side="right")["inputs_embeds"]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tiled for 'anyres'"):     # cut for a single-image row, used in a pair
        ours.prepare_inputs([[IMAGE_TOKEN_ID, IMAGE_TOKEN_ID]], [[tiled[0][0], tiled[0][0]]])


def test_feature_cache_serves_only_a_frozen_unchanged_tower():
    """A FeatureCache set as VLM.feature_cache holds tower outputs per image key: used while no tower parameter
    requires grad, never when the tower trains, shared by any model with the same tower weights, and never read
    once the frozen tower's weights change (no stale features)."""
    from training.caches import FeatureCache
    torch.manual_seed(0)
    vlm = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=VOCAB)), SiglipConfig.preset("tiny"))
    images = [[vlm.tile_image(image(90, 60, 0), key="a")], [vlm.tile_image(image(60, 60, 1), key="b")]]

    def encode():
        return torch.cat(vlm.encode_images(images))

    fresh = encode()                                             # no cache: the reference
    vlm.feature_cache = features = FeatureCache(2**24)
    cache = features.lru
    out = encode()                                               # the tower trains: the cache stays out of it
    assert len(cache) == 0 and cache.hits == cache.misses == 0 and torch.equal(out, fresh)
    out.sum().backward()
    assert vlm.vision.layers[0].mlp.fc1.weight.grad is not None   # and the gradient reaches the tower
    vlm.vision.requires_grad_(False)
    assert torch.equal(encode(), fresh) and len(cache) == 2 and cache.misses == 2
    assert torch.equal(encode(), fresh) and cache.hits == 2       # frozen: served from the cache, same bits
    twin = build_vlm(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=VOCAB)), SiglipConfig.preset("tiny"))
    twin.load_state_dict(vlm.state_dict())
    twin.requires_grad_(False)
    twin.feature_cache = features                                 # another model, the same tower weights: shared
    assert torch.equal(torch.cat(twin.encode_images(images)), fresh) and cache.hits == 4 and cache.misses == 2
    with torch.no_grad():
        vlm.vision.layers[0].mlp.fc1.weight.mul_(1.5)             # the frozen tower changes in place ...
    vlm.feature_cache = None
    changed = encode()
    vlm.feature_cache = features
    assert not torch.equal(changed, fresh)
    assert torch.equal(encode(), changed) and cache.misses == 4   # ... so its old entries are not served
    vlm.vision.requires_grad_(True)
    hits = cache.hits
    assert torch.equal(encode(), changed) and cache.hits == hits  # training again: not used
