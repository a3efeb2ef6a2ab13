"""Checkpoints: find, read, write and map the weights of every layout Extract+Think meets, in one place.

    load_model(path or hub id)    a Qwen3 / Qwen2 LLM, or a LLaVA VLM when config.json says so (released LLaVA-NeXT
                                  layout or transformers' LlavaOnevision layout); strict: a missing, unexpected or
                                  mis-shaped key is one CheckpointError naming them
    save_model(model, folder)     config.json + safetensors (sharded above 5 GiB) in the layout load_model reads;
                                  a VLM also in transformers' LlavaOnevision layout (layout="llava-onevision",
                                  the one vLLM and SGLang load; convert.py adds the tokenizer and processor files)
    load_vision_tower(path)       a standalone SigLIP checkpoint (or a VLM folder: its tower)
    assemble_vlm(siglip, qwen3)   a fresh VLM for pretraining from the two standalone checkpoints
    load_tokenizer(path)          the checkpoint's tokenizer.json (tokenizers, no transformers)
    resolve_checkpoint(path)      a local folder, or a hub id fetched with huggingface_hub
    device_and_dtype(device, dtype)  the one rule for where models run

    qwen3_from_hf / siglip_from_hf / vlm_from_hf (and *_to_hf)
                                  a config.json dict <-> our Config dataclasses, one function each way per layout

Models are built on the meta device and filled with assign=True: weights are read once, never initialised.
The key maps are tables of (checkpoint prefix, our prefix), one per layout, read in both directions; our names
are model.py's module names.
"""
import os
import re
from dataclasses import asdict, fields

import torch

from model import Qwen3, Qwen3Config
from storage import records
from vision import SiglipConfig, SiglipVisionTower
from vlm import VLM, VLMConfig, build_vlm
from weights.quantize import check_mode, is_quantized, quantize_model


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not found, not a checkpoint, or keys that do not match."""


# ----------------------------------------------------------------------------- configs: config.json <-> ours
#
# One function each way per layout. Our Config dataclasses (model.Qwen3Config, vision.SiglipConfig,
# vlm.VLMConfig) know nothing of the hub's key names; these translate.

def qwen3_from_hf(d):
    """A transformers-style Qwen3 or Qwen2 config.json dict -> Qwen3Config."""
    kind = d.get("model_type", "qwen3")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"unsupported rope scaling {rope} (only the default RoPE is implemented)")
    kw = {f.name: d[f.name] for f in fields(Qwen3Config) if f.name in d}
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 1e6)))
    kw.setdefault("tie_word_embeddings", False)  # transformers' default when the key is absent
    if kind == "qwen2":
        kw.update(attention_bias=True, qk_norm=False, head_dim=d["hidden_size"] // d["num_attention_heads"])
    elif kind != "qwen3":
        raise CheckpointError(f"unsupported model_type {kind!r} (expected qwen3 or qwen2)")
    return Qwen3Config(**kw)


def qwen3_to_hf(c):
    kind = "qwen3" if c.qk_norm else "qwen2"
    d = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                     "tie_word_embeddings", "max_position_embeddings")}
    d.update(model_type=kind, architectures=[f"{kind.capitalize()}ForCausalLM"], hidden_act="silu",
             rope_theta=c.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    if kind == "qwen3":
        d.update(head_dim=c.head_dim, attention_bias=c.attention_bias)
    return d


def siglip_from_hf(d, feature_layer=-2):
    """A SigLIP config.json dict (full 'siglip' or 'siglip_vision_model') -> SiglipConfig.

    feature_layer: the hidden_states index its user reads (-2 for SigLIP as LLaVA uses it; transformers'
    LLaVA-OneVision stores a 26-layer tower and reads -1). Normalised to 'full depth, read second-to-last'."""
    d = d.get("vision_config", d) if d.get("model_type") == "siglip" else d
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"SigLIP config: hidden_act {act!r} unsupported (expected gelu_pytorch_tanh)")
    kw = {f.name: d[f.name] for f in fields(SiglipConfig) if f.name in d}
    depth = kw.get("num_hidden_layers", SiglipConfig.num_hidden_layers)
    used = depth + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= used <= depth:
        raise ValueError(f"SigLIP config: feature layer {feature_layer} out of range for {depth} layers")
    kw["num_hidden_layers"] = used + 1
    return SiglipConfig(**kw)


def siglip_to_hf(c):
    """transformers SiglipVisionConfig dict (full depth; users read hidden_states[-2])."""
    return {**asdict(c), "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
            "attention_dropout": 0.0}


def vlm_from_hf(d):
    """A released LLaVA config.json (a Qwen config + mm_* fields) or transformers' llava_onevision one -> VLMConfig."""
    if d.get("model_type") == "llava_onevision":
        return _vlm_from_transformers(d)
    if "mm_vision_tower" not in d:
        raise CheckpointError(f"config.json: model_type {d.get('model_type')!r} is not a supported LLaVA layout")
    kind = f"{d.get('model_type', '')} {' '.join(d.get('architectures') or [])}".lower()
    if "qwen" not in kind:
        raise CheckpointError(f"config.json: LLaVA with a non-Qwen LLM ({kind.strip()!r}) is not supported")
    llm = qwen3_from_hf({**d, "model_type": "qwen3" if re.search(r"qwen_?3", kind) else "qwen2"})
    # the released tower ignores mm_vision_select_layer: it cuts SigLIP's last layer and reads the output
    return VLMConfig(llm=llm, vision=_vision_from_llava(d), image_aspect_ratio=d.get("image_aspect_ratio", "square"),
                     image_grid_pinpoints=d.get("image_grid_pinpoints"),
                     mm_patch_merge_type=d.get("mm_patch_merge_type", "flat"),
                     mm_projector_type=d.get("mm_projector_type", "linear"), mm_vision_tower=d["mm_vision_tower"])


