"""Run a planned study's pending trials, behind one entry point (`run`), in one of three
ways: in this process; in worker processes sharing the folder (`pool.py`); under
torchrun, where rank 0 picks each trial and every rank trains it (`torchrun.py`).

Every trial is claimed before it runs (a claim with a heartbeat: no two processes,
here or on other hosts, ever run one trial), recorded when it ends, and released
whatever happens. A trial that raises is recorded as failed with its reason and the
study goes on (a rerun retries it); bad input stops the study (every trial would fail
the same way). SIGTERM (what SLURM sends before preemption) and SIGINT end the run
cleanly: the trial in flight keeps its last epoch checkpoint, its claim is released,
workers stop with the parent, and the CLI says how to resume.
"""

from __future__ import annotations

import socket
import time
import traceback
from typing import Callable

import pandas as pd

from vitexp import runtime
from vitexp.config import TrainConfig
from vitexp.errors import Interrupted, StudyFailed, UserError, stop_on_signals
from vitexp.provenance import provenance
from vitexp.rows import trial_row
from vitexp.store import STALE_S, TrialStore, claim_age
from vitexp.sweep.plan import Plan, check_folder, preflight, start_order
from vitexp.tomlfile import dumps
from vitexp.ui import StudyProgress, clock, study_progress, trial_images, trial_label, trial_summary

WAIT_S = 5.0  # how often a run waiting for trials held elsewhere looks again
MAX_WORKERS = 256  # worker processes of one run: beyond this, a typo
MAX_FUSE = 64  # members of one fused group: beyond this, a typo (and memory for K models at once)
OnStart = Callable[[TrainConfig], object]


def run_one(store: TrialStore, key: str, cfg: TrainConfig, seen: dict | None, bar: StudyProgress,
            on_start: OnStart | None = None) -> bool:
    """Claim, train, record (or record the failure), release: one trial of a study.
    False when another live process has it."""
    if not store.claim(key, seen):
        return False
    _train_claimed(store, key, cfg, bar, on_start)
    return True


def _train_claimed(store: TrialStore, key: str, cfg: TrainConfig, bar: StudyProgress,
                   on_start: OnStart | None = None) -> None:
    from vitexp.trainer import run_trial

    label = trial_label(cfg.to_dict())
    if on_start is not None:
        on_start(cfg)
    bar.start_trial(label, trial_images(cfg), cfg.epochs)
    t0 = time.time()

    def progress(event: dict) -> None:
        if event["event"] == "resumed":
            store.logger().info("resumed %s from epoch %d of %d", key, event["epoch"], cfg.epochs)
        bar(event)

    try:
        with store.heartbeat([key], lambda: (bar.running_images, bar.resumed_from)):
            row = run_trial(cfg, store=store, progress=progress)
    except (UserError, Interrupted):
        raise  # bad input stops the study; a signal stops the run (the checkpoint stays)
    except Exception as e:  # noqa: BLE001 - one failed trial must not end the study
        if runtime.dist_env().world > 1:
            raise  # the other ranks are inside the same collective: they cannot go on
        row = record_failure(store, key, cfg, e, time.time() - t0)
    finally:
        store.release(key)
    summary = trial_summary(label, row)
    store.logger().info("trial %s %s", key, summary)
    bar.end_trial(summary, trial_images(cfg), row)


def record_failure(store: TrialStore, key: str, cfg: TrainConfig, e: Exception, wall: float) -> dict:
    """A trial that raised: recorded as failed with its reason; its checkpoint goes, so its retry starts clean."""
    reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    store.logger().info("trial %s FAILED: %s\n%s", key, reason, traceback.format_exc())
    row = trial_row(cfg, key, status="failed", error=reason, wall_s=round(wall, 3), **provenance())
    store.record(key, row)
    store.checkpoint_path(key).unlink(missing_ok=True)
    runtime.free_memory()
    return row


