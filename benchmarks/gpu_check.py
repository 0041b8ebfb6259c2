"""Everything worth checking and measuring on a GPU box, in one run (benchmarks/gpu_check.sh).

Stages, each a list of `python -m vitexp ...` commands, run least proven first (a session's
15 minutes of device time may end at any point): each stage gets its estimated time (half as
much again at most, never more than the budget has left; what one leaves unused goes to the
next), each command has its own cap inside that, so one failing or slow command does not stop
the next, and a command that cannot get FLOOR seconds any more is skipped, not started to be
killed. `--only fused,speed` runs those stages alone. Estimates: an H200's seconds where
results/gpu/2026-12-04_h200 measured the command, else guessed from those:

- env          GPU, memory, versions; `vitexp doctor` (measured 25 s)
- fused        a 16-trial stability sweep fused (--fuse 16) that must not fall back to one by
               one; `vitexp bench --fuse 16` against one by one; a fused ResNet sweep (~130 s)
- speed        `vitexp bench` eager and compiled at the studies' batch 128 and at 1024 (measured
               48 s each); `vitexp train --compile` (over 48 s) (~150 s)
- resume       a killed-then-resumed `vitexp train`; a longer small ViT_C run that must land
               far below chance (~75 s)
- workers      the 16-trial sweep one trial at a time (measured 46 s) and with 4 workers (~80 s)
- correctness  a short `vitexp train` of every model family with the defaults (bf16, fused
               optimizer, channels_last CNNs; measured 12-17 s each) and a fine-tune of one at
               twice its resolution (measured 18 s) (~110 s)
- papers       `vitexp bench` of the 224 / 240 px paper models (~150 s)
- torchrun     a `vitexp train` under `python -m torch.distributed.run` (NCCL) (~20 s)
- science      with the time left: the Fashion-MNIST studies at GPU budgets (resumable: judged
               by the rows they wrote, not by their exit code)

The default budget (480 s) reaches about the workers stage; give more, or `--only`, for the
rest. A command past its cap gets SIGTERM (a trial keeps its checkpoint), then SIGKILL, and
every process it started ends with it before the next command; what it measured (rows written,
bench rows) is still reported. Everything lands in OUT/work (logs, study folders, bench
CSVs); OUT gets summary.md and summary.json and one archive of OUT/work (gpu_check.tar.gz, at
most 16 MB). `--smoke` runs every stage at the smallest size on the CPU (a CI test runs it,
so the script cannot rot while no GPU is around).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
ARCHIVE_MB = 16
TERM_GRACE = 10.0  # seconds between SIGTERM and SIGKILL for a command past its cap (a study's clean stop)


class Check:
    """Runs the stages' commands, keeps the time, the logs and the verdicts."""

    def __init__(self, out: Path, budget: float, smoke: bool, data_dir: str | None):
        self.out, self.work = out, out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0, self.budget, self.smoke = time.monotonic(), budget, smoke
        self.deadline = self.t0 + budget
        # on an H200 a CUDA process needs ~7 s to import torch and see the GPU, ~12 s to a `vitexp
        # train`'s first step: a command given less than the floor only measures that
        self.floor = 20.0 if smoke else 30.0
        self.device = "cpu" if smoke else "cuda"
        self.data_dir = data_dir
        self.rows: list[dict] = []
        self.env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "PYTHONUNBUFFERED": "1", **({"VITEXP_DATA": data_dir} if data_dir else {})}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def stage(self, seconds: float) -> None:
        """Start a stage that may use SECONDS (and no more than the budget has left)."""
        self.deadline = time.monotonic() + seconds

    def stage_left(self) -> float:
        return min(self.deadline - time.monotonic(), self.left())

    def cmd(self, stage: str, name: str, argv: list[str], cap: float, ok=None, resumable: bool = False) -> dict | None:
        """Run one command (vitexp's CLI unless ARGV starts with an executable) for at most CAP
        seconds and what its stage has left; OK(result) -> (passed, numbers) judges it (default:
        exit code 0), and reports its numbers even when it failed or ran out of time; RESUMABLE:
        a study cut short by its cap passes on what it wrote. None, and a skip row, when not even
        FLOOR seconds are left."""
        argv = [sys.executable, "-m", "vitexp", *argv] if not argv[0].startswith(("/", "nvidia")) else argv
        cap = min(cap, self.stage_left())
        if cap < self.floor:
            self.skip(stage, name, "out of time")
            return None
        log = self.work / "logs" / f"{stage}-{re.sub(r'[^A-Za-z0-9.-]+', '_', name)}.log"  # names the device returns
        log.parent.mkdir(exist_ok=True)
        t = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(map(str, argv)) + "\n")
            f.flush()
            rc = run_group(list(map(str, argv)), f, self.env, cap)
        result = {"stage": stage, "check": name, "rc": rc, "seconds": round(time.monotonic() - t, 1), "log": str(log)}
        passed, numbers = rc == 0, {}
        if ok is not None:
            judged, numbers = _judge(ok, result)
            passed = judged and (rc == 0 or (resumable and rc == "timeout"))
        result.update(passed=passed, **numbers)
        self.rows.append(result)
        print(f"[{time.monotonic() - self.t0:6.0f}s] {stage:11s} {name:28s} {'pass' if passed else 'FAIL'} "
              f"{_numbers(numbers)}", flush=True)
        return result

    def skip(self, stage: str, name: str, why: str) -> None:
        self.rows.append({"stage": stage, "check": name, "passed": None, "why": why})
        print(f"[{time.monotonic() - self.t0:6.0f}s] {stage:11s} {name:28s} skip {why}", flush=True)