def _vlm_from_transformers(d):
    text, vis = dict(d["text_config"]), d["vision_config"]
    text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
    layer = d.get("vision_feature_layer", -1)
    checks = {"vision_feature_layer": isinstance(layer, int),
              "vision_feature_select_strategy": d.get("vision_feature_select_strategy", "full") == "full",
              "projector_hidden_act": d.get("projector_hidden_act", "gelu") == "gelu",
              "multimodal_projector_bias": d.get("multimodal_projector_bias", True)}
    for key, ok in checks.items():
        if not ok:
            raise CheckpointError(f"config.json: unsupported {key} = {d.get(key)!r}")
    pinpoints = [(w, h) for h, w in d.get("image_grid_pinpoints") or []] or None   # transformers: (h, w)
    return VLMConfig(llm=qwen3_from_hf(text), vision=siglip_from_hf(vis, feature_layer=layer),
                     image_aspect_ratio=d.get("vision_aspect_ratio", "anyres_max_9"), image_grid_pinpoints=pinpoints)


def _vision_from_llava(d):
    if "vision_config" in d:  # written by our save: any tower size
        return siglip_from_hf(d["vision_config"])
    name = d["mm_vision_tower"]
    if "siglip-so400m-patch14-384" not in name:
        raise CheckpointError(f"config.json: vision tower {name!r} unknown (only SigLIP so400m-patch14-384, "
                              "or a config.json carrying vision_config)")
    return SiglipConfig.preset("so400m")


def vlm_to_hf(c):
    """The released LLaVA config.json (plus vision_config, so towers other than so400m reload too)."""
    qwen3 = c.llm.qk_norm
    d = qwen3_to_hf(c.llm)
    d.update(model_type="llava_qwen_3" if qwen3 else "llava",
             architectures=["LlavaQwen3ForCausalLM" if qwen3 else "LlavaQwenForCausalLM"],
             mm_vision_tower=c.mm_vision_tower, mm_hidden_size=c.vision.hidden_size,
             mm_projector_type=c.mm_projector_type, mm_vision_select_layer=-2,
             mm_vision_select_feature="patch", mm_patch_merge_type=c.mm_patch_merge_type,
             image_aspect_ratio=c.image_aspect_ratio, image_grid_pinpoints=[list(p) for p in c.image_grid_pinpoints],
             use_mm_proj=True, mm_use_im_start_end=False, mm_use_im_patch_token=False,
             tokenizer_padding_side="right", vision_config=siglip_to_hf(c.vision))
    return d


