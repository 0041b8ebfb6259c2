"""Plan a study, computed once: preset + overrides -> spec -> trial list -> this shard's
trials -> the ones still to run. Nothing here writes anything: a refused plan leaves
every folder as it was."""

from __future__ import annotations

import copy
import dataclasses
import os
from functools import cached_property
from pathlib import Path

import pandas as pd

from vitexp import data as vdata
from vitexp import runtime, studies
from vitexp.config import TrainConfig
from vitexp.errors import UserError
from vitexp.store import TrialStore
from vitexp.sweep.presets import default_preset, load_preset
from vitexp.ui import summarised, trial_images, trial_label


def resolve_spec(kind: str, preset: str | None, study_overrides: dict, train_overrides: dict) -> dict:
    """Preset (by name, path, or the kind's default for the data set) + command-line
    overrides: study-level knobs into [study], TrainConfig fields into [train]."""
    name = preset or default_preset(kind, train_overrides.get("dataset"), _on_cpu(train_overrides.get("device")))
    spec = load_preset(name, list(studies.STUDIES))
    if spec["study"]["kind"] != kind:
        raise UserError(f"preset {name} is a {spec['study']['kind']} study, not a {kind} study; "
                        f"pick one of vitexp's {kind}_* presets")
    spec = copy.deepcopy(spec)
    spec["study"].update({k: v for k, v in study_overrides.items() if v is not None})
    spec["train"].update({k: v for k, v in train_overrides.items() if v is not None})
    return spec


def _on_cpu(device: str | None) -> bool:
    """Will trials run on the CPU: --device cpu, or auto on a machine without CUDA."""
    if device in (None, "auto"):
        import torch

        return not torch.cuda.is_available()
    return str(device) == "cpu"


