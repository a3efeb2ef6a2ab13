"""Benchmark the perception front end: SigLIP so400m on one 384 tile, ours vs transformers (same weights, same
run, fp32), and the whole stage-1 vision cost of a 10-tile image (AnyRes tiling + preprocessing + tower +
projector + packing). Random weights: nothing is downloaded. Prints a markdown table (--json for machines).

    python -m bench.bench_vision            # ~3 min on 2 CPU cores
    python -m bench.bench_vision --repeats 1 --layers 4   # quick smoke run (fewer layers: not the real cost)
"""
import argparse
import json
import platform

import numpy as np
import torch
from PIL import Image

import anyres
from weights import checkpoints
import model
from vlm import build_vlm
from bench._common import best_time
from vision import SiglipConfig, SiglipVisionTower




def transformers_tower(ours):
    """transformers SiglipVisionModel cut as LLaVA cuts it (26 layers, no head), holding our weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    c = ours.config
    cfg = SiglipVisionConfig(**{k: v for k, v in checkpoints.siglip_to_hf(c).items() if k != "model_type"}, vision_use_head=False)
    cfg.num_hidden_layers = c.num_layers_used
    hf = SiglipVisionModel(cfg).eval()
    prefix = "vision_model." if next(iter(hf.state_dict())).startswith("vision_model.") else ""  # 4.x vs 5.x names
    state = {prefix + ("encoder." + k if k.startswith("layers.") else k): v for k, v in ours.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    return hf


def bench_tile(tower, hf, repeats):
    size = tower.config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        diff = (tower(pixels) - hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]).abs().max()
        ours_s = best_time(lambda: tower(pixels), repeats)
        hf_s = best_time(lambda: hf(pixel_values=pixels, output_hidden_states=True), repeats)
    return ours_s, hf_s, diff.item()


def bench_stage1(vlm, width, height, repeats):
    """One image -> its LLM tokens; timed in three parts."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    with torch.inference_mode():
        prep_s = best_time(lambda: vlm.image_pixels([[image]]), repeats, warmup=0)
        pixels, counts, sizes = vlm.image_pixels([[image]])
        tower_s = best_time(lambda: vlm.vision(pixels), repeats, warmup=0)
        feats = vlm.vision(pixels)
        pack_s = best_time(lambda: vlm.pack(vlm.projector(feats), sizes[0]), repeats, warmup=0)
        tokens = vlm.pack(vlm.projector(feats), sizes[0]).shape[0]
    return dict(tiles=counts[0], tokens=tokens, preprocess_s=prep_s, tower_s=tower_s, projector_pack_s=pack_s,
                total_s=prep_s + tower_s + pack_s)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the best is kept)")
    p.add_argument("--layers", type=int, default=None, help="override the tower depth (smoke runs only)")
    p.add_argument("--image", default="1100x1000", help="WxH of the stage-1 image (default: 3x3 grid = 10 tiles)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = {} if args.layers is None else {"num_hidden_layers": args.layers + 1}
    tower = SiglipVisionTower(SiglipConfig.preset("so400m", **overrides)).eval()
    hf = transformers_tower(tower)
    ours_s, hf_s, diff = bench_tile(tower, hf, args.repeats)
    del hf
    llm = model.Qwen3(model.Qwen3Config.preset("tiny", hidden_size=1024))   # only its hidden size matters here
    vlm = build_vlm(llm, tower).eval()
    width, height = map(int, args.image.lower().split("x"))
    stage1 = bench_stage1(vlm, width, height, args.repeats)
    result = dict(tile_ours_s=ours_s, tile_transformers_s=hf_s, speed_ratio=hf_s / ours_s, max_abs_diff=diff,
                  image=f"{width}x{height}", expected_tokens=anyres.image_token_count(width, height), **stage1,
                  layers=tower.config.num_layers_used, threads=torch.get_num_threads(),
                  cpu=platform.processor() or platform.machine(), torch=torch.__version__)
    if args.json:
        print(json.dumps(result))
        return
    print(f"SigLIP so400m ({result['layers']} layers), fp32, CPU, {result['threads']} threads, "
          f"torch {torch.__version__}, best of {args.repeats}\n")
    print("| measurement | time | note |\n|---|---|---|")
    print(f"| one 384 tile, ours | {ours_s * 1e3:.0f} ms | max abs diff vs transformers {diff:.1e} |")
    print(f"| one 384 tile, transformers SiglipVisionModel | {hf_s * 1e3:.0f} ms | ratio transformers/ours "
          f"= {hf_s / ours_s:.2f}x |")
    print(f"| stage-1 image {width}x{height}: tiling + preprocess | {stage1['preprocess_s'] * 1e3:.0f} ms | "
          f"{stage1['tiles']} tiles (base + grid) |")
    print(f"| stage-1 image {width}x{height}: tower | {stage1['tower_s'] * 1e3:.0f} ms | |")
    print(f"| stage-1 image {width}x{height}: projector + AnyRes packing | {stage1['projector_pack_s'] * 1e3:.0f} ms"
          f" | {stage1['tokens']} tokens |")
    print(f"| stage-1 image {width}x{height}: total | {stage1['total_s']:.2f} s | |")


if __name__ == "__main__":
    main()
