"""Train every stage of Extract+Think: config -> data (training/chat_data.py) -> model -> optimiser -> loop.

Stages (the paper and LLaVA-OneVision's recipe), each a preset whose values any flag overrides:
  pretrain  VLM, projector only, lr 1e-3, global batch 512, square 384 images, `plain` template
  finetune  VLM, everything (LLM + projector 1e-5, vision 2e-6), global batch 256, anyres_max_9, `qwen_1_5`
  text      plain Qwen3 LLM (the reasoner), lr 1e-5, global batch 256, `qwen3` chat template

  python train.py --stage pretrain --llm tiny --vision tiny --tokenizer tok.json --data caps.jsonl \\
      --image-folder imgs --out runs/pre --global-batch 8 --micro-batch 4 --max-length 512
  torchrun --nproc_per_node 8 train.py --stage finetune --init runs/pre --data extract.json ...

The same command runs on one CPU process or under torchrun (DDP; --fsdp for 4B/8B). Each run
folder holds checkpoint.pt (full state, for --resume), metrics.jsonl, and at the end the model
(weights/checkpoints.py's layout) with tokenizer.json, loadable by checkpoints.load_model / reason.py.

Work that repeats every step, or whose result nobody reads, is done once or not at all, without changing the loss
beyond float rounding: each sample is tokenised and each image tiled once (training/caches.py BatchLoader,
--cache-mb), a frozen vision tower runs without autograd and once per image (FeatureCache, --feature-cache-mb),
and the LM head, final norm and last decoder layer run only at labelled positions (training/loss.py).

Loss normalisation: every micro-batch backpropagates the *sum* of its token losses; once the
whole global batch is done (all micro-batches on all ranks) the gradients are divided by the
global count of labelled tokens. That equals transformers' mean token loss over the global
batch, whatever the world size or accumulation split (DDP averages over ranks, so we multiply
by the world size).
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn

import model
import vision
import vlm
from storage import records
from training import runs
from training.caches import BatchLoader, process_feature_cache
from training.chat_data import build_samples, epoch_order, micro_batches
from training.loss import LossSum
from weights import checkpoints

STAGES = {  # paper + LLaVA-OneVision; "train" names the VLM parts that get gradients (a plain LLM is all "llm")
    "pretrain": dict(template="plain", train="projector", lr=1e-3, vision_lr=0.0, global_batch=512,
                     image_aspect_ratio="square"),
    "finetune": dict(template="qwen_1_5", train="llm,projector,image_newline,vision", lr=1e-5, vision_lr=2e-6,
                     global_batch=256, image_aspect_ratio="anyres_max_9"),
    "text": dict(template="qwen3", train="llm", lr=1e-5, vision_lr=0.0, global_batch=256, image_aspect_ratio=None),
}
VLM_PARTS = {"llm", "projector", "image_newline", "vision"}


def opt(default, help, choices=None, type_=None):
    """A TrainConfig field that is also a CLI flag (--name-with-dashes); None = take the stage preset."""
    return field(default=default, metadata=dict(help=help, choices=choices, type=type_))


@dataclass
class TrainConfig:
    stage: str = opt("finetune", "recipe preset; every flag below overrides it", sorted(STAGES))
    data: str = opt("", "LLaVA JSON or JSONL: {id, image (str | list, optional), conversations}")
    image_folder: str = opt("", "folder the records' image paths are relative to (and must stay inside)")
    allow_outside_images: bool = opt(False, "allow image paths that are absolute or climb out of --image-folder")
    exif_transpose: bool = opt(False, "turn images as their EXIF orientation says (the release ignores it)")
    out: str = opt("runs/train", "run folder: checkpoint.pt, metrics.jsonl, then the final model")
    # model / init
    llm: str = opt("0.6B", "Qwen3 size (tiny: random init from the preset)", ["0.6B", "1.7B", "4B", "8B", "tiny"])
    llm_path: str = opt("", "Qwen3 checkpoint folder or hub id (default Qwen/Qwen3-<llm>)")
    llm_overrides: str = opt("", "tiny only: Qwen3Config fields, e.g. hidden_size=96,num_hidden_layers=3")
    vision: str = opt("so400m", "SigLIP tower (tiny, shapes: random init from the preset)", ["so400m", "tiny", "shapes"])
    vision_path: str = opt("google/siglip-so400m-patch14-384", "SigLIP checkpoint, or a VLM folder whose tower to take (pretrain)")
    init: str = opt("", "start from a previous stage's output folder (instead of --llm/--vision)")
    tokenizer: str = opt("", "tokenizer.json or checkpoint folder (default: the --init / LLM folder)")
    # recipe: None = the stage preset (STAGES)
    template: str = opt(None, "chat template (document: {id, text} records, every token trained)",
                        ["plain", "qwen_1_5", "qwen3", "document"])
    train: str = opt(None, "parts that get gradients, comma list of llm,projector,image_newline,vision")
    lr: float = opt(None, "learning rate of the LLM, projector and image_newline", type_=float)
    vision_lr: float = opt(None, "learning rate of the vision tower", type_=float)
    global_batch: int = opt(None, "samples per optimiser step, over all ranks", type_=int)
    image_aspect_ratio: str = opt(None, "VLM image handling", ["square", "pad", "anyres_max_9"])
    micro_batch: int = opt(4, "samples per forward on one rank (accumulation fills the global batch)")
    epochs: int = opt(1, "passes over the data")
    max_steps: int = opt(0, "shorten the run to this many steps (the lr schedule spans it); 0 = epochs")
    stop_after: int = opt(0, "stop after this step with a checkpoint, as if killed (then --resume)")
    warmup_ratio: float = opt(0.03, "linear warmup fraction, then cosine to 0")
    weight_decay: float = opt(0.0, "AdamW weight decay (never on norms, biases, image_newline)")
    grad_clip: float = opt(1.0, "clip the global gradient norm (0 = off)")
    max_length: int = opt(32768, "tokens per sequence after image splicing; longer ones are cut (and counted)")
    group_by_length: bool = opt(False, "sort each global batch by length: micro-batches hold similar lengths")
    unmask_specials: bool = opt(False, "upstream LLaVA-NeXT quirk: also train every \\n, <|im_start|>, "
                                       "<|im_end|> token of system and user turns")
    skip_bad_samples: bool = opt(False, "skip (count and log) bad records and unreadable images instead of stopping")
    grad_checkpointing: bool = opt(False, "recompute activations in backward: less memory, ~30%% more compute")
    cache_mb: int = opt(1024, "host memory per rank for each of two caches (least recently used dropped first): "
                              "tokenised samples, and every image's preprocessed tiles (uint8); 0 = off")
    feature_cache_mb: int = opt(512, "memory per process, on the model's device, for the vision tower's output "
                                     "per image, reused while the tower is frozen (--train without vision), also by "
                                     "later runs in the same process with the same tower; 0 = off. "
                                     "Never with --fsdp (a rank skipping the tower would stall the others)")
    fsdp: bool = opt(False, "under torchrun: shard parameters, gradients, optimiser state (4B/8B)")
    precision: str = opt("auto", "auto = bf16 autocast on CUDA, fp32 on CPU", ["auto", "bf16", "fp32"])
    seed: int = opt(0, "data order and random init")
    save_every: int = opt(500, "write checkpoint.pt every N steps (and at the end)")
    resume: bool = opt(False, "continue exactly from <out>/checkpoint.pt")
    progress: bool = opt(True, "the tqdm bar with loss, lr, tokens/s")

    def resolve(self):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose from {sorted(STAGES)}")
        for k, v in STAGES[self.stage].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if not self.data:
            raise ValueError("--data is required (LLaVA JSON or JSONL)")
        return self


# ----------------------------------------------------------------------------- model

def tokenizer_file(cfg):
    """--tokenizer (a tokenizer.json or a folder), else the tokenizer.json of the --init / LLM checkpoint."""
    if cfg.llm == "tiny" and not (cfg.tokenizer or cfg.init or cfg.llm_path):
        raise ValueError("--llm tiny starts from random weights: pass --tokenizer (a tokenizer.json or a folder "
                         "holding one, e.g. backbones/lm-S/tokenizer.json, the Shapes world's)")
    source = cfg.tokenizer or cfg.init or cfg.llm_path or f"Qwen/Qwen3-{cfg.llm}"
    if source.endswith(".json"):
        return source
    path = os.path.join(checkpoints.resolve_checkpoint(source, need_config=False), "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{source}: no tokenizer.json (pass --tokenizer)")
    return path


def load_tokenizer(cfg):
    return checkpoints.read_tokenizer_file(tokenizer_file(cfg))


def init_weights(module):
    """Random init for tiny models: N(0, 0.02) matrices and embeddings, zero biases (as transformers)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    return module


