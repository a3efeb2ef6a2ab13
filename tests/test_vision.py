"""SigLIP tower and image preprocessing: parity with transformers, and clear errors on bad files."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from weights import checkpoints
import vision
from storage import records
from vision import SiglipConfig, SiglipVisionTower

transformers = pytest.importorskip("transformers")


def hf_vision_model(config, seed=0):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(seed)
    hf = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in checkpoints.siglip_to_hf(config).items() if k != "model_type"},
                                              vision_use_head=False)).eval()
    for p in hf.parameters():  # transformers' init leaves biases at 0 and LayerNorms at 1: randomise all
        p.data.normal_(0, 0.05)
    return hf


def tower_from_hf(hf, config):
    ours = SiglipVisionTower(config).eval()
    state = {}
    for k, v in hf.state_dict().items():
        k = k.removeprefix("vision_model.").replace("encoder.layers.", "layers.")
        if k.startswith("layers.") and int(k.split(".")[1]) >= config.num_layers_used:
            continue  # the last layer is never built (its output is not used)
        state[k] = v
    ours.load_state_dict(state, strict=True)
    return ours


def test_tower_matches_transformers_hidden_states_minus_2():
    config = SiglipConfig.preset("tiny")
    hf = hf_vision_model(config)
    ours = tower_from_hf(hf, config)
    pixels = torch.randn(3, 3, config.image_size, config.image_size)
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = ours(pixels)
    assert got.shape == (3, config.patches_per_side ** 2, config.hidden_size)
    assert (got - want).abs().max().item() <= 1e-4


def test_tower_never_applies_post_layernorm_but_keeps_its_weights():
    ours = SiglipVisionTower(SiglipConfig.preset("tiny"))
    assert "post_layernorm.weight" in ours.state_dict()
    assert len(ours.layers) == ours.config.num_hidden_layers - 1


def test_tower_rejects_wrong_pixel_shape():
    ours = SiglipVisionTower(SiglipConfig.preset("tiny"))
    with pytest.raises(ValueError, match="expects pixels"):
        ours(torch.zeros(1, 3, 32, 32))


def test_config_round_trip_and_llava_onevision_depth():
    so400m = SiglipConfig.preset("so400m")
    assert (so400m.hidden_size, so400m.intermediate_size, so400m.num_hidden_layers, so400m.num_attention_heads,
            so400m.patches_per_side, so400m.num_layers_used) == (1152, 4304, 27, 16, 27, 26)
    assert checkpoints.siglip_from_hf(checkpoints.siglip_to_hf(so400m)) == so400m
    assert checkpoints.siglip_from_hf({"model_type": "siglip", "vision_config": checkpoints.siglip_to_hf(so400m)}) == so400m
    # transformers' LLaVA-OneVision stores the already-cut 26-layer tower and reads its last layer
    assert checkpoints.siglip_from_hf({**checkpoints.siglip_to_hf(so400m), "num_hidden_layers": 26}, feature_layer=-1) == so400m


def _images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (29, 41, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (40, 23), dtype=np.uint8), "L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 3
    cmyk = rgb.convert("CMYK")
    return {"RGB": rgb, "RGBA": rgba, "L": gray, "P": palette, "P+transparency": palette_transparent, "CMYK": cmyk}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "P+transparency", "CMYK"])
def test_preprocess_matches_transformers_siglip_processor(mode):
    from transformers import SiglipImageProcessorPil
    processor = SiglipImageProcessorPil(size={"height": 384, "width": 384})
    image = _images()[mode]
    want = processor(image, return_tensors="pt")["pixel_values"][0]
    got = vision.preprocess(image, 384)
    assert got.shape == (3, 384, 384) and got.dtype == torch.float32
    assert torch.equal(got, want) or (got - want).abs().max().item() <= 1e-6


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (7, 5), 200).save(path)
    image = vision.load_image(path)
    assert image.mode == "RGB" and image.size == (7, 5) and image.getpixel((0, 0)) == (200, 200, 200)


def test_load_image_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ValueError, match="nope.jpg"):
        vision.load_image(path)


def test_load_image_corrupt_file_names_it(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="garbage.png"):
        vision.load_image(path)


def test_load_image_truncated_file_names_it(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg"):
        vision.load_image(path)


def test_load_image_over_pixel_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(ValueError, match=r"big.png: 200x100 = 20000 pixels is over the limit of 10000"):
        vision.load_image(path, max_pixels=10_000)
    assert vision.load_image(path, max_pixels=20_000).size == (200, 100)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    tower = vision.SiglipVisionTower(vision.SiglipConfig.preset("tiny")).train()
    pixels = torch.randn(2, 3, 56, 56)
    grads = []
    for flag in (False, True):
        tower.zero_grad()
        tower.grad_checkpointing = flag
        tower(pixels).square().sum().backward()
        grads.append([p.grad.clone() for p in tower.layers.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    """A 0..65535 ramp saved as a 16-bit PNG loads as a 0..255 ramp (PIL's convert("RGB") saturates it)."""
    ramp = (np.arange(1024, dtype=np.uint32).reshape(4, 256) * 64).astype(np.uint16)   # 0 .. 65472
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    out = np.asarray(vision.load_image(str(path)))
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert out.shape == (4, 256, 3) and (out[..., 0] == expected).all() and (out[..., 0] == out[..., 2]).all()


def exif_rotated_png(path):
    """A 4x2 image, red left half, tagged "rotate 90 CW to view" (EXIF orientation 6)."""
    image = Image.new("RGB", (4, 2), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 2, 2))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_is_ignored_by_default_and_honoured_on_request(tmp_path):
    path = exif_rotated_png(tmp_path / "rot.png")
    assert vision.load_image(path).size == (4, 2)                       # the release's behaviour
    turned = vision.load_image(path, exif_transpose=True)
    assert turned.size == (2, 4) and turned.getpixel((0, 0)) == (255, 0, 0) and turned.getpixel((0, 3)) == (0, 0, 255)
    assert vision.load_image(path.read_bytes(), exif_transpose=True).tobytes() == turned.tobytes()


def test_image_paths_stay_inside_the_image_folder(tmp_path):
    folder = str(tmp_path / "imgs")
    assert records.resolve_image_path(folder, "a/b.png", "record x") == os.path.join(folder, "a/b.png")
    assert records.resolve_image_path(folder, "a/../b.png", "record x") == os.path.join(folder, "a/../b.png")
    inside = os.path.join(folder, "c.png")
    assert records.resolve_image_path(folder, inside, "record x") == inside     # absolute, but inside
    for bad in ("../secret.png", "a/../../secret.png", "/etc/passwd"):
        with pytest.raises(ValueError, match=r"record x: image path .* is outside the image folder .*"
                                             r"--allow-outside-images"):
            records.resolve_image_path(folder, bad, "record x")
        assert records.resolve_image_path(folder, bad, "record x", allow_outside=True) == os.path.join(folder, bad)
    with pytest.raises(ValueError, match="record x: image path must be a non-empty string"):
        records.resolve_image_path(folder, 3, "record x")


def test_one_pixel_limit_for_files_and_bytes(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    monkeypatch.setattr(vision, "MAX_PIXELS", 10_000)   # the default every caller gets
    for source in (path, str(path), path.read_bytes()):
        with pytest.raises(ValueError, match="20000 pixels is over the limit of 10000"):
            vision.load_image(source)