def preset_table(kind: str | None = None) -> pd.DataFrame:
    """Every preset (of KIND): its study kind, data set, the device it is sized for, its trials
    and training images, its description; for `vitexp presets`."""
    from vitexp.sweep.presets import list_presets, load_preset, preset_device

    rows = []
    for name in list_presets(kind):
        spec = load_preset(name, list(studies.STUDIES))
        cfgs = studies.trials(spec)
        known = all(t.n_train or vdata.dataset_info(t.dataset).n_train for t in cfgs)  # an image folder's: not
        rows.append({"preset": name, "kind": spec["study"]["kind"], "dataset": spec["train"].get("dataset", "shapes"),
                     "device": preset_device(name, spec), "n": len(cfgs),
                     "images (M)": round(sum(trial_images(t) for t in cfgs) / 1e6, 2) if known else "?",
                     "description": spec["study"].get("description", "")})
    return pd.DataFrame(rows, columns=["preset", "kind", "dataset", "device", "n", "images (M)", "description"]
                        ).rename(columns={"n": "n trials"})


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N); None -> SLURM array variables when set, else (0, 1)."""
    if text is None:
        env = os.environ
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            try:
                i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
                return parse_shard(f"{i}/{int(env['SLURM_ARRAY_TASK_COUNT'])}")
            except ValueError:
                raise UserError(f"SLURM_ARRAY_TASK_ID/COUNT/MIN must be integers, got "
                                f"{env['SLURM_ARRAY_TASK_ID']!r}/{env['SLURM_ARRAY_TASK_COUNT']!r}/"
                                f"{env.get('SLURM_ARRAY_TASK_MIN', '0')!r}; fix the job script") from None
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes I/N, e.g. 0/4, got '{text}'") from None
    if n < 1:
        raise UserError(f"--shard {text}: N is the number of shards and must be at least 1, e.g. 0/4")
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= I < N, e.g. 0/{n} .. {n - 1}/{n}")
    return i, n


def identity(spec: dict) -> dict:
    """What makes two specs one study (one folder): the kind, the data set and the kind's
    own identity keys; rows of studies that differ here would mix in one figure (models,
    seeds, samples or sizes may grow a study in place)."""
    kind = spec.get("study", {}).get("kind")
    out = {"kind": kind, "dataset": spec.get("train", {}).get("dataset") or "shapes"}
    if kind in studies.STUDIES:
        study = studies.get_study(kind)
        out.update({k: spec["study"].get(k) for k in study.identity})
    return out


# bytes of a path, Linux's 4,096, less room for the names a study folder holds (checkpoints/KEY.pt, ...)
OUT_MAX = 4096 - 256


def check_folder(store: TrialStore, spec: dict | str) -> None:
    """Refuse a folder that holds another study (another kind, data set or identity key),
    a file in its place, or an unreadable study.toml."""
    mine = identity(spec) if isinstance(spec, dict) else {"kind": spec}
    kind, out = mine["kind"], store.root
    if str(out) in ("", "."):
        raise UserError("--out must name a folder for the results, e.g. --out runs/mystudy")
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"--out {ascii(str(out))} has bytes that are not UTF-8 text; give a UTF-8 name") from None
    if len(os.fsencode(out.absolute())) > OUT_MAX:
        raise UserError(f"--out is a path of {len(os.fsencode(out.absolute())):,} bytes; a study folder's path "
                        f"must stay under {OUT_MAX:,} (the file system's 4,096 less its files' names): give a "
                        f"shorter --out")
    long = [p for p in out.parts if len(p.encode()) > 255]
    if long:
        raise UserError(f"--out has a name of {len(long[0].encode())} bytes ({long[0][:20]}...); a file system "
                        f"takes at most 255: give a shorter --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a folder for the results")
    spec_there = store.read_spec()
    if spec_there is not None:
        theirs = identity(spec_there)
        if theirs["kind"] and theirs["kind"] != kind:
            raise UserError(f"{out} holds a {theirs['kind']} study; give this {kind} study another --out")
        for name in mine:
            if theirs.get(name) is not None and mine[name] is not None and theirs[name] != mine[name]:
                raise UserError(f"{out} holds a {kind} study with {name} {theirs[name]}, not {mine[name]}; "
                                f"give this study another --out")
    elif store.run_kinds() - {kind}:
        raise UserError(f"{out} holds results of another kind ({', '.join(sorted(store.run_kinds()))}); "
                        f"give this {kind} study another --out")


def start_order(todo: list[tuple[str, TrainConfig]]) -> list[tuple[str, TrainConfig]]:
    """Trials that start from another's weights after every trial that does not; then longest
    first, so the workers end together instead of one running the last long trial alone;
    among equally long trials the models take turns, so a study stopped early has as many
    runs of each model (comparable partial EDFs), not all of one."""
    turns: dict[tuple, int] = {}
    order = []
    for i, (key, cfg) in enumerate(todo):
        group = (cfg.model, trial_images(cfg))
        turns[group] = turns.get(group, -1) + 1
        order.append((bool(cfg.needs()), -trial_images(cfg), turns[group], i))
    return [todo[i] for *_, i in sorted(order)]


def unique(trials: list[TrainConfig]) -> list[tuple[str, TrainConfig]]:
    """(key, config) of each distinct trial, in order."""
    seen, out = set(), []
    for t in trials:
        k = t.key()
        if k not in seen:
            seen.add(k)
            out.append((k, t))
    return out


@dataclasses.dataclass
class Plan:
    """A study about to run: its spec, its kind, its folder, its shard and its trials (or a
    run of given trials that is no study: `single_plan`)."""

    spec: dict
    study: studies.Study | None  # None: `vitexp train` or `vitexp finetune`
    out: Path
    shard: tuple[int, int]
    trials: list[tuple[str, TrainConfig]]  # the whole study, in its fixed order
    store: TrialStore  # its folder, opened for reading (a run creates it)
    staged: tuple = ()  # finished trials of other folders (source.Source) whose weights a run copies in first
    notes: tuple[str, ...] = ()  # lines a run writes to log.txt before its trials (where their values came from)

    @property
    def kind(self) -> str:
        return self.spec["study"]["kind"]

    @cached_property
    def mine(self) -> list[tuple[str, TrainConfig]]:
        """This shard's trials: a round-robin slice of the fixed order (disjoint, balanced), where
        a trial that starts from another's weights goes with that one (it waits for it)."""
        i, n = self.shard
        shard_of: dict[str, int] = {}
        for j, (key, cfg) in enumerate(self.trials):
            shard_of[key] = next((shard_of[k] for k in cfg.needs() if k in shard_of), j % n)
        return [(k, t) for k, t in self.trials if shard_of[k] == i]

    def done(self, records: dict[str, dict] | None = None) -> dict[str, dict]:
        """key -> recorded row of every trial the folder has a result for (from RECORDS, the
        folder's records when the caller has just read them)."""
        records = self.store.finished() if records is None else records
        return {k: r for k, r in records.items() if r.get("status") == "ok"}

    def pending(self, records: dict[str, dict] | None = None) -> list[tuple[str, TrainConfig]]:
        """This shard's trials without a result yet: what a run would train."""
        done = self.done(records)
        return [(k, t) for k, t in self.mine if k not in done]

    def complete(self) -> bool:
        """Has every trial of the whole study (all shards) a result?"""
        done = self.done()
        return all(k in done for k, _ in self.trials)


def preflight(plan: Plan, todo: list[tuple[str, TrainConfig]]) -> None:
    """What would make every trial fail, found before anything is written: the device,
    the data (present, readable, large enough)."""
    first = todo[0][1]
    runtime.resolve_device(first.device)
    done, kept = plan.done(), plan.store.kept_weights()
    bare = sorted({k for _, c in todo for k in c.needs() if k in done and k not in kept})
    if bare:  # its students would fail one by one; a finished record is never trained over
        label = trial_label(done[bare[0]])
        raise UserError(f"{plan.out}: {len(bare)} finished trial(s) ({label}{', ...' if len(bare) > 1 else ''}) "
                        f"kept no weights, and trials of this study read them; collect the study into a new "
                        f"folder (vitexp collect {plan.out} --preset PRESET --out NEW): it leaves them behind "
                        f"to train again with weights")
    sizes = [c.n_train for _, c in todo]
    vdata.check_data(first.dataset, first.data_dir, None if None in sizes else max(sizes), first.n_test)


