"""Everything worth checking and measuring on a GPU box, in one run (benchmarks/gpu_check.sh).

Stages, each a list of `python -m vitexp ...` commands, run in order of worth: a stage may
use a share of the time left (what one stage leaves unused goes to the next), each command
has its own cap inside that, so one failing or slow command does not stop the next, and a
command that cannot get FLOOR seconds any more is skipped, not started to be killed:

- env          GPU, memory, versions; `vitexp doctor`
- correctness  a short `vitexp train` of every model family (small levels, and one 224 px
               paper model) with the defaults (bf16, fused optimizer, channels_last CNNs),
               a fine-tune of one at twice its resolution;
               once compiled, once under torchrun (NCCL), a killed-then-resumed run, and a
               longer small ViT_C run that must land far below chance
- speed        `vitexp bench` against its baseline, with and without --compile
- sweeps       one 16-trial stability study one trial at a time, with --workers 4,
               and fused (--fuse 16); `vitexp bench --fuse 16`
- science      with the time left: the Fashion-MNIST studies at GPU budgets (resumable)

Everything lands in OUT/work (logs, study folders, bench CSVs); OUT gets summary.md and
summary.json and one archive of OUT/work (gpu_check.tar.gz, at most 16 MB). `--smoke`
runs every stage at the smallest size on the CPU (a CI test runs it, so the script
cannot rot while no GPU is around).
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

    def cmd(self, stage: str, name: str, argv: list[str], cap: float, ok=None) -> dict | None:
        """Run one command (vitexp's CLI unless ARGV starts with an executable) for at most CAP
        seconds and what its stage has left; OK(result) -> (passed, numbers) judges it (default:
        exit code 0). None, and a skip row, when not even FLOOR seconds are left."""
        argv = [sys.executable, "-m", "vitexp", *argv] if not argv[0].startswith(("/", "torchrun", "nvidia")) else argv
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
            try:
                p = subprocess.run(list(map(str, argv)), stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=self.env,
                                   timeout=cap, start_new_session=True)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        result = {"stage": stage, "check": name, "rc": rc, "seconds": round(time.monotonic() - t, 1), "log": str(log)}
        passed, numbers = (rc == 0, {}) if ok is None or rc != 0 else ok(result)
        result.update(passed=passed, **numbers)
        self.rows.append(result)
        print(f"[{time.monotonic() - self.t0:6.0f}s] {stage:11s} {name:28s} {'pass' if passed else 'FAIL'} "
              f"{_numbers(numbers)}", flush=True)
        return result

    def skip(self, stage: str, name: str, why: str) -> None:
        self.rows.append({"stage": stage, "check": name, "passed": None, "why": why})
        print(f"[{time.monotonic() - self.t0:6.0f}s] {stage:11s} {name:28s} skip {why}", flush=True)


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


def correctness_stage(c: Check) -> None:
    tiny = ["--dataset", "shapes", "--n-train", "256" if c.smoke else "2048", "--n-test", "128", "--epochs",
            "1" if c.smoke else "2", "--batch-size", "64", "--device", c.device]
    each = 90  # seconds: 2 epochs of 2048 images, on a GPU, take a few
    for model in ("vit_p_7mf", "vit_c_7mf", "hybrid_7mf", "regnety_25mf", "resnet_7mf", "vit_c_1gf"):
        extra = ["--n-train", "64", "--n-test", "32", "--batch-size", "32"] if model.endswith("gf") else []
        out = c.work / "train" / model
        c.cmd("correctness", f"train {model}", ["train", "--model", model, *tiny, *extra, "--out", out], each,
              ok=finite_run(out))
    out = c.work / "finetune"  # the kept weights of the ViT_P run, at twice the resolution (interpolated embeddings)
    size = ["--n-train", "100", "--steps", "2", "--batch-size", "30"] if c.smoke else ["--n-train", "500", "--steps", "20"]
    c.cmd("correctness", "finetune at 64 px", ["finetune", "--from", c.work / "train" / "vit_p_7mf", "--dataset",
                                               "shapes:5-9", *size, "--n-test", "64", "--image-size", "64", "--lr",
                                               "0.3", "--device", c.device, "--out", out], each, ok=finite_run(out))
    if c.smoke:
        c.skip("correctness", "train --compile", "torch.compile is checked on a GPU only")
    else:
        out = c.work / "train" / "compiled"
        c.cmd("correctness", "train --compile", ["train", "--model", "vit_c_7mf", *tiny, "--compile", "--out", out],
              each * 2, ok=finite_run(out))
    out = c.work / "train" / "torchrun"
    c.cmd("correctness", "torchrun nproc 1", ["torchrun", "--standalone", "--nproc_per_node", "1", "-m", "vitexp", "train",
                                              "--model", "vit_c_7mf", *tiny, "--out", out], each, ok=finite_run(out))
    killed_then_resumed(c, tiny, each)
    out = c.work / "train" / "learns"
    # a CPU minute is too short to learn shapes: the smoke run only goes through the path
    epochs = ["--epochs", "2", "--n-train", "1024"] if c.smoke else ["--epochs", "10", "--n-train", "5000"]
    c.cmd("correctness", "small ViT_C learns", ["train", "--model", "vit_c_7mf", "--dataset", "shapes", *epochs,
                                                 "--n-test", "1000", "--device", c.device, "--out", out], each * 2,
          ok=finite_run(out, 100.0 if c.smoke else 50.0))


def killed_then_resumed(c: Check, tiny: list, cap: float) -> None:
    """Train, SIGKILL after the first epoch's checkpoint, rerun: the rerun finishes the trial."""
    out = c.work / "train" / "killed"
    argv = [sys.executable, "-m", "vitexp", "train", "--model", "vit_p_7mf", *tiny, "--epochs", "3", "--out", str(out)]
    cap = min(cap, c.stage_left())
    if cap < c.floor:
        c.skip("correctness", "killed, then resumed", "out of time")
        return
    p = subprocess.Popen(argv, cwd=REPO, env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline and p.poll() is None and not list((out / "checkpoints").glob("*.pt")):
        time.sleep(0.2)
    killed = p.poll() is None
    if killed:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    judge = finite_run(out)
    c.cmd("correctness", "killed, then resumed", argv[3:], cap,
          ok=lambda r: (judge(r)[0] and killed, {"killed_mid_run": killed, **judge(r)[1]}))


def speed_stage(c: Check) -> None:
    csv = c.work / "bench.csv"
    if c.smoke:
        cases = [("vit_c_7mf", 32, [])]
    else:
        cases = [("vit_c_7mf", 1024, []), ("vit_c_1gf", 128, ["--dataset", "shapes", "--image-size", "224"]),
                 ("regnety_4gf", 128, ["--dataset", "shapes", "--image-size", "240"]), ("vit_p_200mf", 1024, []),
                 ("vit_c_7mf", 128, [])]  # most worth first: the studies' GPU batch, then the papers' models
    compiled = not c.smoke  # --compile measures eager and compiled side by side, in one run
    for model, batch, extra in cases:
        steps = ["--steps", "2", "--warmup", "1"] if c.smoke else ["--steps", "20", "--warmup", "5"]
        name = f"bench {model} b{batch}{' eager and compiled' if compiled else ''}"
        c.cmd("speed", name, ["bench", "--model", model, "--batch-size", batch, *steps, *extra, "--device", c.device,
                              "--baseline", "--num-workers", "2", *(["--compile"] if compiled else []), "--csv", csv],
              150, ok=lambda r: (True, {**_bench_numbers(csv), **(
                  {"compiled img/s": _bench_numbers(csv, "compiled")["img/s"]} if compiled else {})}))


def _bench_numbers(csv: Path, mode: str = "fast") -> dict:
    rows = pd.read_csv(csv)
    r = rows[rows["mode"] == mode].iloc[-1]
    out = {"img/s": float(r.images_per_s), "data_frac": float(r.data_frac), "mem_gb": float(r.peak_mem_gb),
           "tflops": float(r.tflops)}
    if r.mfu == r.mfu:
        out["mfu"] = float(r.mfu)
    return out


def sweeps_stage(c: Check) -> None:
    model = "vit_c_7mf" if c.smoke else "vit_c_25mf"
    samples, n = ("4", "256") if c.smoke else ("16", "5000")
    common = ["stability", "--models", model, "--samples", samples, "--epochs", "1" if c.smoke else "2",
              "--n-train", n, "--n-test", "256", "--batch-size", "64" if c.smoke else "128", "--device", c.device,
              "--no-plot", "--no-progress"]
    workers = "2" if c.smoke else "4"  # a smoke run's CPU has 2 cores: 4 processes would only queue for them
    for name, opts in (("fused", ["--workers", "1", "--fuse", samples]),  # first: the default on CUDA
                       ("one at a time", ["--workers", "1", "--fuse", "1"]),
                       (f"{workers} worker processes", ["--workers", workers, "--fuse", "1"])):
        out = c.work / "sweeps" / name.replace(" ", "-")
        c.cmd("sweeps", name, [*common, *opts, "--out", out], 120, ok=fused_run(out))
    csv = c.work / "bench_fused.csv"
    c.cmd("sweeps", f"bench --fuse {samples}", ["bench", "--model", "vit_c_7mf" if c.smoke else "vit_c_25mf",
                                                "--batch-size", "64" if c.smoke else "128", "--fuse", samples,
                                                "--steps", "2" if c.smoke else "20", "--warmup", "1" if c.smoke else "3",
                                                "--device", c.device, "--csv", csv], 120,
          ok=lambda r: (True, {"fused_x": _fused_ratio(csv)}))


def _fused_ratio(csv: Path) -> float:
    rows = pd.read_csv(csv)
    return float(rows[rows["mode"] == "fused"].images_per_s.iloc[-1] / rows[rows["mode"] == "one-by-one"].images_per_s.iloc[-1])


def science_stage(c: Check) -> None:
    """The Fashion-MNIST studies at GPU budgets, as far as the time left goes (they resume)."""
    presets = ["scale_fashion-mnist", "stability_fashion-mnist", "optimizer_fashion-mnist"]
    if c.smoke:
        c.cmd("science", "scale (smoke)", ["scale-study", "--sizes", "64,128", "--steps", "2", "--seeds", "0",
                                            "--models", "vit_p_7mf", "--fewshot", "", "--n-test", "64",
                                            "--batch-size", "32", "--device", "cpu", "--no-progress",
                                            "--out", c.work / "science" / "smoke"], c.stage_left())
        return
    for i, preset in enumerate(presets):
        kind = preset.split("_")[0]
        command = {"scale": "scale-study", "optimizer": "optimizer-study"}.get(kind, kind)
        out = c.work / "science" / preset
        c.cmd("science", preset, [command, "--preset", preset, "--device", "cuda", "--no-progress", "--out", out],
              c.stage_left() / (len(presets) - i),
              ok=lambda r, out=out: (fell_back(out) == 0, {"trials": len(_runs(out)), "fused_fell_back": fell_back(out)}))


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
    ap.add_argument("--science", type=float, default=None, help="seconds for the science stage [what is left]")
    ap.add_argument("--data-dir", default=os.environ.get("VITEXP_DATA"), help="folder holding fashion-mnist/ [$VITEXP_DATA]")
    ap.add_argument("--smoke", action="store_true", help="every stage at the smallest size, on the CPU")
    a = ap.parse_args(argv)
    c = Check(Path(a.out), a.budget, a.smoke, a.data_dir)
    # each stage's share of the time left when it starts; the science stage gets the rest
    shares = {"correctness": 0.5, "speed": 0.5, "sweeps": 0.6} if not a.smoke else {"correctness": 0.4, "speed": 0.15,
                                                                                   "sweeps": 0.6}
    env_stage(c)
    for name, run in (("correctness", correctness_stage), ("speed", speed_stage), ("sweeps", sweeps_stage)):
        c.stage(shares[name] * c.left())
        run(c)
    c.stage(a.science if a.science is not None else c.left() - 15)  # 15 s: the archive and the summary
    science_stage(c)
    table = summary(c)
    (c.out / "summary.md").write_text(table)
    (c.out / "summary.json").write_text(json.dumps(c.rows, indent=1, default=str))
    print(f"archive: {archive(c)}")
    print(table)
    failed = [r for r in c.rows if r.get("passed") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
