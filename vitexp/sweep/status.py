"""`vitexp status DIR`: where a study stands, read from its folder alone (it may be
running elsewhere): trials done, running (where, since when, how far), failed and left,
and an ETA from the throughput its finished trials measured."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from vitexp.errors import UserError
from vitexp.store import TrialStore
from vitexp.sweep.execute import trial_images, trial_label
from vitexp.sweep.plan import make_plan
from vitexp.sweep.presets import read_toml
from vitexp.ui import clock


def study_status(folder: str | Path) -> list[str]:
    """Lines a user reads: counts, the trials in flight, the failed ones, the ETA."""
    folder = Path(folder)
    if not (folder / "study.toml").is_file():
        raise UserError(f"{folder} holds no study (no study.toml); give a folder written by a study --out")
    plan = make_plan(read_toml(folder / "study.toml", "study file"), folder)
    store = TrialStore(folder, create=False)
    rows, claims = store.finished(), store.claims()
    keys = dict(plan.trials)
    done = [k for k in keys if rows.get(k, {}).get("status") == "ok"]
    failed = [k for k in keys if rows.get(k, {}).get("status") == "failed" and k not in claims]
    running = [k for k in keys if k in claims]
    left = [k for k in keys if k not in done and k not in failed and k not in running]
    lines = [f"{plan.study.kind} study in {folder}: {len(keys)} trials: {len(done)} done, {len(running)} running, "
             f"{len(failed)} failed, {len(left)} left"]
    for k in running:
        c = claims[k]
        since = datetime.fromtimestamp(float(c.get("time", 0)), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        share = float(c.get("images") or 0) / trial_images(keys[k])
        lines.append(f"  running {trial_label(keys[k].to_dict())}: {share:.0%} on {c.get('host')} pid {c.get('pid')} "
                     f"since {since}")
    lines += [f"  failed {trial_label(keys[k].to_dict())}: {rows[k].get('error')}" for k in failed]
    lines.append(f"ETA {clock(_eta(rows, done, running, left, keys, claims))} "
                 f"(from the finished trials' throughput, {max(len(running), 1)} process(es) at work)")
    return lines


def _eta(rows, done, running, left, keys, claims) -> float | None:
    seconds = sum(float(rows[k].get("wall_s") or 0) for k in done)
    if not done or seconds <= 0:
        return None
    speed = sum(trial_images(keys[k]) for k in done) / seconds  # training images per second of one process
    todo = sum(trial_images(keys[k]) for k in left + running) - sum(float(claims[k].get("images") or 0)
                                                                     for k in running)
    return todo / speed / max(len(running), 1)
