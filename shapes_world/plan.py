"""How shapes.py runs its steps: each train.py or evaluate.py run is a Step, run in worker processes as soon as the
steps it reads are done, and skipped when its output is complete and its inputs are unchanged.

A finished step leaves a stamp (shapes_step.json) next to its output: its exact options and a fingerprint of every
input (the stamp of the step that made it, or, for files no step made, their sha256). A rerun compares stamps, so
no finished work is redone and no stale result is kept; an interrupted step resumes (train.py --resume, and
evaluate.py's resumable outputs).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import NamedTuple

import torch

import evaluate
import train
from storage import records

STAMP = "shapes_step.json"


def _fingerprint(path: str):
    """What a step read from `path`: the stamp of the step that made it (which holds that step's own inputs, so a
    change anywhere upstream shows), or, for files no step made (the shipped backbones, the true-description
    file), the sha256 of their contents (a few MB: milliseconds)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    stamp = _read_stamp(folder)
    if stamp is not None:
        return stamp
    files = sorted(os.listdir(path)) if os.path.isdir(path) else [os.path.basename(path)]
    return {f: _sha256(os.path.join(folder, f)) for f in files if os.path.isfile(os.path.join(folder, f))}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _with_inputs(options: dict, values, out: str) -> dict:
    """options + {"inputs": fingerprint of every existing path among `values` but the step's own output}: a step
    whose model, data or backbone changed since its stamp is not skipped."""
    paths = sorted({v for v in map(str, values) if os.path.exists(v) and os.path.abspath(v) != os.path.abspath(out)})
    return {**options, "inputs": {p: _fingerprint(p) for p in paths}}


def is_done(folder: str, options: dict, *outputs: str) -> bool:
    """True if `folder` holds a complete stamp of exactly `options` and every output file (relative to it)."""
    stamp = _read_stamp(folder)
    return (stamp == {"options": json.loads(json.dumps(options)), "complete": True}
            and all(os.path.exists(os.path.join(folder, o)) for o in outputs))


def _read_stamp(folder: str):
    path = os.path.join(folder, STAMP)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def begin(folder: str, options: dict) -> None:
    """Before a step runs: a folder left by a step with other options is cleared (its files cannot be
    resumed); one left by the same step, interrupted, is kept so the step resumes."""
    stamp = _read_stamp(folder)
    if stamp is not None and stamp["options"] != json.loads(json.dumps(options)):
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    records.atomic_write_json(os.path.join(folder, STAMP), {"options": options, "complete": False})


def finish(folder: str, options: dict) -> None:
    records.atomic_write_json(os.path.join(folder, STAMP), {"options": options, "complete": True})


def _quietly(log_path: str, fn, *args):
    """fn(*args) with its stdout/stderr (configs, tables, progress) appended to log_path."""
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return fn(*args)


def command_line(tool: str, options) -> str:
    """TrainConfig fields (dict) or an argv list -> the equivalent shell command (for the log)."""
    if isinstance(options, dict):
        options = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return " ".join(["python", tool] + [shlex.quote(a) for a in options])


def train_step(options: dict, log: str, say) -> tuple[str, bool]:
    """One train.py run in this process unless its model is already complete. -> (the model folder, whether it
    ran now)."""
    out = options["out"]
    stamp = _with_inputs(options, options.values(), out)
    if is_done(out, stamp, "config.json", "model.safetensors"):
        say(f"done before: {out}")
        return out, False
    say(command_line("train.py", options))
    begin(out, stamp)
    result = _quietly(log, train.train, {**options, "progress": False, "save_every": 50, "resume": True})
    finish(out, stamp)
    tail, first = result["losses"][-10:], result["steps"] - len(result["losses"])
    if tail:
        resumed = f" (resumed after step {first})" if first else ""
        say(f"loss {result['losses'][0]:.3f} -> {sum(tail) / len(tail):.3f} over {len(result['losses'])} steps"
            + resumed)
    return out, True