def vlm_to_transformers(c, image_token_id, video_token_id):
    """transformers' LlavaOnevisionConfig dict (what vLLM and SGLang read): the tower as deep as we use it, read at
    its last layer; pinpoints as (height, width); image_token_id / video_token_id: in-vocabulary token ids."""
    fixed = {"mm_projector_type": (c.mm_projector_type, "mlp2x_gelu"),
             "mm_patch_merge_type": (c.mm_patch_merge_type, "spatial_unpad")}
    for key, (value, want) in fixed.items():
        if value != want:
            raise ValueError(f"the LlavaOnevision layout has {key} {want!r} only; this VLM has {value!r}")
    if not re.fullmatch(r"anyres_max_\d+", c.image_aspect_ratio):
        raise ValueError(f"the LlavaOnevision layout has image_aspect_ratio anyres_max_N only; this VLM has "
                         f"{c.image_aspect_ratio!r}")
    text = qwen3_to_hf(c.llm)
    vision = {**siglip_to_hf(c.vision), "num_hidden_layers": c.vision.num_layers_used, "vision_use_head": False}
    return {"model_type": "llava_onevision", "architectures": ["LlavaOnevisionForConditionalGeneration"],
            "text_config": text, "vision_config": vision, "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full", "vision_aspect_ratio": c.image_aspect_ratio,
            "image_grid_pinpoints": [[h, w] for w, h in c.image_grid_pinpoints], "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True, "tie_word_embeddings": c.llm.tie_word_embeddings,
            "image_token_index": image_token_id, "video_token_index": video_token_id}


# ----------------------------------------------------------------------------- files

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def device_and_dtype(device="auto", dtype=None):
    """The one rule for where models run: device "auto" (or None) = CUDA if present, else CPU; dtype None =
    bfloat16 on CUDA, float32 on CPU. A CUDA device without CUDA is a ValueError. -> (device str, dtype name)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (use --device cpu or auto)")
    return device, dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def resolve_checkpoint(path_or_id, need_config=True, files=("*.json", "*.safetensors", "*.txt")):
    """A local folder, or a hub id fetched with huggingface_hub (which also serves its offline cache); from the
    hub only `files` (glob patterns)."""
    path = str(path_or_id)
    if os.path.isdir(path):
        folder = path
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise CheckpointError(f"{path}: not a checkpoint folder (nor a hub id like 'owner/name')")
    else:
        from huggingface_hub import snapshot_download
        try:
            folder = snapshot_download(path, allow_patterns=list(files))
        except Exception as e:  # offline, unknown repo, gated, ...: one clear message
            why = " ".join(str(e).split())   # huggingface_hub's messages span lines; ours is one
            raise CheckpointError(f"{path}: could not fetch from the hub ({type(e).__name__}: {why})") from None
    if need_config and not os.path.exists(os.path.join(folder, "config.json")):
        raise CheckpointError(f"{path}: not a checkpoint folder (no config.json)")
    return folder


def _read_json_object(path):
    """A checkpoint's JSON file (config.json, the shard index) -> dict; not JSON, or not an object: a named error."""
    try:
        data = records.read_json(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


# config.json keys that name a config field of ours, with the type it must have (an int is a valid float)
_CONFIG_TYPES = {f.name: f.type for c in (Qwen3Config, SiglipConfig) for f in fields(c)
                 if f.type in (int, float, bool, str)}


def _read_config(folder):
    """folder/config.json -> dict, every known key (also under text_config / vision_config) of the right type."""
    path = os.path.join(folder, "config.json")
    cfg = _read_json_object(path)
    for where, d in [("", cfg)] + [(k + ".", cfg[k]) for k in ("text_config", "vision_config")
                                   if isinstance(cfg.get(k), dict)]:
        for key, value in d.items():
            want = _CONFIG_TYPES.get(key)
            if want and not (isinstance(value, want) or want is float and isinstance(value, int)) or \
                    want in (int, float) and isinstance(value, bool):
                raise CheckpointError(f"{path}: {where}{key} is {value!r}, expected {want.__name__}")
    return cfg


def _config_from(build, cfg, folder, *args):
    """build(cfg, *args) (a from_hf); any error it raises on a malformed config.json becomes one naming the file."""
    try:
        return build(cfg, *args)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        why = f"lacks the key {e}" if isinstance(e, KeyError) else str(e).removeprefix("config.json: ")
        raise CheckpointError(f"{os.path.join(folder, 'config.json')}: {why}") from None


def _read_safetensors(folder, device="cpu"):
    """All tensors of a checkpoint folder: model.safetensors, or the shards named by model.safetensors.index.json.
    A corrupt index or shard (truncated, a huge header length, a pickle renamed .safetensors) is an error naming it."""
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n and os.path.basename(n) == n
                                                       for n in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names in the folder")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{folder}: shard {name} named in the index is missing")
        try:
            tensors.update(load_file(path, device=str(device)))
        except Exception as e:  # safetensors' SafetensorError, OSError
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def _load_strict(module, state_dict, source):
    """Assign state_dict (our names) into a module built on the meta device; any mismatch is one error."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
                   for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{title} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("wrong shapes", wrong)) if keys]
        raise CheckpointError(f"{source}: checkpoint does not match the model; " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True, assign=True)


def _write_safetensors(state_dict, folder, max_shard_bytes=5 * 2**30):
    """Write tensors as model.safetensors, or as numbered shards plus an index when over max_shard_bytes.
    Every file is written to a temporary name and renamed, so a crash never leaves a torn file."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    shards, size = [{}], 0
    for k, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.detach().contiguous().cpu()
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        records.atomic_write(os.path.join(folder, name), lambda tmp: save_file(shard, tmp, metadata={"format": "pt"}))
    index = os.path.join(folder, "model.safetensors.index.json")
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        records.atomic_write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif os.path.exists(index):
        os.remove(index)  # a stale index would point the loader at old shards