def run_group(argv: list[str], log, env: dict, cap: float) -> int | str:
    """ARGV's exit code ("timeout" past CAP seconds), in a process group of its own: past the
    cap it gets SIGTERM (a study stops cleanly, its trial keeps its checkpoint), SIGKILL
    TERM_GRACE later; either way whatever it started (worker processes) is killed before this
    returns."""
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = p.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        _signal_group(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=TERM_GRACE)
        except subprocess.TimeoutExpired:
            pass
        rc = "timeout"
    _signal_group(p.pid, signal.SIGKILL)  # the stragglers: workers outlive a killed parent
    p.wait()
    return rc


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _judge(ok, result: dict) -> tuple[bool, dict]:
    """OK(result), or (False, {}) where what it reads is not there (a command that died early)."""
    try:
        return ok(result)
    except (OSError, KeyError, IndexError, ValueError, AttributeError) as e:
        return False, {"unreadable": type(e).__name__}


def _numbers(d: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def _runs(folder: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(folder / "runs.csv")
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def finite_run(folder: Path, max_err: float = 100.0):
    """A judge: every trial in FOLDER finished with a finite loss and an error below MAX_ERR."""
    def ok(_result):
        runs = _runs(folder)
        good = len(runs) > 0 and (runs.status == "ok").all() and runs.train_loss.map(math.isfinite).all() \
            and not runs.diverged.any() and (runs.top1_err < max_err).all()
        return bool(good), ({"top1_err": float(runs.top1_err.max()), "trials": len(runs)} if len(runs) else {})
    return ok


def fell_back(folder: Path) -> int:
    """Fused groups in FOLDER that failed and ran their trials one by one (the study's log says so):
    their trials still finish, so only this shows that fusing broke."""
    log = folder / "log.txt"
    return sum("fused group" in line and " failed (" in line for line in log.read_text().splitlines()) \
        if log.exists() else 0


def fused_run(folder: Path):
    """A judge: FOLDER's trials passed `finite_run` and no fused group fell back."""
    judge = finite_run(folder)

    def ok(result):
        passed, numbers = judge(result)
        n = fell_back(folder)
        return passed and n == 0, {**numbers, "fused_fell_back": n}
    return ok


# -- stages ---------------------------------------------------------------------------------------

def env_stage(c: Check) -> None:
    probe = ("import torch, json; d = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if d else 'none', "
             "'gpu_mem_gb': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if d else 0}))")
    c.cmd("env", "versions", [sys.executable, "-c", probe], 60, ok=lambda r: (True, _last_json(r["log"])))
    c.cmd("env", "doctor", ["doctor", "--device", c.device], 120)
    if shutil.which("nvidia-smi"):
        c.cmd("env", "nvidia-smi", ["nvidia-smi"], 30)


def _last_json(log: str) -> dict:
    for line in reversed(Path(log).read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def _tiny(c: Check) -> list:
    """A `vitexp train` of seconds: a few epochs of a few images."""
    return ["--dataset", "shapes", "--n-train", "256" if c.smoke else "2048", "--n-test", "128", "--epochs",
            "1" if c.smoke else "2", "--batch-size", "64", "--device", c.device]


def _sweep(c: Check, model: str, samples: str) -> list:
    """A stability sweep of SAMPLES short trials of MODEL (what the fused and workers stages run)."""
    return ["stability", "--models", model, "--samples", samples, "--epochs", "1" if c.smoke else "2",
            "--n-train", "256" if c.smoke else "5000", "--n-test", "256", "--batch-size", "64" if c.smoke else "128",
            "--device", c.device, "--no-plot", "--no-progress"]


def fused_stage(c: Check) -> None:
    model, samples = ("vit_c_7mf", "4") if c.smoke else ("vit_c_25mf", "16")
    out = c.work / "sweeps" / "fused"  # first: the default on CUDA, and it fell back on the last GPU
    c.cmd("fused", f"sweep fused {samples}", [*_sweep(c, model, samples), "--workers", "1", "--fuse", samples,
                                              "--out", out], 120, ok=fused_run(out))
    csv = c.work / "bench_fused.csv"
    c.cmd("fused", f"bench --fuse {samples}", ["bench", "--model", model, "--batch-size", "64" if c.smoke else "128",
                                               "--fuse", samples, "--steps", "2" if c.smoke else "20", "--warmup",
                                               "1" if c.smoke else "3", "--device", c.device, "--csv", csv], 120,
          ok=lambda r: (True, {"fused_x": _fused_ratio(csv)}))
    k = "2" if c.smoke else "8"  # a CNN's convs run grouped under vmap: a path of its own
    out = c.work / "sweeps" / "fused-resnet"
    c.cmd("fused", f"sweep fused {k} ResNet", [*_sweep(c, "resnet_7mf", k), "--workers", "1", "--fuse", k,
                                                "--out", out], 120, ok=fused_run(out))


def speed_stage(c: Check) -> None:
    csv = c.work / "bench.csv"
    cases = [("vit_c_7mf", 32)] if c.smoke else [("vit_c_7mf", 128), ("vit_c_7mf", 1024)]  # the studies' batch first
    compiled = not c.smoke  # --compile measures eager and compiled side by side, in one run
    for model, batch in cases:
        _bench(c, "speed", model, batch, [], csv, compiled)
    if c.smoke:
        c.skip("speed", "train --compile", "torch.compile is checked on a GPU only")
        return
    out = c.work / "train" / "compiled"
    c.cmd("speed", "train --compile", ["train", "--model", "vit_c_7mf", *_tiny(c), "--compile", "--out", out], 120,
          ok=finite_run(out))


def _bench(c: Check, stage: str, model: str, batch: int, extra: list, csv: Path, compiled: bool) -> None:
    steps = ["--steps", "2", "--warmup", "1"] if c.smoke else ["--steps", "20", "--warmup", "5"]
    name = f"bench {model} b{batch}{' eager and compiled' if compiled else ''}"
    c.cmd(stage, name, ["bench", "--model", model, "--batch-size", batch, *steps, *extra, "--device", c.device,
                        "--baseline", "--num-workers", "2", *(["--compile"] if compiled else []), "--csv", csv],
          150, ok=lambda r: (True, {**_bench_numbers(csv), **(
              {"compiled img/s": _bench_numbers(csv, "compiled")["img/s"]} if compiled else {})}))


def resume_stage(c: Check) -> None:
    killed_then_resumed(c, _tiny(c), 90)
    out = c.work / "train" / "learns"
    # a CPU minute is too short to learn shapes: the smoke run only goes through the path
    epochs = ["--epochs", "2", "--n-train", "1024"] if c.smoke else ["--epochs", "10", "--n-train", "5000"]
    c.cmd("resume", "small ViT_C learns", ["train", "--model", "vit_c_7mf", "--dataset", "shapes", *epochs,
                                            "--n-test", "1000", "--device", c.device, "--out", out], 180,
          ok=finite_run(out, 100.0 if c.smoke else 50.0))


def workers_stage(c: Check) -> None:
    model, samples = ("vit_c_7mf", "4") if c.smoke else ("vit_c_25mf", "16")
    workers = "2" if c.smoke else "4"  # a smoke run's CPU has 2 cores: 4 processes would only queue for them
    for name, opts in (("one at a time", ["--workers", "1", "--fuse", "1"]),
                       (f"{workers} worker processes", ["--workers", workers, "--fuse", "1"])):
        out = c.work / "sweeps" / name.replace(" ", "-")
        c.cmd("workers", name, [*_sweep(c, model, samples), *opts, "--out", out], 120, ok=finite_run(out))


def correctness_stage(c: Check) -> None:
    for model in ("vit_p_7mf", "vit_c_7mf", "hybrid_7mf", "regnety_25mf", "resnet_7mf", "vit_c_1gf"):
        extra = ["--n-train", "64", "--n-test", "32", "--batch-size", "32"] if model.endswith("gf") else []
        out = c.work / "train" / model
        c.cmd("correctness", f"train {model}", ["train", "--model", model, *_tiny(c), *extra, "--out", out], 60,
              ok=finite_run(out))
    out = c.work / "finetune"  # the kept weights of the ViT_P run, at twice the resolution (interpolated embeddings)
    size = ["--n-train", "100", "--steps", "2", "--batch-size", "30"] if c.smoke else ["--n-train", "500", "--steps", "20"]
    c.cmd("correctness", "finetune at 64 px", ["finetune", "--from", c.work / "train" / "vit_p_7mf", "--dataset",
                                               "shapes:5-9", *size, "--n-test", "64", "--image-size", "64", "--lr",
                                               "0.3", "--device", c.device, "--out", out], 60, ok=finite_run(out))


def papers_stage(c: Check) -> None:
    csv = c.work / "bench_papers.csv"
    # a smoke run only goes through the path: a 224 px step takes the loaded CPU minutes
    cases = ([("vit_c_1gf", 4, ["--dataset", "shapes", "--image-size", "64"])] if c.smoke else
             [("vit_c_1gf", 128, ["--dataset", "shapes", "--image-size", "224"]),
              ("regnety_4gf", 128, ["--dataset", "shapes", "--image-size", "240"]), ("vit_p_200mf", 1024, [])])
    for model, batch, extra in cases:
        _bench(c, "papers", model, batch, extra, csv, compiled=False)


def torchrun_stage(c: Check) -> None:
    out = c.work / "train" / "torchrun"
    c.cmd("torchrun", "torchrun nproc 1", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                           "--nproc_per_node", "1", "-m", "vitexp", "train", "--model", "vit_c_7mf",
                                           *_tiny(c), "--out", out], 90, ok=finite_run(out))


def killed_then_resumed(c: Check, tiny: list, cap: float) -> None:
    """Train, SIGKILL after the first epoch's checkpoint, rerun: the rerun finishes the trial."""
    out = c.work / "train" / "killed"
    argv = [sys.executable, "-m", "vitexp", "train", "--model", "vit_p_7mf", *tiny, "--epochs", "3", "--out", str(out)]
    cap = min(cap, c.stage_left())
    if cap < c.floor:
        c.skip("resume", "killed, then resumed", "out of time")
        return
    p = subprocess.Popen(argv, cwd=REPO, env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline and p.poll() is None and not list((out / "checkpoints").glob("*.pt")):
        time.sleep(0.2)
    killed = p.poll() is None
    _signal_group(p.pid, signal.SIGKILL)
    p.wait()
    judge = finite_run(out)
    c.cmd("resume", "killed, then resumed", argv[3:], cap,
          ok=lambda r: (judge(r)[0] and killed, {"killed_mid_run": killed, **judge(r)[1]}))


def _bench_numbers(csv: Path, mode: str = "fast") -> dict:
    rows = pd.read_csv(csv)
    r = rows[rows["mode"] == mode].iloc[-1]
    out = {"img/s": float(r.images_per_s), "data_frac": float(r.data_frac), "mem_gb": float(r.peak_mem_gb),
           "tflops": float(r.tflops)}
    if r.mfu == r.mfu:
        out["mfu"] = float(r.mfu)
    return out


def _fused_ratio(csv: Path) -> float:
    rows = pd.read_csv(csv)
    return float(rows[rows["mode"] == "fused"].images_per_s.iloc[-1] / rows[rows["mode"] == "one-by-one"].images_per_s.iloc[-1])


def science_stage(c: Check) -> None:
    """The Fashion-MNIST studies at GPU budgets, as far as the time left goes (they resume):
    judged by the rows they wrote and by no fused group falling back, not by their exit code."""
    def ok(r, out):
        return len(_runs(out)) > 0 and fell_back(out) == 0, {"trials": len(_runs(out)), "fused_fell_back": fell_back(out)}

    if c.smoke:
        out = c.work / "science" / "smoke"
        c.cmd("science", "scale (smoke)", ["scale-study", "--sizes", "64,128", "--steps", "2", "--seeds", "0",
                                            "--models", "vit_p_7mf", "--fewshot", "", "--n-test", "64",
                                            "--batch-size", "32", "--device", "cpu", "--no-progress",
                                            "--out", out], c.stage_left(), ok=lambda r: ok(r, out), resumable=True)
        return
    presets = ["scale_fashion-mnist", "stability_fashion-mnist", "optimizer_fashion-mnist"]
    for i, preset in enumerate(presets):
        kind = preset.split("_")[0]
        command = {"scale": "scale-study", "optimizer": "optimizer-study"}.get(kind, kind)
        out = c.work / "science" / preset
        c.cmd("science", preset, [command, "--preset", preset, "--device", "cuda", "--no-progress", "--out", out],
              c.stage_left() / (len(presets) - i), ok=lambda r, out=out: ok(r, out), resumable=True)


# stage -> (its function, its estimated seconds on an H100/H200 (None: the time left)), least proven first
STAGES = {"env": (env_stage, 25), "fused": (fused_stage, 130), "speed": (speed_stage, 150),
          "resume": (resume_stage, 75), "workers": (workers_stage, 80), "correctness": (correctness_stage, 110),
          "papers": (papers_stage, 150), "torchrun": (torchrun_stage, 20), "science": (science_stage, None)}
RESERVE = 15.0  # seconds kept for the archive and the summary


# -- the run --------------------------------------------------------------------------------------

def summary(c: Check) -> str:
    lines = ["| stage | check | result | numbers |", "|---|---|---|---|"]
    for r in c.rows:
        verdict = "skip" if r.get("passed") is None else "pass" if r["passed"] else f"FAIL (rc {r.get('rc')})"
        nums = {k: v for k, v in r.items() if k not in ("stage", "check", "rc", "log", "passed", "why")}
        lines.append(f"| {r['stage']} | {r['check']} | {verdict} | {r.get('why') or _numbers(nums)} |")
    return "\n".join(lines) + "\n"


def archive(c: Check) -> Path:
    """OUT/gpu_check.tar.gz of OUT/work without checkpoints and images, at most ARCHIVE_MB."""
    path = c.out / "gpu_check.tar.gz"
    skip = (".pt", ".png", ".pdf", ".lock")
    with tarfile.open(path, "w:gz") as tar:
        for p in sorted(c.work.rglob("*")):
            if p.is_file() and not p.name.endswith(skip) and path.stat().st_size < ARCHIVE_MB * 2**20 * 0.9:
                tar.add(p, arcname=str(p.relative_to(c.out)))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder [$OUT]")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    ap.add_argument("--only", type=_stages, default=list(STAGES),
                    help=f"comma-separated stages to run, in this order: {','.join(STAGES)} [all]")
    ap.add_argument("--science", type=float, default=None, help="seconds for the science stage [what is left]")
    ap.add_argument("--data-dir", default=os.environ.get("VITEXP_DATA"), help="folder holding fashion-mnist/ [$VITEXP_DATA]")
    ap.add_argument("--smoke", action="store_true", help="every stage at the smallest size, on the CPU")
    a = ap.parse_args(argv)
    c = Check(Path(a.out), a.budget, a.smoke, a.data_dir)
    for name in a.only:
        run, estimate = STAGES[name]
        if estimate is None:
            c.stage(a.science if a.science is not None else c.left() - RESERVE)
        else:  # a smoke run's CPU is slower than the estimates: every stage may use what is left
            c.stage(c.left() - RESERVE if a.smoke else min(1.5 * estimate, c.left() - RESERVE))
        print(f"[{time.monotonic() - c.t0:6.0f}s] stage {name}: up to {c.stage_left():.0f} s"
              + (f" (estimated {estimate} s)" if estimate else ""), flush=True)
        run(c)
    table = summary(c)
    (c.out / "summary.md").write_text(table)
    (c.out / "summary.json").write_text(json.dumps(c.rows, indent=1, default=str))
    print(f"archive: {archive(c)}")
    print(table)
    failed = [r for r in c.rows if r.get("passed") is False]
    return 1 if failed else 0


def _stages(text: str) -> list[str]:
    """--only's stages, in the run's order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in STAGES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown stage {bad[0] if bad else '(none)'}; pick from {','.join(STAGES)}")
    return [n for n in STAGES if n in names]


if __name__ == "__main__":
    sys.exit(main())