def parse_overrides(text):
    """ "hidden_size=96,num_hidden_layers=3" -> {field: typed value} of Qwen3Config; unknown fields are errors."""
    types = {f.name: f.type for f in fields(model.Qwen3Config)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in types or not value:
            raise ValueError(f"--llm-overrides: {item!r} is not field=value with a field of {sorted(types)}")
        out[key] = value.lower() in ("1", "true", "yes") if types[key] is bool else types[key](value)
    return out


def build_llm(cfg, vocab_size):
    """Qwen3 from --llm-path / the hub, or (tiny) randomly initialised from the preset + overrides."""
    overrides = parse_overrides(cfg.llm_overrides)
    if cfg.llm != "tiny":
        return checkpoints.load_model(cfg.llm_path or f"Qwen/Qwen3-{cfg.llm}", dtype=torch.float32)
    return init_weights(model.Qwen3(model.Qwen3Config.preset("tiny", vocab_size=vocab_size, **overrides)))


def build_model(cfg, tokenizer):
    """--init folder, or a fresh Qwen3 (text stage), or a fresh VLM from SigLIP + Qwen3 (pretrain)."""
    if cfg.init:
        net = checkpoints.load_model(cfg.init, dtype=torch.float32)
    elif cfg.stage == "text":
        net = build_llm(cfg, tokenizer.get_vocab_size())
    else:
        llm = build_llm(cfg, tokenizer.get_vocab_size())
        tower = (init_weights(vision.SiglipVisionTower(vision.SiglipConfig.preset(cfg.vision))) if cfg.vision != "so400m"
                 else checkpoints.load_vision_tower(cfg.vision_path, dtype=torch.float32))
        net = vlm.build_vlm(llm, tower)   # fresh projector + image_newline
    if cfg.image_aspect_ratio and isinstance(net, vlm.VLM):
        net.config.image_aspect_ratio = cfg.image_aspect_ratio   # e.g. square (pretrain) -> anyres_max_9
    return net.float().train()


def image_preparer(net, exif_transpose=False):
    """(path, images in its row) -> what the model takes for that image: a VLM gets the image already tiled
    (vlm.TiledImage, cached per path by BatchLoader), a text-only LLM a PIL image (it ignores it)."""
    if not isinstance(net, vlm.VLM):
        return None

    def prepare(path, n_in_row):
        stat = os.stat(path)   # in the key: a file rewritten between two runs of one process is a new image
        key = (path, stat.st_mtime_ns, stat.st_size, net.tiling_mode(n_in_row), exif_transpose)
        return net.tile_image(vision.load_image(path, exif_transpose=exif_transpose), n_in_row, key=key, name=path)
    return prepare


def images_repeat(samples, steps, cfg):
    """Whether some image comes up twice in this run: more than one epoch, or a file shared by records. If not,
    a tower feature cache would never hit, and it costs: it runs the tower one image at a time (see
    training.caches.FeatureCache), so train.py then leaves it off."""
    paths = [p for s in samples for p in s["images"]]
    return steps * cfg.global_batch > len(samples) or len(set(paths)) < len(paths)


def set_trainable(net, parts):
    """Freeze everything except the named parts (llm, projector, image_newline, vision); returns {name: part}."""
    parts = set(parts.split(","))
    if parts - VLM_PARTS:
        raise ValueError(f"--train: unknown part(s) {sorted(parts - VLM_PARTS)}; choose from {sorted(VLM_PARTS)}")
    owner = {}
    for name, p in net.named_parameters():
        part = name.split(".")[0] if isinstance(net, vlm.VLM) else "llm"
        p.requires_grad_(part in parts)
        owner[name] = part
    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError(f"--train {','.join(sorted(parts))}: matches no parameters of this model")
    return owner


def param_groups(net, owner, cfg):
    """AdamW groups: vision tower at vision_lr, the rest at lr; no weight decay on norms, biases,
    image_newline (every 1-D parameter)."""
    groups = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        part = owner[name]
        lr = cfg.vision_lr if part == "vision" else cfg.lr
        nodecay = p.ndim < 2 or part == "image_newline"
        name = ("vision" if part == "vision" else "main") + ("_nodecay" if nodecay else "")
        groups.setdefault(name, dict(params=[], lr=lr, weight_decay=0.0 if nodecay else cfg.weight_decay,
                                     name=name))["params"].append(p)
    return list(groups.values())


def lr_lambda(total, warmup):
    """Linear warmup then cosine to 0, as transformers' get_cosine_schedule_with_warmup."""
    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


# ----------------------------------------------------------------------------- the training run

def train(args=None):
    """Run one stage. args: a list of CLI strings, a dict of TrainConfig fields, or a TrainConfig.
    Returns dict(out, steps, losses) (losses: the global mean loss of every step run here).
    Rank 0 holds <out>/train.lock (records.WriterLock) from the first write to the return: one run per folder."""
    with contextlib.ExitStack() as held:
        return _train(args, held)


def _train(args, held):
    cfg = (args if isinstance(args, TrainConfig) else TrainConfig(**args) if isinstance(args, dict)
           else parse_args(args)).resolve()
    rank, world, device, started = runs.setup_distributed()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # data: checked before anything is printed or written, so bad input is one error and no empty run folder
    tokenizer = load_tokenizer(cfg)
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    data = records.read_records(cfg.data)  # errors name the file and line
    samples, bad = build_samples(cfg, data)
    n_records = len(data)
    if cfg.global_batch % world:
        raise ValueError(f"--global-batch {cfg.global_batch} is not divisible by the world size {world}")
    steps_per_epoch = len(samples) // cfg.global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(samples)} samples < one global batch of {cfg.global_batch}; lower --global-batch")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    lengths = [s["length"] for s in samples] if cfg.group_by_length else None

    os.makedirs(cfg.out, exist_ok=True)
    if rank == 0:
        held.enter_context(records.WriterLock(os.path.join(cfg.out, "train.lock"), "train.py"))
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    resuming = cfg.resume and os.path.exists(ckpt_path)
    if cfg.resume and not resuming and rank == 0:
        print(f"--resume: no {ckpt_path} yet, starting fresh", file=sys.stderr)
    if rank == 0:
        print(json.dumps(asdict(cfg), indent=1))

    # model
    net = build_model(cfg, tokenizer).to(device)
    owner = set_trainable(net, cfg.train)
    for m in net.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = cfg.grad_checkpointing
    wrapped = runs.wrap(LossSum(net, pad_id, cfg.max_length), cfg, device, world)
    loader = BatchLoader(samples, tokenizer, cfg, image_preparer(net, cfg.exif_transpose), cfg.cache_mb * 2**20)
    features = None
    if isinstance(net, vlm.VLM) and cfg.feature_cache_mb > 0 and not cfg.fsdp and images_repeat(samples, total, cfg):
        net.feature_cache = process_feature_cache(cfg.feature_cache_mb * 2**20)   # answers only while frozen
        features = net.feature_cache.lru
        features_before = (features.hits, features.misses)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    # optimiser
    optimizer = torch.optim.AdamW(param_groups(net, owner, cfg), betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, math.ceil(cfg.warmup_ratio * total)))
    stats = dict(truncated=0, skipped=0)  # running totals, kept in the checkpoint
    start, stats = runs.load_checkpoint(ckpt_path, wrapped, optimizer, scheduler, cfg, rank) if resuming else (0, stats)
    log = runs.MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), rank, keep_until=start if resuming else None)
    if not resuming:
        log(dict(event="data", records=n_records, kept=len(samples), skipped=len(bad), skipped_list=bad))

    # loop
    trainable = [p for p in net.parameters() if p.requires_grad]
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, desc=f"train {cfg.stage}", dynamic_ncols=True)
    losses, stop = [], min(total, cfg.stop_after or total)
    for step in range(start, stop):
        t0 = time.time()
        order = epoch_order(len(samples), step // steps_per_epoch, cfg.seed, cfg.global_batch, lengths)
        chunks = micro_batches(order, step, steps_per_epoch, cfg.global_batch, cfg.micro_batch, rank, world)
        sums = torch.zeros(4, dtype=torch.float64)  # loss sum, labelled tokens, tokens, truncated rows
        skipped = []                                 # unreadable images (--skip-bad-samples)
        for j, idx in enumerate(chunks):
            ids, labels, images = loader(idx, skipped)
            sync = j == len(chunks) - 1 or not hasattr(wrapped, "no_sync")
            with (contextlib.nullcontext() if sync else wrapped.no_sync()), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, n_lab, n_tok, trunc = wrapped(ids, labels, images)
                loss.backward()
            sums += torch.tensor([loss.item(), n_lab.item(), n_tok.item(), trunc], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(sums)
            if cfg.skip_bad_samples:  # every rank's skipped records, for the log
                gathered = [None] * world
                dist.all_gather_object(gathered, skipped)
                skipped = [s for g in gathered for s in g]
        n_global = max(sums[1].item(), 1.0)
        for p in trainable:  # sum of token losses -> mean over the global batch (DDP averaged over ranks)
            if p.grad is not None:
                p.grad.mul_(world / n_global)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss, dt = sums[0].item() / n_global, time.time() - t0
        stats["truncated"] += int(sums[3].item())
        stats["skipped"] += len(skipped)
        losses.append(mean_loss)
        log(dict(step=step + 1, epoch=step // steps_per_epoch, loss=mean_loss, lr=lrs,
                 grad_norm=float(grad_norm), tokens=int(sums[2].item()), labelled_tokens=int(sums[1].item()),
                 tokens_per_s=sums[2].item() / dt, truncated_total=stats["truncated"],
                 skipped_total=stats["skipped"], skipped_now=skipped, time_s=dt))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{max(lrs.values()):.2e}", tok_s=f"{sums[2].item() / dt:.0f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == stop:
            runs.save_checkpoint(ckpt_path, wrapped, optimizer, scheduler, step + 1, stats, cfg, rank, world)
    if bar is not None:
        bar.close()
    if stop == total and not log.done:
        runs.save_final(net, wrapped, cfg, rank, tokenizer_file(cfg))
        hits = {k: [c.hits, c.misses] for k, c in (("tokens", loader.tokens), ("images", loader.images))}
        if features is not None:   # shared with earlier runs in this process: this run's lookups only
            hits["features"] = [features.hits - features_before[0], features.misses - features_before[1]]
        log(dict(event="done", steps=total, truncated_total=stats["truncated"], skipped_total=stats["skipped"],
                 cache_hits=hits))  # [hits, misses]
    if started:
        dist.destroy_process_group()
    return dict(out=cfg.out, steps=stop, losses=losses)


# ----------------------------------------------------------------------------- CLI

NEEDS = """train.py needs to know what to train on:
  --stage pretrain | finetune | text   the recipe (pretrain: the connector on captions; finetune: the whole VLM on
                                       instructions or extraction data; text: a plain Qwen3, e.g. the reasoner)
  --data FILE                          LLaVA JSON / JSONL records: {id, image, conversations}
  --image-folder DIR                   where the records' images are (VLM stages)
With --llm 0.6B (or 1.7B, 4B, 8B) a pretrain run starts from Qwen/Qwen3-<size> and google/siglip-so400m-patch14-384
(hub ids or --llm-path / --vision-path folders); a finetune run starts from the pretrain run's folder (--init).
For example:
  python train.py --stage pretrain --llm 0.6B --data blip_laion_cc_sbu_558k.json --image-folder images --out runs/pre
  python train.py --stage finetune --init runs/pre --data extract.json --image-folder images --out runs/ft
Without weights or data at hand, `python shapes.py` runs every stage on toy models it ships. All flags: --help"""


def parse_args(argv=None):
    """CLI -> TrainConfig: one flag per TrainConfig field, help from the field."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type in (bool, "bool"):
            name = f"--no-{f.name.replace('_', '-')}" if f.default else flag
            p.add_argument(name, dest=f.name, action="store_false" if f.default else "store_true",
                           help=("turn off " if f.default else "") + meta["help"])
        else:
            kind = meta["type"] or (type(f.default) if f.default is not None else str)  # None defaults: str fields
            needed = f.name in ("stage", "data")
            p.add_argument(flag, type=kind, default=None if needed else f.default, choices=meta["choices"],
                           help=meta["help"] + (" (required)" if needed else f" (default: {f.default})"
                                                if f.default not in (None, "") else ""))
    args = p.parse_args(argv)
    missing = [f"--{k}" for k in ("stage", "data") if getattr(args, k) is None]
    if missing:
        p.exit(2, f"train.py: error: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing\n\n"
                  f"{NEEDS}\n")
    return TrainConfig(**vars(args))


if __name__ == "__main__":
    try:
        train(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:  # bad record, file or checkpoint (CheckpointError): one line
        sys.exit(f"train.py: error: {e}")
    if runs.world_size() > 1:
        # Everything is written and the process group destroyed, but gloo's worker threads may still be freeing a
        # finished collective's work, which needs the GIL; during interpreter finalization that aborts the rank
        # (docs/LOG.md, 2026-12-03). So a torchrun rank leaves without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
