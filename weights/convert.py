"""Write a VLM in transformers' LlavaOnevision layout, the one vLLM and SGLang load (the released Extract+Think
checkpoints are in the LLaVA-NeXT layout, which they do not read), or in the released layout.

    python -m weights.convert markendo/llava-extract-qwen3-0.6B runs/extract-0.6B-ov --dtype bfloat16
    vllm serve runs/extract-0.6B-ov --port 8001
    python evaluate.py --mode stage1 --perception-url http://localhost:8001/v1 --perception runs/extract-0.6B-ov ...

What it writes (--layout llava-onevision, the default):
  config.json, model*.safetensors    checkpoints.save_model(layout="llava-onevision"): the llava-hf hub key names,
                                     the tower as deep as LLaVA reads it; sharded above --max-shard-mb
  tokenizer.json                     the checkpoint's, plus "<image>" and "<video>" (special) in the first free
                                     embedding rows: engines need in-vocabulary ids (ours is the -200 sentinel)
  tokenizer_config.json, chat_template.jinja    prompts.LLAVA_CHAT_TEMPLATE, which renders prompts.llava_chat
  preprocessor_config.json, processor_config.json    LlavaOnevisionProcessor: the tile size, bicubic resize,
                                     SigLIP's mean and std, the checkpoint's grid pinpoints as (height, width)
  generation_config.json             stop at <|im_end|> / <|endoftext|>, as reason.py's generation does
checkpoints.load_model reads the result back (it loads both layouts).

Known differences:
  - transformers' unpad (and the engines' ports of it) rounds the kept part of a padded grid with int(round(x, 7))
    where the release truncates (anyres.unpad_bounds). On rare image sizes (47x423 is one) an engine keeps a row
    or column of patches more than the release, so that image gets other features and tokens.
  - the pixels: transformers 5 picks the image processor's backend when it loads it, never from these files
    (5.23's AutoImageProcessor: the caller's backend="pil" / use_fast=False, else torchvision where installed,
    else PIL). Torchvision's bicubic resize differs from the release's PIL one (1-2 levels on ~0.7 % of pixel
    values; 20 % on a 47x423 one); the PIL processor gives the release's pixels exactly (tests/test_remote.py).
    The processor servers load, AutoProcessor.from_pretrained(folder), needs torchvision anyway (the video
    processor) and so takes the torchvision image processor, unless loaded with use_fast=False (backend="pil"
    fails there: the video processor has no PIL backend). So ask the server for use_fast=False where it lets you
    (vLLM's --mm-processor-kwargs; not checked here); transformers serve has no such option.
"""
import argparse
import os
import sys

from tokenizers import AddedToken

import pipeline
import prompts
import vision
from storage import records
from vlm import VLM
from weights import checkpoints

MEDIA_TOKENS = ("<image>", "<video>")   # the LlavaOnevision processor's placeholders, one embedding row each


def add_media_tokens(tokenizer, vocab_size, source):
    """Add "<image>" and "<video>" as special tokens where the tokenizer lacks them -> their ids, each of which must
    have an embedding row (vocab_size: the model's)."""
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MEDIA_TOKENS
                                  if tokenizer.token_to_id(t) is None])
    ids = [tokenizer.token_to_id(t) for t in MEDIA_TOKENS]
    if max(ids) >= vocab_size:
        raise ValueError(f"{source}: its tokenizer already fills the model's {vocab_size} embedding rows; the "
                         f"LlavaOnevision layout needs a free row each for {' and '.join(MEDIA_TOKENS)}")
    return ids


def processor_files(config):
    """VLMConfig -> {file name: JSON object} of transformers' LlavaOnevisionProcessor (4.x and 5.x read these)."""
    tile, patches = config.vision.image_size, config.vision.image_size // config.vision.patch_size
    image = {"image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor",
             "do_convert_rgb": True, "do_resize": True, "size": {"height": tile, "width": tile},
             "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,   # 3: bicubic
             "image_mean": [vision.PIXEL_MEAN] * 3, "image_std": [vision.PIXEL_STD] * 3, "do_pad": True,
             "image_grid_pinpoints": [[h, w] for w, h in config.image_grid_pinpoints]}
    processor = {"processor_class": "LlavaOnevisionProcessor", "image_token": MEDIA_TOKENS[0],
                 "video_token": MEDIA_TOKENS[1], "num_image_tokens": patches * patches,
                 "vision_feature_select_strategy": "full", "vision_aspect_ratio": config.image_aspect_ratio}
    return {"preprocessor_config.json": image, "processor_config.json": processor}


def convert(src, out, layout="llava-onevision", dtype=None, max_shard_bytes=5 * 2**30):
    """Load the VLM at src (folder or hub id, either layout) and write it to out in `layout`."""
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise ValueError(f"{out}: the output folder is the source; write the converted checkpoint elsewhere")
    net = checkpoints.load_model(src, dtype=dtype)
    if not isinstance(net, VLM):
        raise ValueError(f"{src}: a text LLM; its Qwen3 layout is already the one engines load")
    tok = checkpoints.load_tokenizer(src)
    os.makedirs(out, exist_ok=True)
    if layout == "released":
        checkpoints.save_model(net, out, max_shard_bytes)
        records.atomic_write(os.path.join(out, "tokenizer.json"), tok.save)
        return
    ids = add_media_tokens(tok, net.config.llm.vocab_size, src)
    checkpoints.save_model(net, out, max_shard_bytes, layout, ids)
    records.atomic_write(os.path.join(out, "tokenizer.json"), tok.save)
    stops = sorted(pipeline.stop_ids(tok))
    if tok.token_to_id(prompts.IM_END) is None:
        raise ValueError(f"{src}: its tokenizer has no {prompts.IM_END} token (the chat's end of turn)")
    pad = "<|endoftext|>" if tok.token_to_id("<|endoftext|>") is not None else prompts.IM_END
    files = {**processor_files(net.config),
             "tokenizer_config.json": {
                 "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "LlavaOnevisionProcessor",
                 "bos_token": None, "eos_token": prompts.IM_END, "pad_token": pad, "unk_token": None,
                 "model_max_length": net.config.llm.max_position_embeddings, "clean_up_tokenization_spaces": False,
                 "extra_special_tokens": {"image_token": MEDIA_TOKENS[0], "video_token": MEDIA_TOKENS[1]},
                 "chat_template": prompts.LLAVA_CHAT_TEMPLATE},
             "generation_config.json": {"eos_token_id": stops, "pad_token_id": tok.token_to_id(pad)}}
    for name, obj in files.items():
        records.atomic_write_json(os.path.join(out, name), obj)
    records.atomic_write_text(os.path.join(out, "chat_template.jinja"), prompts.LLAVA_CHAT_TEMPLATE)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m weights.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="VLM checkpoint folder or hub id (released LLaVA-NeXT or LlavaOnevision layout)")
    p.add_argument("out", help="output folder")
    p.add_argument("--layout", choices=checkpoints.VLM_LAYOUTS, default="llava-onevision", help="default: llava-onevision")
    p.add_argument("--dtype", help="cast the weights: float32 / bfloat16 / float16 (default: as stored)")
    p.add_argument("--max-shard-mb", type=float, default=5120, help="largest safetensors file, MiB (default 5120)")
    args = p.parse_args(argv)
    try:
        convert(args.src, args.out, args.layout, args.dtype, int(args.max_shard_mb * 2**20))
    except (ValueError, OSError) as e:   # CheckpointError is a ValueError
        print(f"weights.convert: error: {e}", file=sys.stderr)
        return 1
    print(f"weights.convert: wrote {args.out} ({args.layout} layout)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