# ----------------------------------------------------------------------------- Qwen3 / Qwen2 layout

def llm_key_to_hf(key, prefix="model."):
    """Our Qwen3 parameter name -> the checkpoint's (model.* but lm_head.*)."""
    return key if key.startswith("lm_head.") else prefix + key


def _llm_state_from_hf(tensors, config, source, prefix="model."):
    """Checkpoint tensors -> our names. Unknown keys are kept as-is so _load_strict reports them."""
    ours = {}
    for k, t in tensors.items():
        if k == "lm_head.weight" and config.tie_word_embeddings:
            # some tied checkpoints still store the head; dropping it is lossless only if it IS the embedding
            emb = tensors.get(prefix + "embed_tokens.weight")
            if emb is None or not torch.equal(emb, t):
                raise CheckpointError(f"{source}: tied checkpoint holds an lm_head.weight that differs from embed_tokens")
            continue
        ours[k[len(prefix):] if k.startswith(prefix) else k] = t
    return ours


def _load_llm(folder, cfg, dtype, device):
    config = _config_from(qwen3_from_hf, cfg, folder)
    with torch.device("meta"):
        model = Qwen3(config)
    tensors = _read_safetensors(folder, device or "cpu")
    state = {k: (t.to(dtype) if dtype else t) for k, t in _llm_state_from_hf(tensors, config, folder).items()}
    _load_strict(model, state, folder)
    return model


def _is_llava_config(cfg):
    return "mm_vision_tower" in cfg or cfg.get("model_type") in ("llava", "llava_onevision", "llava_qwen_3")


def load_model(path_or_hub_id, dtype=None, device=None, quantize=None):
    """A Qwen3/Qwen2 LLM or, when config.json describes a LLaVA model, the VLM; in eval mode.

    Built on the meta device and filled with assign=True: weights are read once, never initialised.
    quantize="int8" (or "int4"): then the LLM's linears and LM head become weight-only quantized layers
    (quantize.py); the vision tower and projector stay floating point. "int8-compiled": int8 with batch-1 CPU
    decode products compiled by inductor with the weights frozen in (needs a C++ compiler)."""
    check_mode(quantize)   # a bad value fails before any weight is read
    folder = resolve_checkpoint(path_or_hub_id)
    cfg = _read_config(folder)
    dtype = _as_dtype(dtype)
    model = (_load_vlm if _is_llava_config(cfg) else _load_llm)(folder, cfg, dtype, device)
    return quantize_model(model, quantize).eval()


VLM_LAYOUTS = ("released", "llava-onevision")