def evaluate_step(argv: list, out: str, results_file: str, log: str, say) -> tuple[dict, bool]:
    """One evaluate.py run (resumed if interrupted) unless its results are complete. -> (the results dict, whether
    it ran now)."""
    argv = [*argv, "--out", out]
    stamp = _with_inputs({"argv": argv}, argv, out)
    ran = not is_done(out, stamp, results_file)
    if ran:
        say(command_line("evaluate.py", argv))
        begin(out, stamp)
        _quietly(log, evaluate.main, argv)
        finish(out, stamp)
    with open(os.path.join(out, results_file)) as f:
        return json.load(f), ran


@dataclass
class Step:
    """One train.py or evaluate.py run of the plan: fn(*args, log, say) once every step in `needs` is done."""
    name: str      # "caption-L", "eval extract+think-L": also its log file, <out>/logs/<name>.log
    size: str
    kind: str      # "train" or "eval": of the steps ready, training goes first
    needs: tuple   # names of the steps whose outputs it reads
    fn: object     # train_step or evaluate_step (module level: a worker process imports it)
    args: tuple
    cost: float = 1.0   # a rough guess of its seconds on one core: only for the time-left estimate


class Finished(NamedTuple):
    """A step of the plan once done: its fn's (value, ran now) and the seconds from the run's start at its end."""
    value: object
    ran: bool
    seconds: float


class Say:
    """A step's progress lines, "[L   123 s] ...", timed from the start of the run (picklable, for the workers)."""

    def __init__(self, size: str, start: float):
        self.size, self.start = size, start

    def __call__(self, text: str) -> None:
        print(f"[{self.size} {time.time() - self.start:5.0f} s] {text}", flush=True)


def run_step(step: Step, log_dir: str, start: float):
    """One step in this (worker) process, on one thread: tiny models run faster on one thread each than on two
    competing ones. The thread count is put back after it (with jobs=1 the steps run in the caller's process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return step.fn(*step.args, os.path.join(log_dir, f"{step.name}.log"), Say(step.size, start))
    finally:
        torch.set_num_threads(threads)


def run_plan(steps: list[Step], jobs: int, log_dir: str, start: float) -> dict:
    """Every step, up to `jobs` at a time in worker processes, each once the steps it needs are done. Of the
    steps ready, training goes first, then the larger size (the later one in the plan: its chain is the longest),
    then plan order. -> {name: Finished}. A failing step stops the run with its
    error (the steps already running finish first); a rerun skips what is done."""
    os.makedirs(log_dir, exist_ok=True)
    sizes = list(dict.fromkeys(s.size for s in steps))
    rank = {s.name: (s.kind != "train", -sizes.index(s.size), i) for i, s in enumerate(steps)}
    pending, done = list(steps), {}
    total = sum(s.cost for s in steps)
    print(f"[{time.time() - start:5.0f} s] {len(steps)} steps; about {total / max(jobs, 1) / 60:.0f} min "
          "on a quiet 2-core Intel Xeon (the guesses in shapes.py; the lines below rescale them as steps end)",
          flush=True)

    def progress(name):
        """"[ 123 s] 5/20 steps done (caption-S); about 4.2 min left": the guessed costs of the steps left, over the
        workers, times this machine's measured speed (the seconds so far per guessed second of the steps this call
        ran, the guess counting as two minutes of measurement so that the first steps do not swing it; steps done
        before cost nothing and do not count)."""
        elapsed = time.time() - start
        ran = sum(s.cost for s in steps if s.name in done and done[s.name].ran) / max(jobs, 1)
        remaining = sum(s.cost for s in steps if s.name not in done) / max(jobs, 1)
        left = remaining * (elapsed + 120) / (ran + 120)
        print(f"[{elapsed:5.0f} s] {len(done)}/{len(steps)} steps done ({name}); about {left / 60:.1f} min left",
              flush=True)

    def ready():
        return sorted((s for s in pending if all(n in done for n in s.needs)), key=lambda s: rank[s.name])

    if jobs <= 1:
        while pending:
            step = ready()[0]
            pending.remove(step)
            done[step.name] = Finished(*run_step(step, log_dir, start), time.time() - start)
            progress(step.name)
        return done
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        running = {}
        while pending or running:
            for step in ready()[:jobs - len(running)]:
                pending.remove(step)
                running[pool.submit(run_step, step, log_dir, start)] = step.name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                done[name] = Finished(*future.result(), time.time() - start)
                progress(name)
    return done