def run_fused(store: TrialStore, group: list[tuple[str, TrainConfig]], seen: dict,
              bar: StudyProgress) -> list[tuple[str, TrainConfig]]:
    """Claim what it can of GROUP and train those members fused (a lone one as usual);
    returns the members other processes hold. A fused group that fails for another reason
    than bad input (out of memory, an op vmap cannot batch) runs its members one by one."""
    from vitexp import fused

    if len(group) == 1:
        return [] if run_one(store, *group[0], seen.get(group[0][0]), bar) else group
    mine = [(k, c) for k, c in group if store.claim(k, seen.get(k))]
    held = [(k, c) for k, c in group if (k, c) not in mine]
    if len(mine) == 1:
        _train_claimed(store, *mine[0], bar)
    elif mine:
        keys = [k for k, _ in mine]
        label = f"{len(mine)} fused: {trial_label(mine[0][1].to_dict())}"
        bar.start_trial(label, sum(trial_images(c) for _, c in mine), mine[0][1].epochs)
        try:
            with store.heartbeat(keys, lambda: (bar.running_images / len(keys), bar.resumed_from)):
                rows = fused.run_group([c for _, c in mine], store, progress=bar)
        except (UserError, Interrupted):
            raise
        except Exception as e:  # noqa: BLE001 - one by one instead
            store.logger().info("fused group %s failed (%s: %s); its trials run one by one", keys,
                                type(e).__name__, e)
            rows = None
        finally:
            for k in keys:
                store.release(k)
        if rows is None:
            bar.say(f"{label}: fused run failed, running its trials one by one")
            for k, c in mine:
                run_one(store, k, c, seen.get(k), bar)
        for (k, c), row in zip(mine, rows or []):
            summary = trial_summary(trial_label(c.to_dict()), row)
            store.logger().info("trial %s %s (fused %d)", k, summary, len(mine))
            bar.end_trial(summary + f" (fused {len(mine)})", trial_images(c), row)
    return held


def run_trials(store: TrialStore, todo: list[tuple[str, TrainConfig]], seen: dict[str, dict],
               bar: StudyProgress, fuse: int = 1, on_start: OnStart | None = None) -> None:
    """Run every trial of TODO not yet done (SEEN: the records when the run was planned; a
    claim checks a trial's record is still that). Trials another live process holds are
    waited for at the end: until that process records them, or until its claim goes
    stale (a process killed without a word: after STALE_S, on any host) and they run here."""
    from vitexp.fused import groups

    left = [(k, c) for k, c in todo if seen.get(k, {}).get("status") != "ok"]
    told: set[tuple] = set()
    while left:
        pending = {k for k, _ in left}
        waiting = [(k, c) for k, c in left if _source_pending(store, c, pending)]
        ready = [t for t in left if t not in waiting]
        if fuse > 1:
            held = [t for g in groups(ready, fuse) for t in run_fused(store, g, seen, bar)]
        else:
            held = [(k, c) for k, c in ready if not run_one(store, k, c, seen.get(k), bar, on_start)]
        held += waiting
        if held and len(held) == len(left):
            _say_who_holds(store, held, bar, told)
            time.sleep(WAIT_S)
        now = {k: store.result(k) for k, _ in held}
        for k, c in held:
            if now[k] != seen.get(k):  # recorded by the process that held it
                bar.end_trial(trial_summary(trial_label(c.to_dict()), now[k]) + " (another process)",
                              trial_images(c), now[k])
        left = [(k, c) for k, c in held if now[k] == seen.get(k)]


def _source_pending(store: TrialStore, cfg: TrainConfig, pending: set[str]) -> bool:
    """A fine-tune or a student waits while a trial whose weights it reads is still to run here
    or held by another process; one nobody runs lets it start (and fail, saying why)."""
    return any(store.result(k) is None and (k in pending or store.claim_of(k) is not None) for k in cfg.needs())