def save_model(model, out_dir, max_shard_bytes=5 * 2**30, layout="released", token_ids=None):
    """Save in a layout load_model (and transformers) reads: config.json + safetensors (sharded if large).
    A VLM: layout "released" (LLaVA-NeXT) or "llava-onevision" (transformers; token_ids = (image id, video id))."""
    if is_quantized(model):
        raise ValueError("save_model: the model is int8-quantized; save the floating-point one (quantize at load)")
    if isinstance(model, VLM):
        return _save_vlm(model, out_dir, max_shard_bytes, layout, token_ids)
    if layout != "released":
        raise ValueError(f"save_model: layout {layout!r} is for VLMs; a text LLM has one layout (Qwen3's)")
    state = {llm_key_to_hf(k): v for k, v in model.state_dict().items()}
    _write_safetensors(state, out_dir, max_shard_bytes)
    dtype = str(model.embed_tokens.weight.dtype).replace("torch.", "")
    records.atomic_write_json(os.path.join(out_dir, "config.json"), {**qwen3_to_hf(model.config), "torch_dtype": dtype})




# ----------------------------------------------------------------------------- VLM layouts
# key maps: (checkpoint prefix, our prefix). Reading: the first row whose checkpoint prefix matches. Writing
# (_checkpoint_key): the longest of our prefixes that matches, and of its rows the first.
_RELEASED_KEYS = [("model.vision_tower.vision_tower.vision_model.", "vision."), ("model.mm_projector.", "projector."),
                  ("model.image_newline", "image_newline"), ("model.", "llm."), ("lm_head.", "llm.lm_head.")]
_TRANSFORMERS_KEYS = [
    # the llava-hf hub names (transformers 4.x on disk; what vLLM and SGLang load): written
    ("vision_tower.vision_model.", "vision."), ("multi_modal_projector.linear_1.", "projector.0."),
    ("multi_modal_projector.linear_2.", "projector.2."), ("image_newline", "image_newline"),
    ("language_model.model.", "llm."), ("language_model.lm_head.", "llm.lm_head."),
    # transformers 5.x: in memory (model.*) and on disk: read only
    ("model.vision_tower.vision_model.", "vision."), ("model.vision_tower.", "vision."), ("vision_tower.", "vision."),
    ("model.multi_modal_projector.linear_1.", "projector.0."),
    ("model.multi_modal_projector.linear_2.", "projector.2."),
    ("model.image_newline", "image_newline"), ("model.language_model.", "llm."), ("lm_head.", "llm.lm_head.")]


def _vision_key(key, config):
    """SigLIP name below vision_model. -> ours (encoder.layers.N -> layers.N); None for weights LLaVA drops:
    the pooling head and the last layer of a full-depth tower (standalone SigLIP checkpoints)."""
    if key.startswith("head."):
        return None
    if key.startswith("encoder.layers."):
        if int(key.split(".")[2]) == config.num_layers_used:
            return None
        return key.replace("encoder.layers.", "layers.", 1)
    return key


def _vlm_state_from_checkpoint(tensors, config, table, source):
    """Checkpoint tensors -> our names. Unmapped keys pass through so _load_strict names them."""
    state = {}
    for key, t in tensors.items():
        ours = next((new + key[len(old):] for old, new in table if key.startswith(old)), key)
        if ours.startswith("vision."):
            inner = _vision_key(ours[len("vision."):], config.vision)
            if inner is None:
                continue
            ours = "vision." + inner
        state[ours] = t
    head = state.get("llm.lm_head.weight")
    if head is not None and config.llm.tie_word_embeddings:
        if not torch.equal(head, state.get("llm.embed_tokens.weight", head.new_empty(0))):
            raise CheckpointError(f"{source}: tied checkpoint holds an lm_head.weight that differs from embed_tokens")
        del state["llm.lm_head.weight"]
    return state


def _checkpoint_key(ours, table):
    """Our name -> the name a layout's table writes (the inverse of reading it; tower layers.N -> encoder.layers.N)."""
    old, new = max((row for row in table if ours.startswith(row[1])), key=lambda row: len(row[1]))
    inner = ours[len(new):]
    if new == "vision." and inner.startswith("layers."):
        inner = "encoder." + inner
    return old + inner