def make_plan(spec: dict, out: str | Path, shard: tuple[int, int] = (0, 1), staged: tuple = ()) -> Plan:
    """Validate the whole study (every trial) and the folder; writes nothing. STAGED: sources
    (source.Source) whose weights the trials read from their own folder (a fixed teacher)."""
    study = studies.get_study(spec["study"].get("kind"))
    keyed = unique(studies.trials(spec))
    store = TrialStore(out, create=False)
    check_folder(store, spec)
    return Plan(spec=spec, study=study, out=Path(out), shard=shard, trials=keyed, store=store, staged=staged)


def single_plan(kind: str, cfgs: list[TrainConfig], out: str | Path, staged: tuple = (), notes: tuple = ()) -> Plan:
    """Given trials run as a study's are (claims, heartbeats, tables, resuming) without being
    one: KIND names them in the folder check (`train`, `finetune`), no study.toml is written."""
    store = TrialStore(out, create=False)
    check_folder(store, kind)
    return Plan(spec={"study": {"kind": kind}}, study=None, out=Path(out), shard=(0, 1), trials=unique(cfgs),
                store=store, staged=staged, notes=notes)


def describe(plan: Plan) -> pd.DataFrame:
    """The trial table of a study: one row per trial with its key and status."""
    done = plan.store.finished()
    rows = []
    for key, t in plan.trials:
        rows.append({"key": key, "model": t.model, "dataset": t.dataset, "n_train": t.n_train,
                     "optimizer": t.optimizer, "batch_size": t.batch_size, "lr": t.lr, "wd": t.wd,
                     "epochs": t.epochs, "image_size": t.image_size,
                     "seed": t.seed, "status": done.get(key, {}).get("status", "todo")})
    return pd.DataFrame(rows)


def estimate_cost(plan: Plan, images_per_s: dict[str, float] | None = None) -> dict:
    """Training images and FLOPs of the trials still to run (3x the forward FLOPs per
    image for forward + backward, each at its own image size), and with IMAGES_PER_S
    (`bench.speed_key` -> measured training images/s on this device) the estimated wall time
    of running them one after another (NaN where a speed could not be measured)."""
    from vitexp import models as vmodels
    from vitexp.bench import speed_key
    from vitexp.data import dataset_info

    table = describe(plan)
    todo = table[table.status != "ok"]
    per_trial = dict(plan.trials)
    flops, images, seconds = 0.0, 0, 0.0
    for key in todo.key:
        t = per_trial[key]
        info = dataset_info(t.dataset)
        fwd = 2e9 * vmodels.complexity(t.model_spec(), resolution=t.image_size or info.image_size,
                                       in_chans=info.in_chans, num_classes=info.num_classes)["gmacs"]
        n = trial_images(t)
        images += int(n)
        flops += 3 * fwd * n
        if images_per_s is not None:
            seconds += n / images_per_s[speed_key(t)]
    return {"trials_todo": len(todo), "trials_done": int((table.status == "ok").sum()),
            "train_images": images, "train_pflop": flops / 1e15,
            "seconds": seconds if images_per_s is not None else None}


def dry_run(plan: Plan, workers: int | None) -> tuple[pd.DataFrame, str, list[str]]:
    """What `--dry-run` prints: (the trials table, its title, the lines below it: the preset,
    the work left, and the time it takes here from a few timed steps)."""
    from vitexp.bench import calibrate

    table = describe(plan)
    alike = [c for c in ("dataset", "batch_size", "image_size") if table[c].nunique(dropna=False) <= 1]
    ref = plan.trials[0][1].lr_batch_size
    shown = table.drop(columns=alike).rename(columns={"optimizer": "opt", "lr": f"lr@{ref}", "batch_size": "batch",
                                                      "image_size": "px"})
    title = (f"{plan.kind} study '{plan.spec['study']['preset']}' on {table['dataset'].iloc[0]} -> {plan.out} "
             f"({len(table)} trials)")
    lines = [f"preset {plan.spec['study']['preset']} (`vitexp presets` lists them all)"]
    todo = plan.pending()
    if todo:
        preflight(plan, todo)
    speed, k = calibrate(plan, workers)
    cost = estimate_cost(plan, speed)
    lines.append(f"to run: {cost['trials_todo']} trials ({cost['trials_done']} done), "
                 f"{cost['train_images']:,} training images,")
    lines.append(f"{cost['train_pflop']:.3g} PFLOP (forward+backward ~ 3x forward)")
    if cost["seconds"] == cost["seconds"]:
        lines.append(f"estimated {cost['seconds'] / k / 60:.1f} min on this machine with {k} worker process(es)")
    else:
        lines.append("no time estimate: a training step of one image would not fit in this machine's free memory")
    lines.append("(evaluation not included), from training img/s per process measured here:")
    for m, v in speed.items():
        lines.append(f"  {m} {v:.3g}" if v == v else f"  {m}: one image's step does not fit in memory here")
    return summarised(shown), title, lines