def _say_who_holds(store: TrialStore, held: list[tuple[str, TrainConfig]], bar: StudyProgress, told: set) -> None:
    """Once per claim: which process holds a trial this run waits for, and when it takes over."""
    for key, cfg in held:
        claim = store.claim_of(key) or {}
        who = (claim.get("host"), claim.get("pid"), claim.get("start"))
        if who in told or not claim:
            continue
        told.add(who)
        age = claim_age(claim)
        local = claim.get("host") == socket.gethostname()
        when = ("when that process ends" if local else
                f"if its heartbeat stays silent, in {clock(max(STALE_S - age, 0))}")
        text = (f"waiting for {trial_label(cfg.to_dict())}: held by {claim.get('host')} pid {claim.get('pid')} "
                f"(heartbeat {age:.0f} s ago); it runs here {when}")
        store.logger().info(text)
        bar.say(text)


def check_options(workers: int | None, fuse: int | None) -> None:
    """The run options every way of running a study takes, checked before anything starts."""
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise UserError(f"--workers must be in [1, {MAX_WORKERS}], got {workers}")
    if fuse is not None and not 1 <= fuse <= MAX_FUSE:
        raise UserError(f"--fuse must be in [1, {MAX_FUSE}], got {fuse}")


def run(plan: Plan, workers: int | None = None, progress: bool | None = None, fuse: int | None = None) -> pd.DataFrame:
    """Run this shard's pending trials (WORKERS: processes, None: vitexp's default for the
    device; FUSE: at most this many trials of one architecture train as one batched model,
    None: fused on a GPU, not on a CPU); returns the folder's runs table."""
    check_options(workers, fuse)
    if runtime.dist_env().world > 1:
        for _, cfg in plan.mine:  # on every rank, before any waits for another: each says it and stops
            runtime.check_batch(cfg.batch_size, runtime.dist_env().world)
        from vitexp.sweep import torchrun

        return torchrun.run(plan, lambda on_start: _execute(plan, 1, progress, 1, on_start))
    return _execute(plan, workers, progress, fuse)


def _execute(plan: Plan, workers: int | None, progress: bool | None, fuse: int | None,
             on_start: OnStart | None = None) -> pd.DataFrame:
    """The run of one process (rank 0 under torchrun): tables brought up to date (a kill may have
    fallen between a record and the tables; what cannot be read is set aside, so it runs again),
    then the pending trials, here or in workers."""
    from vitexp.fused import default_k
    from vitexp.sweep.pool import run_pool

    store = plan.store
    seen = store.refresh()  # the one read of the records this run makes
    todo = start_order(plan.pending(seen))
    if not todo:
        return store.runs()
    preflight(plan, todo)
    k, threads = runtime.workers(todo[0][1].device, todo, workers)
    fuse = default_k(todo[0][1].device) if fuse is None else fuse
    before = store.snapshot()
    # checked again under the lock; a run that is no study writes no study.toml
    store.claim_for(lambda: check_folder(store, plan.spec if plan.study else plan.kind),
                    dumps(plan.spec) if plan.study else None)
    with store.undo_on_refusal(before):
        log = store.logger()
        store.create({key for key, r in seen.items() if r.get("status") == "ok"})  # sweeps what killed runs left
        for source in plan.staged:
            store.stage_weights(source.weights, source.key)
        log.info("%s %s shard %d/%d: %d trials, %d to run, %d process(es)", "study" if plan.study else "run",
                 plan.kind, *plan.shard, len(plan.mine), len(todo), k)
        for note in plan.notes:
            log.info(note)
        try:
            with stop_on_signals(), study_progress([c for _, c in todo], k, progress) as bar:
                if k == 1 and threads is None:
                    run_trials(store, todo, seen, bar, fuse, on_start)
                else:
                    run_pool(run_trials, store, todo, seen, k, threads, bar, fuse)
        except Interrupted as e:
            store.logger().info("interrupted (%s); rerun the same command to resume", e.name)
            raise
        finally:
            store.rebuild()
    return _check_outcome(store.runs(), [key for key, _ in todo])


def _check_outcome(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A run in which every trial it tried failed is a failure (exit non-zero)."""
    mine = runs[runs["key"].isin(keys)] if len(runs) else runs
    if len(mine) and (mine["status"] != "ok").all():
        raise StudyFailed(f"every trial failed ({len(mine)}; first: {mine['error'].iloc[0]}); "
                          f"see the log.txt of the study folder")
    return runs