def _load_vlm(folder, cfg, dtype, device):
    config = _config_from(vlm_from_hf, cfg, folder)
    table = _TRANSFORMERS_KEYS if cfg.get("model_type") == "llava_onevision" else _RELEASED_KEYS
    with torch.device("meta"):
        model = VLM(config)
    tensors = _read_safetensors(folder, device or "cpu")
    state = _vlm_state_from_checkpoint(tensors, config, table, folder)
    _load_strict(model, {k: (t.to(dtype) if dtype else t) for k, t in state.items()}, folder)
    return model


def _save_vlm(model, out_dir, max_shard_bytes, layout, token_ids):
    """layout "released": LLaVA config.json + model.* / lm_head keys; "llava-onevision": transformers' config.json +
    the llava-hf hub names, token_ids = its (image, video) token ids. Sharded above max_shard_bytes."""
    if layout == "released":
        table, config = _RELEASED_KEYS, vlm_to_hf(model.config)
    elif layout == "llava-onevision":
        if token_ids is None:
            raise ValueError("save_model: the llava-onevision layout needs token_ids, the in-vocabulary <image> and "
                             "<video> ids (convert.py adds them to the tokenizer)")
        table, config = _TRANSFORMERS_KEYS, vlm_to_transformers(model.config, *token_ids)
    else:
        raise ValueError(f"unknown VLM layout {layout!r}; choose from {VLM_LAYOUTS}")
    state = {_checkpoint_key(k, table): v for k, v in model.state_dict().items()}
    _write_safetensors(state, out_dir, max_shard_bytes)
    dtype = str(model.llm.embed_tokens.weight.dtype).replace("torch.", "")
    records.atomic_write_json(os.path.join(out_dir, "config.json"), {**config, "torch_dtype": dtype})


def load_vision_tower(path_or_hub_id, dtype=None, device=None):
    """A standalone SigLIP checkpoint (google/siglip-so400m-patch14-384 style: vision_model.* and text_model.*)
    -> SiglipVisionTower in eval mode. The text tower, logit scale/bias, pooling head and last layer are dropped.
    A VLM checkpoint gives its own tower."""
    folder = resolve_checkpoint(path_or_hub_id)
    cfg = _read_config(folder)
    if _is_llava_config(cfg):  # a VLM checkpoint: its tower (e.g. the Shapes world's pretrained captioner)
        return load_model(folder, dtype, device).vision
    if cfg.get("model_type") not in ("siglip", "siglip_vision_model"):
        raise CheckpointError(f"{folder}: model_type {cfg.get('model_type')!r} is not a SigLIP checkpoint")
    config = _config_from(siglip_from_hf, cfg, folder)
    with torch.device("meta"):
        tower = SiglipVisionTower(config)
    state = {}
    for key, t in _read_safetensors(folder, device or "cpu").items():
        if key.startswith(("text_model.", "logit_scale", "logit_bias")):
            continue
        inner = _vision_key(key[len("vision_model."):], config) if key.startswith("vision_model.") else key
        if inner is not None:
            state[inner] = t.to(dtype) if dtype else t
    _load_strict(tower, state, folder)
    return tower.eval()


def assemble_vlm(siglip_path, qwen3_path, dtype=None, device=None, **options):
    """Fresh VLM for pretraining from a standalone SigLIP folder and a standalone Qwen3 folder (or hub ids)."""
    llm = load_model(qwen3_path, dtype, device)
    if not isinstance(llm, Qwen3):
        raise CheckpointError(f"{qwen3_path}: expected a text-only Qwen3 checkpoint, got a VLM")
    return build_vlm(llm, load_vision_tower(siglip_path, _as_dtype(dtype), device), **options)



# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path_or_id):
    """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer` (no transformers needed)."""
    # from the hub only the tokenizer: a served model's tokenizer comes without its weights
    path = os.path.join(resolve_checkpoint(path_or_id, need_config=False, files=("tokenizer.json",)),
                        "tokenizer.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path_or_id}: no tokenizer.json in the checkpoint folder")
    return read_tokenizer_file(path)


def read_tokenizer_file(path):
    """tokenizer.json -> `tokenizers.Tokenizer`; a corrupt file is a CheckpointError naming it."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception ("Model missing. at line 1 column 2")
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None
