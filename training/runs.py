"""The run around a training loop: torchrun (DDP, FSDP), full-state checkpoints for an exact resume, the final
model, and the metrics log. train.py calls these; none of them changes what a step computes.

    setup_distributed() -> (rank, world, device, started)     wrap(loss_module, cfg, device, world)
    save_checkpoint / load_checkpoint                          model, optimiser, scheduler, step, every rank's RNG
    save_final(model, wrapped, cfg, rank, tokenizer_path)      the model folder that checkpoints.load_model reads
    MetricsLog(path, rank, keep_until)                         metrics.jsonl, repaired and trimmed on resume
"""
import json
import os
import random
import shutil
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn

from storage import records
from vlm import VLM
from weights import checkpoints


def world_size():
    """The number of ranks torchrun started (its WORLD_SIZE); 1 in a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed():
    """(rank, world, device, started): init the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    world = world_size()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device, started


def wrap(loss_module, cfg, device, world):
    """DDP (or FSDP2 with --fsdp) around the loss module under torchrun; unchanged in one process."""
    if world == 1:
        return loss_module
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for stack in [m for m in loss_module.modules() if isinstance(m, nn.ModuleList)]:
            for layer in stack:   # one shard group per decoder / vision layer, the rest in the root group
                fully_shard(layer)
        return fully_shard(loss_module)
    from torch.nn.parallel import DistributedDataParallel as DDP
    # a VLM batch may hold no image at all: the vision path then gets no gradient that step
    return DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=isinstance(loss_module.model, VLM))


def rng_state():
    state = dict(torch=torch.get_rng_state(), python=random.getstate())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, wrapped, optimizer, scheduler, step, stats, cfg, rank, world):
    """Full state (model, optimiser, scheduler, step = data position, every rank's RNG); rank 0 writes
    it to a temp file and renames, so a kill mid-write never leaves a torn checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if rank == 0:
        state = dict(model=model_sd, optimizer=optim_sd, scheduler=scheduler.state_dict(), step=step,
                     samples_seen=step * cfg.global_batch, rng=rngs, stats=stats, config=asdict(cfg))
        records.atomic_write(path, lambda tmp: torch.save(state, tmp))
    if world > 1:
        dist.barrier()


RESUME_MUST_MATCH = ("stage", "data", "template", "global_batch", "seed", "epochs", "max_steps", "group_by_length")


def load_checkpoint(path, wrapped, optimizer, scheduler, cfg, rank):
    """Restore what save_checkpoint wrote -> (step, stats); refuses a checkpoint of a different recipe."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    try:  # weights_only: tensors, numbers, strings, tuples, dicts only; never an arbitrary object
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (RuntimeError), hostile or foreign pickle (UnpicklingError), ...
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: not a readable train.py checkpoint ({type(e).__name__}: {why[:300]})") from None
    need = ("model", "optimizer", "scheduler", "step", "rng", "stats", "config")
    if not isinstance(state, dict) or not all(k in state for k in need) or not isinstance(state["config"], dict):
        raise ValueError(f"{path}: not a train.py checkpoint (needs the keys {', '.join(need)})")
    diff = [f"{k}: {state['config'][k]!r} != {getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH
            if state["config"].get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"{path}: cannot resume a different run ({'; '.join(diff)})")
    set_model_state_dict(wrapped, state["model"], options=StateDictOptions(full_state_dict=True, strict=True))
    # not strict: a parameter that never got a gradient (SigLIP's unused post_layernorm) has no AdamW state
    set_optimizer_state_dict(wrapped, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rank % len(state["rng"])])
    return state["step"], state["stats"]


def save_final(model, wrapped, cfg, rank, tokenizer_path):
    """The trained model in checkpoints.save_model's layout plus tokenizer.json, for load_model / reason.py."""
    if cfg.fsdp and dist.is_initialized():  # gather the shards into a plain copy on rank 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            with torch.device("meta"):
                plain = type(model)(model.config)
            plain.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()}, assign=True)
            model = plain
    if rank == 0:
        checkpoints.save_model(model, cfg.out)
        dst = os.path.join(cfg.out, "tokenizer.json")
        if os.path.abspath(tokenizer_path) != os.path.abspath(dst):
            records.atomic_write(dst, lambda tmp: shutil.copyfile(tokenizer_path, tmp))


class MetricsLog:
    """JSONL metrics (rank 0). On resume, a torn last line is dropped (records.repair_torn_tail), a step logged twice
    is an error naming the line, and lines after the resumed step are dropped (they will be redone). `done`: the
    log already holds the run's "done" event (a finished run resumed again logs nothing more)."""

    def __init__(self, path, rank, keep_until=None):
        self.path, self.rank, self.done = path, rank, False
        if rank == 0 and keep_until is not None and os.path.exists(path):
            records.repair_torn_tail(path)
            kept = [r for r in records.read_jsonl(path, unique="step") if r.get("step", 0) <= keep_until]
            self.done = any(r.get("event") == "done" for r in kept)
            records.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif rank == 0 and keep_until is None and os.path.exists(path):
            os.remove(path)

    def __call__(self, record):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
