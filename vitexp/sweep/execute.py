"""Run a planned study's pending trials, behind one entry point (`run`), in one of three
ways: in this process; in worker processes sharing the folder (one single-thread
worker per core on a CPU, `--trials-per-gpu K` on a GPU); under torchrun, where rank 0
picks each trial and every rank trains it with DDP.

Every trial is claimed before it runs (a claim with a heartbeat: no two processes,
here or on other hosts, ever run one trial), recorded when it ends, and released
whatever happens. A trial that raises is recorded as failed with its reason and the
study goes on (a rerun retries it); bad input stops the study (every trial would fail
the same way). SIGTERM (what SLURM sends before preemption) and SIGINT end the run
cleanly: the trial in flight keeps its last epoch checkpoint, its claim is released,
workers stop with the parent, and the CLI says how to resume.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import pandas as pd

from vitexp import data as vdata
from vitexp import runtime
from vitexp.config import TrainConfig
from vitexp.errors import Interrupted, StudyFailed, UserError
from vitexp.rows import trial_row
from vitexp.fileio import atomic_write
from vitexp.store import HEARTBEAT_S, RUNS, TrialStore, provenance
from vitexp.sweep.plan import Plan
from vitexp.tomlfile import dumps
from vitexp.ui import StudyProgress

POLL_S = 1.0  # how often the parent of worker processes looks at the folder
WAIT_S = 5.0  # how often a run waiting for trials held elsewhere looks again


def trial_label(c: dict) -> str:
    """How logs and progress name a trial (from its config or its recorded row)."""
    size = c.get("n_train") or "all"
    return f"{c['model']} n={size} {c['optimizer']} lr={c['lr']:.2g} wd={c['wd']:.2g} {c['epochs']}ep s{c['seed']}"


def trial_summary(label: str, row: dict) -> str:
    if row.get("status", "ok") != "ok":
        return f"{label}: FAILED ({row.get('error')}); a rerun retries it"
    flags = " DIVERGED" if row["diverged"] else "" if row.get("converged", True) else " (not converged)"
    return f"{label}: top1_err {row['top1_err']:.2f}%{flags}"


def trial_images(cfg: TrainConfig) -> float:
    """Training images a trial sees (for progress and ETA)."""
    return float((cfg.n_train or vdata.dataset_info(cfg.dataset).n_train or 1) * cfg.epochs)


def start_order(todo: list[tuple[str, TrainConfig]]) -> list[tuple[str, TrainConfig]]:
    """Longest first, so the workers end together instead of one running the last long
    trial alone; among equally long trials the models take turns, so a study stopped
    early has as many runs of each model (comparable partial EDFs), not all of one."""
    turns: dict[tuple, int] = {}
    order = []
    for i, (key, cfg) in enumerate(todo):
        group = (cfg.model, trial_images(cfg))
        turns[group] = turns.get(group, -1) + 1
        order.append((-trial_images(cfg), turns[group], i))
    return [todo[i] for *_, i in sorted(order)]


def logger(out: Path) -> logging.Logger:
    """The study's log.txt: one line per event, with the time and the process id."""
    log = logging.getLogger(f"vitexp.study.{out.resolve()}")
    if not log.handlers:
        h = logging.FileHandler(out / "log.txt")
        h.setFormatter(logging.Formatter("%(asctime)s %(process)d %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
        store_log = logging.getLogger("vitexp.store")  # files set aside go into the log too
        store_log.addHandler(h)
    return log


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise Interrupted in the main thread (restored on exit)."""
    def stop(signum, _frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def heartbeat(store: TrialStore, keys: list[str], bar: StudyProgress):
    """Renew the claims of the trials in flight every HEARTBEAT_S, with their progress."""
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            for key in keys:
                with contextlib.suppress(OSError):
                    store.beat(key, bar.running_images / len(keys))

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()


def run_one(store: TrialStore, key: str, cfg: TrainConfig, seen: dict | None, bar: StudyProgress,
            log: logging.Logger) -> bool:
    """Claim, train, record (or record the failure), release: one trial of a study.
    False when another live process has it."""
    from vitexp.trainer import run_trial

    label = trial_label(cfg.to_dict())
    if not store.claim(key, seen):
        return False
    _broadcast(cfg)
    bar.start_trial(label, trial_images(cfg), cfg.epochs)
    t0 = time.time()
    try:
        with heartbeat(store, [key], bar):
            row = run_trial(cfg, store=store, progress=bar)
    except (UserError, Interrupted):
        raise  # bad input stops the study; a signal stops the run (the checkpoint stays)
    except Exception as e:  # noqa: BLE001 - one failed trial must not end the study
        if runtime.dist_env().world > 1:
            raise  # the other ranks are inside the same collective: they cannot go on
        row = record_failure(store, key, cfg, e, time.time() - t0, log)
    finally:
        store.release(key)
    summary = trial_summary(label, row)
    log.info("trial %s %s", key, summary)
    bar.end_trial(summary, trial_images(cfg))
    return True


def record_failure(store: TrialStore, key: str, cfg: TrainConfig, e: Exception, wall: float,
                   log: logging.Logger) -> dict:
    """A trial that raised: recorded as failed with its reason; its checkpoint goes, so its retry starts clean."""
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    log.info("trial %s FAILED: %s\n%s", key, reason, traceback.format_exc())
    row = trial_row(cfg, key, status="failed", error=reason, wall_s=round(wall, 3), **provenance())
    store.record(key, row)
    store.checkpoint_path(key).unlink(missing_ok=True)
    _free_memory()
    return row


def run_fused(store: TrialStore, group: list[tuple[str, TrainConfig]], seen: dict, bar: StudyProgress,
              log: logging.Logger) -> list[tuple[str, TrainConfig]]:
    """Claim what it can of GROUP and train those members fused (a lone one as usual);
    returns the members other processes hold. A fused group that fails for another reason
    than bad input (out of memory, an op vmap cannot batch) runs its members one by one."""
    from vitexp import fused

    mine = [(k, c) for k, c in group if store.claim(k, seen.get(k))]
    held = [(k, c) for k, c in group if (k, c) not in mine]
    if len(mine) == 1:
        store.release(mine[0][0])
        run_one(store, *mine[0], seen.get(mine[0][0]), bar, log)
    elif mine:
        keys = [k for k, _ in mine]
        label = f"{len(mine)} fused: {trial_label(mine[0][1].to_dict())}"
        bar.start_trial(label, sum(trial_images(c) for _, c in mine), mine[0][1].epochs)
        try:
            with heartbeat(store, keys, bar):
                rows = fused.run_group([c for _, c in mine], store, progress=bar)
        except (UserError, Interrupted):
            raise
        except Exception as e:  # noqa: BLE001 - one by one instead
            log.info("fused group %s failed (%s: %s); its trials run one by one", keys, type(e).__name__, e)
            rows = None
        finally:
            for k in keys:
                store.release(k)
        if rows is None:
            bar.end_trial(f"{label}: fused run failed, running its trials one by one")
            for k, c in mine:
                run_one(store, k, c, seen.get(k), bar, log)
        for (k, c), row in zip(mine, rows or []):
            summary = trial_summary(trial_label(c.to_dict()), row)
            log.info("trial %s %s (fused %d)", k, summary, len(mine))
            bar.end_trial(summary + f" (fused {len(mine)})", trial_images(c))
    return held


def run_trials(store: TrialStore, todo: list[tuple[str, TrainConfig]], bar: StudyProgress,
               log: logging.Logger, fuse: int = 1) -> None:
    """Run every trial of TODO not yet done. Trials another live process holds are
    waited for at the end: until that process records them, or until its claim goes
    stale (a process killed without a word: after STALE_S, on any host) and they run here."""
    seen = store.finished()  # a claim checks that a trial's record is still what we saw here
    left = [(k, c) for k, c in todo if seen.get(k, {}).get("status") != "ok"]
    while left:
        if fuse > 1:
            from vitexp.fused import groups

            held = [t for g in groups(left, fuse) for t in run_fused(store, g, seen, bar, log)]
        else:
            held = [(k, c) for k, c in left if not run_one(store, k, c, seen.get(k), bar, log)]
        if held and len(held) == len(left):
            time.sleep(WAIT_S)
        now = {k: store.result(k) for k, _ in held}
        for k, c in held:
            if now[k] != seen.get(k):  # recorded by the process that held it
                bar.end_trial(trial_summary(trial_label(c.to_dict()), now[k]) + " (another process)",
                              trial_images(c))
        left = [(k, c) for k, c in held if now[k] == seen.get(k)]


# -- the one entry point ------------------------------------------------------------------------

def run(plan: Plan, workers: int | None = None, progress: bool | None = None, fuse: int | None = None) -> pd.DataFrame:
    """Run this shard's pending trials (FUSE: at most this many trials of one architecture
    train as one batched model; None: fused on a GPU, not on a CPU); returns the folder's runs table."""
    if workers is not None and workers < 1:
        raise UserError(f"--trials-per-gpu must be >= 1, got {workers}")
    if fuse is not None and fuse < 1:
        raise UserError(f"--fuse must be >= 1, got {fuse}")
    if runtime.dist_env().world > 1:
        return _torchrun(plan, progress)
    if (plan.out / "trials").is_dir():  # a kill may have fallen between a record and the tables, and what
        TrialStore(plan.out, create=False).rebuild()  # cannot be read is set aside here, so it runs again
    todo = start_order(plan.pending())
    if not todo:
        return runs_table(plan.out)
    preflight(plan, todo)
    k, threads = _workers(plan, todo, workers)
    fuse = _fuse(plan, fuse)
    with refused_leaves_no_trace(plan.out):
        store = TrialStore(plan.out)  # also sweeps what killed runs left behind
        atomic_write(plan.out / "study.toml", dumps(plan.spec))
        log = logger(plan.out)
        log.info("study %s shard %d/%d: %d trials, %d to run, %d process(es)", plan.study.kind, *plan.shard,
                 len(plan.mine), len(todo), k)
        with stop_on_signals(), StudyProgress(len(todo), sum(trial_images(c) for _, c in todo), progress) as bar:
            if k == 1 and threads is None:
                run_trials(store, todo, bar, log, fuse)
            else:
                _pool(plan, store, todo, k, threads, bar, fuse)
    store.rebuild()
    return _check_outcome(runs_table(plan.out), [k for k, _ in todo])


@contextlib.contextmanager
def refused_leaves_no_trace(out: Path):
    """Bad input found only once trials run (inside a trial, in a worker) must not leave a
    trace either, as long as no trial was recorded meanwhile: a folder this run created is
    removed; an existing one loses what this run added and gets its study.toml and log back."""
    existed = out.is_dir()
    paths = set(out.rglob("*")) if existed else set()
    keep = {p: p.read_bytes() for p in (out / "study.toml", out / "log.txt") if p.is_file()}
    try:
        yield
    except UserError:
        log = logging.getLogger(f"vitexp.study.{out.resolve()}")
        for h in list(log.handlers):  # its log file may go: the next run opens it afresh
            h.close()
            log.removeHandler(h)
            logging.getLogger("vitexp.store").removeHandler(h)
        if not any(p.suffix == ".json" and p not in paths for p in out.glob("trials/*.json")):
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for p in sorted(set(out.rglob("*")) - paths, reverse=True):  # files before their folders
                    with contextlib.suppress(OSError):
                        p.rmdir() if p.is_dir() else p.unlink()
                for p, data in keep.items():
                    atomic_write(p, data)
        raise


def preflight(plan: Plan, todo: list[tuple[str, TrainConfig]]) -> None:
    """What would make every trial fail, found before anything is written: the device,
    the data (present, readable, large enough)."""
    first = todo[0][1]
    runtime.resolve_device(first.device)
    sizes = [c.n_train for _, c in todo]
    vdata.check_data(first.dataset, first.data_dir, None if None in sizes else max(sizes), first.n_test)


def runs_table(out: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(out / RUNS, dtype={"key": str})
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def _check_outcome(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A run in which every trial it tried failed is a failure (exit non-zero)."""
    mine = runs[runs["key"].isin(keys)] if len(runs) else runs
    if len(mine) and (mine["status"] != "ok").all():
        raise StudyFailed(f"every trial failed ({len(mine)}; first: {mine['error'].iloc[0]}); "
                          f"see the log.txt of the study folder")
    return runs


def _free_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- worker processes -----------------------------------------------------------------------------

def _fuse(plan: Plan, asked: int | None) -> int:
    """Members per fused group: as asked; by default fused on CUDA only (on the CPU fusing
    measured slower than one trial after another, see vitexp/fused.py)."""
    if asked is not None:
        return asked
    from vitexp.fused import DEFAULT_CUDA_K

    return DEFAULT_CUDA_K if runtime.resolve_device(plan.trials[0][1].device).type == "cuda" else 1


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _workers(plan: Plan, todo: list, asked: int | None) -> tuple[int, int | None]:
    """(processes, threads per process; None: leave torch's default). Default: one
    process on a GPU and on one core; on a multi-core CPU one single-thread worker per
    core (at most one per trial), because small models use a core each far better than
    they share several (benchmarks/README.md)."""
    on_cpu = runtime.resolve_device(plan.trials[0][1].device).type == "cpu"
    if asked is None:
        if not on_cpu or _cores() == 1:
            return 1, None
        return min(_cores(), len(todo)), 1
    return asked, (max(1, _cores() // asked) if on_cpu and asked > 1 else None)


def _die_with_parent(parent: int) -> None:
    """A SIGKILLed parent must not leave its workers training on (Linux: PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _worker(out: str, todo: list, threads: int | None, parent: int, errors, fuse: int) -> None:
    """A worker process: the same trial loop, quiet; errors go to the parent as one line."""
    _die_with_parent(parent)
    if threads:
        import torch

        torch.set_num_threads(threads)  # K CPU workers must not each take every core
    store = TrialStore(out, create=False)
    bar = StudyProgress(len(todo), enabled=False)
    bar.quiet = True
    try:
        with stop_on_signals():
            run_trials(store, todo, bar, logger(Path(out)), fuse)
    except Interrupted as e:
        sys.exit(e.exit_code)
    except UserError as e:
        errors.put(("usage", str(e)))
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - reported by the parent in one line, traceback in log.txt
        logger(Path(out)).info("worker failed:\n%s", traceback.format_exc())
        errors.put(("error", f"{type(e).__name__}: {e}"))
        sys.exit(1)


def _pool(plan: Plan, store: TrialStore, todo: list, k: int, threads: int | None, bar: StudyProgress,
          fuse: int) -> None:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(str(plan.out), todo, threads, os.getpid(), errors, fuse))
             for _ in range(min(k, len(todo)))]
    for p in procs:
        p.start()
    try:
        _watch(procs, store, dict(todo), bar)
    except Interrupted as e:
        for p in procs:  # pass the signal on: each worker releases its trial and stops
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, e.signum)
        for p in procs:
            p.join(timeout=60)
        raise
    found = []
    while not errors.empty():
        found.append(errors.get())
    usage = [msg for what, msg in found if what == "usage"]
    if usage:
        raise UserError(usage[0])
    if found or any(p.exitcode for p in procs):
        codes = [p.exitcode for p in procs]
        raise StudyFailed(f"worker processes failed (exit codes {codes}; {found[0][1] if found else 'no message'}); "
                          f"see {plan.out / 'log.txt'} and rerun to resume")


def _watch(procs: list, store: TrialStore, todo: dict, bar: StudyProgress) -> None:
    """While workers train: one line per finished trial, the trials in flight, the ETA."""
    seen = {k: r for k, r in store.finished().items() if k in todo}
    bar.note(f"{len(procs)} worker processes, {len(todo)} trials to run")
    while True:
        alive = any(p.is_alive() for p in procs)
        for key, row in store.finished().items():
            if key in todo and seen.get(key) != row:
                seen[key] = row
                bar.end_trial(trial_summary(trial_label(todo[key].to_dict()), row), trial_images(todo[key]))
        if not alive:
            return
        flying = {k: float(c.get("images") or 0) for k, c in store.claims().items() if k in todo}
        bar.running([(trial_label(todo[k].to_dict()), f"{images / trial_images(todo[k]):.0%}", images)
                     for k, images in flying.items()])
        time.sleep(POLL_S)


# -- torchrun ---------------------------------------------------------------------------------------

def _torchrun(plan: Plan, progress: bool | None) -> pd.DataFrame:
    """Rank 0 runs the study and announces each trial; the other ranks train what it announces."""
    d, _ = runtime.init_distributed(runtime.resolve_device(plan.trials[0][1].device))
    try:
        return _lead(plan, progress) if d.main else _follow(plan)
    finally:
        runtime.close_distributed()


def _follow(plan: Plan) -> pd.DataFrame:
    """A rank other than 0: train each announced trial until rank 0 announces the end."""
    from vitexp.trainer import run_trial

    store = TrialStore(plan.out, create=False)  # reads checkpoints to resume, never writes
    while (cfg := _broadcast(None)) is not None:
        run_trial(cfg, store=store)
    return pd.DataFrame()


def _lead(plan: Plan, progress: bool | None) -> pd.DataFrame:
    """Rank 0: run the study, announcing each trial to the others."""
    todo = plan.pending()
    try:
        if todo:
            preflight(plan, todo)
            store = TrialStore(plan.out)
            atomic_write(plan.out / "study.toml", dumps(plan.spec))
            with StudyProgress(len(todo), sum(trial_images(c) for _, c in todo), progress) as bar:
                run_trials(store, todo, bar, logger(plan.out))
            store.rebuild()
    finally:
        _broadcast(None)  # the followers stop too
    return runs_table(plan.out)


def _broadcast(cfg: TrainConfig | None) -> TrainConfig | None:
    """Under torchrun, rank 0 tells the other ranks which trial comes next (None: the end)."""
    if runtime.dist_env().world <= 1:
        return cfg
    import torch.distributed as dist

    box = [cfg]
    dist.broadcast_object_list(box, src=0)
    return box[0]
