"""Where one trial's time goes: timers around each phase of a default scale-study trial.

    python benchmarks/profile_trial.py [--size 1600] [--model vit_p_7mf] [--compile] [--threads 1]

Runs the trial of the default `scale_shapes` study at that size in this process (its real
config: the preset's steps, evaluations and few-shot probe), with each phase of the trainer
wrapped in a timer, and prints seconds and share per phase: process start-up (a fresh
interpreter importing the trainer), data (generating and subsetting `shapes`), the model
(building it), training steps, evaluation (model and EMA, precise BN if on), checkpoints,
few-shot probe, and recording the trial with its tables. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMES: dict[str, float] = defaultdict(float)


def timed(module, name: str, phase: str) -> None:
    """Wrap MODULE.NAME so its seconds add up under PHASE."""
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[phase] += time.perf_counter() - t0

    setattr(module, name, wrapper)


def start_up() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import vitexp.trainer"], check=True, cwd=Path(__file__).parents[1])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1600)
    ap.add_argument("--model", default="vit_p_7mf")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from vitexp import data, fewshot, trainer
    from vitexp.store import TrialStore
    from vitexp.studies import trials
    from vitexp.sweep import resolve_spec

    torch.set_num_threads(args.threads)
    spec = resolve_spec("scale", None, {"models": [args.model], "sizes": [400, 1600, 6400], "seeds": [0]},
                        {"device": "cpu", "compile": args.compile})
    cfg = next(t for t in trials(spec) if t.n_train == args.size)
    timed(data, "load_data", "data (generate, subset)")
    timed(trainer, "setup_model", "model (build)")
    timed(trainer, "train_epoch", "training steps")
    timed(trainer, "test_epoch", "evaluation (model, EMA)")
    timed(trainer, "save_checkpoint", "checkpoints")
    timed(fewshot, "fewshot_eval", "few-shot probe")
    timed(TrialStore, "record", "record the trial")
    timed(TrialStore, "rebuild", "tables (runs.csv, history.csv)")
    TIMES["process start-up (import)"] = start_up()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        row = trainer.run_trial(cfg, out=out)
        total = time.perf_counter() - t0 + TIMES["process start-up (import)"]
    print(f"{cfg.model} n={cfg.n_train} {cfg.epochs} epochs, {args.threads} thread(s), "
          f"compile={bool(args.compile)}: top1_err {row['top1_err']:.2f}%, {total:.1f} s in all")
    for phase, s in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"  {phase:34s} {s:8.2f} s  {100 * s / total:5.1f}%")
    rest = total - sum(TIMES.values())
    print(f"  {'other (setup, optimizer, glue)':34s} {rest:8.2f} s  {100 * rest / total:5.1f}%")


if __name__ == "__main__":
    main()
