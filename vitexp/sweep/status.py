"""`vitexp status DIR`: where a study stands, read from its folder alone (it may be
running elsewhere): trials done, running (where, since when, how far), failed and left,
and an ETA from its finished trials' speeds (the progress line's own `Eta`)."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from vitexp.errors import UserError
from vitexp.tomlfile import read_toml
from vitexp.store import TrialStore
from vitexp.sweep.plan import make_plan
from vitexp.ui import Eta, clock, trial_costs, trial_images, trial_label, trial_summary


def train_status(store: TrialStore) -> list[str]:
    """A `vitexp train` folder: its trials, each with its error and flags (or why it failed),
    and the one still running, if any."""
    rows, claims = store.refresh(), store.claims()
    lines = [f"train folder {store.root}: {len(rows)} trial(s) recorded, {len(claims)} running"]
    lines += [f"  {trial_summary(trial_label(r), r)}" for r in rows.values() if r.get("model")]
    lines += [f"  running {k} on {c.get('host')} pid {c.get('pid')} since {_since(c)}" for k, c in claims.items()]
    return lines


def study_status(folder: str | Path) -> list[str]:
    """Lines a user reads: counts, the trials in flight, the failed ones, the ETA."""
    store = TrialStore(folder, create=False)
    spec = store.read_spec() if Path(folder).is_dir() else None
    if spec is None and store.exists() and store.finished():
        return train_status(store)
    if spec is None:
        raise UserError(f"{folder} holds no study (no study.toml); give a folder written by a study --out")
    plans = [make_plan(read_toml(p, "study file"), folder) for p in store.spec_paths()]  # every command's
    plan = plans[-1]
    rows, claims = store.refresh(), store.claims()
    keys = {k: t for pl in plans for k, t in pl.trials}
    done = [k for k in keys if rows.get(k, {}).get("status") == "ok"]
    failed = [k for k in keys if rows.get(k, {}).get("status") == "failed" and k not in claims]
    running = [k for k in keys if k in claims]
    left = [k for k in keys if k not in done and k not in failed and k not in running]
    kept = len(store.kept_weights() & set(done))
    lines = [f"{plan.kind} study in {folder}: {len(keys)} trials: {len(done)} done ({kept} with kept weights), "
             f"{len(running)} running, {len(failed)} failed, {len(left)} left"
             + (f" ({len(plans)} commands)" if len(plans) > 1 else "")]
    other = [k for k, r in rows.items() if k not in keys and r.get("status") == "ok"]
    if other:
        lines.append(f"  and {len(other)} more finished trial(s) in runs.csv from commands this folder kept no "
                     f"record of (it keeps one per command since 2026-12-07)")
    for k in running:
        c = claims[k]
        lines.append(f"  running {trial_label(keys[k].to_dict())}: {_images(c) / trial_images(keys[k]):.0%} on "
                     f"{c.get('host')} pid {c.get('pid')} since {_since(c)}")
    lines += [f"  failed {trial_label(keys[k].to_dict())}: {rows[k].get('error')}" for k in failed]
    if running:
        lines.append(f"ETA {clock(_eta(rows, done, running, left, keys, claims))} (each trial at its model's "
                     f"measured speed, {len(running)} process(es) at work)")
    elif left or failed:
        todo = set(left) | set(failed)
        again = [pl for pl in plans if todo & {k for k, _ in pl.trials}]
        lines.append(f"stopped: {len(todo)} trial(s) left; resume with: " + "; ".join(
            f"vitexp {pl.study.command} --preset {p} --out {folder}"
            for pl, p in zip(plans, store.spec_paths()) if pl in again))
    else:
        lines.append(f"finished: all {len(keys)} trials done")
    return lines


def _images(claim: dict) -> float:
    """Training images a claim's heartbeat reports (0 where it reports nothing readable)."""
    try:
        v = float(claim.get("images") or 0)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v >= 0 else 0.0


def _since(claim: dict) -> str:
    try:
        return datetime.fromtimestamp(float(claim.get("time", 0)), timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"


def _eta(rows, done, running, left, keys, claims) -> float | None:
    """The run's `Eta` (each trial at its model's measured speed), from the finished trials'
    wall times, shared by the processes at work; None before one has finished."""
    timed = [k for k in done if float(rows[k].get("wall_s") or 0) > 0]
    if not timed:
        return None
    eta = Eta(trial_costs([keys[k] for k in timed + left + running]), workers=max(len(running), 1))
    for k in timed:
        eta.finished(keys[k].model, trial_images(keys[k]), float(rows[k]["wall_s"]))
    return eta.seconds(running=sum(_images(claims[k]) for k in running), elapsed=0.0)
