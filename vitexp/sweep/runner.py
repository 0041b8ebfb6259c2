"""One runner for every study: configs in, one row per trial out.

It skips trials already finished in the folder (keyed by the trial config's
hash), claims each trial before running it (so two processes on one folder never
run a trial twice), records every finished trial atomically, and records a trial
that raises as failed, with its reason, and goes on; a rerun retries failed
trials and resumes the one in flight from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from pathlib import Path

import pandas as pd

from vitexp.config import TrainConfig
from vitexp.errors import UserError
from vitexp.rows import trial_row
from vitexp.store import TrialStore, atomic_write_text, provenance, tmp_path
from vitexp.sweep import studies
from vitexp.sweep.presets import dumps_toml, load_preset

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N); None -> SLURM array variables when set, else (0, 1)."""
    if text is None:
        if "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
            first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes I/N, e.g. 0/4, got '{text}'") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {text}: need 0 <= I < N, e.g. 0/{max(n, 1)} .. {max(n, 1) - 1}/{max(n, 1)}")
    return i, n


def unique(trials: list[TrainConfig]) -> list[tuple[str, TrainConfig]]:
    seen, out = set(), []
    for t in trials:
        k = t.key()
        if k not in seen:
            seen.add(k)
            out.append((k, t))
    return out


def shard_of(keyed: list, shard: tuple[int, int]) -> list:
    """Round-robin slice I of N of the study's fixed trial order: disjoint, balanced."""
    i, n = shard
    return keyed[i::n]


def pending(spec: dict, out: str | Path, shard: tuple[int, int] = (0, 1)) -> list[tuple[str, TrainConfig]]:
    """(key, config) of this shard's trials not yet finished in `out`: what a run would train."""
    keyed = shard_of(unique(studies.trials(spec)), shard)
    done = TrialStore(out, create=False).done_keys() if (Path(out) / "trials").is_dir() else set()
    return [(k, t) for k, t in keyed if k not in done]


# what makes two specs one study (one folder): rows of studies that differ here would
# mix in one figure; models, seeds, samples or sizes may grow a study in place
IDENTITY = {"kind": ("study", "kind"), "dataset": ("train", "dataset"), "optimizer": ("study", "optimizer")}


def _identity(spec: dict) -> dict:
    out = {name: spec.get(table, {}).get(key) for name, (table, key) in IDENTITY.items()}
    if out["kind"] != "stability":
        out.pop("optimizer")
    out["dataset"] = out["dataset"] or "shapes"
    return out


def check_folder(out: Path, spec: dict | str) -> None:
    """Refuse a folder that holds another study (another kind, data set or, for a
    stability study, optimizer): its rows would mix with this one's."""
    mine = _identity(spec) if isinstance(spec, dict) else {"kind": spec}
    kind = mine["kind"]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a folder for the results")
    f = out / "study.toml"
    if f.exists():
        try:
            theirs = _identity(tomllib.loads(f.read_text()))
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{f} is not a readable study file; give this study another --out "
                            f"(or delete that file if the folder is yours)") from None
        if theirs["kind"] and theirs["kind"] != kind:
            raise UserError(f"{out} holds a {theirs['kind']} study; give this {kind} study another --out")
        for name in mine:
            if theirs.get(name) is not None and mine[name] is not None and theirs[name] != mine[name]:
                raise UserError(f"{out} holds a {kind} study with {name} {theirs[name]}, not {mine[name]}; "
                                f"give this study another --out")
    elif (out / "runs.csv").exists():
        try:
            kinds = set(pd.read_csv(out / "runs.csv", usecols=["study"])["study"])
        except (ValueError, pd.errors.EmptyDataError, pd.errors.ParserError):
            kinds = set()
        if kinds - {kind}:
            raise UserError(f"{out} holds results of another kind ({', '.join(sorted(map(str, kinds)))}); "
                            f"give this {kind} study another --out")


def _logger(out: Path) -> logging.Logger:
    log = logging.getLogger(f"vitexp.study.{out.resolve()}")
    if not log.handlers:
        h = logging.FileHandler(out / "log.txt")
        h.setFormatter(logging.Formatter("%(asctime)s %(process)d %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def describe(spec: dict, out: Path | None = None) -> pd.DataFrame:
    """The trial table of a study: one row per trial with its key and status."""
    done = TrialStore(out, create=False).finished() if out is not None and (out / "trials").exists() else {}
    rows = []
    for key, t in unique(studies.trials(spec)):
        r = done.get(key, {})
        rows.append({"key": key, "model": t.model, "dataset": t.dataset, "n_train": t.n_train,
                     "optimizer": t.optimizer, "lr": t.lr, "wd": t.wd, "epochs": t.epochs,
                     "seed": t.seed, "status": r.get("status", "todo")})
    return pd.DataFrame(rows)


def estimate_cost(table: pd.DataFrame, spec: dict) -> dict:
    """Training images and FLOPs of the trials still to run (3x the forward
    FLOPs per image for forward + backward, the usual estimate)."""
    from vitexp import models as vmodels
    from vitexp.data import dataset_info

    todo = table[table.status != "ok"]
    info = dataset_info(spec["train"].get("dataset", "shapes"))
    size = spec["train"].get("image_size") or info["image_size"]
    flops, images = 0.0, 0
    for model, grp in todo.groupby("model"):
        fwd = 2e9 * vmodels.complexity(model, resolution=size, in_chans=info["in_chans"],
                                       num_classes=info["num_classes"])["gflops"]
        n = (grp.n_train.fillna(info["n_train"]).astype(float) * grp.epochs).sum()
        images += int(n)
        flops += 3 * fwd * n
    return {"trials_todo": len(todo), "trials_done": int((table.status == "ok").sum()),
            "train_images": images, "train_pflop": flops / 1e15}


def run_study(spec: dict, out: str | Path, shard: tuple[int, int] = (0, 1), progress=None,
              plot: bool = True) -> pd.DataFrame:
    """Run (the shard of) a study into `out`; returns the folder's runs table."""
    from vitexp.train import run_trial

    out = Path(out)
    kind = spec["study"]["kind"]
    keyed = unique(studies.trials(spec))  # validates the whole study before touching the folder
    check_folder(out, spec)
    lead = _join_torchrun(spec)
    if not lead:  # under torchrun, rank 0 alone owns the folder; the others follow its decisions
        return _follow(out)
    store = TrialStore(out)  # also sweeps what killed runs left behind
    atomic_write_text(out / "study.toml", dumps_toml(spec))
    mine = shard_of(keyed, shard)
    seen = store.finished()  # a claim checks that a trial's record is still what we saw here
    todo = [(k, t) for k, t in mine if seen.get(k, {}).get("status") != "ok"]
    if not todo:  # rebuild in case a kill fell between a trial's record and the tables
        store.rebuild()
        _broadcast(None)
        return _runs(out)
    log = _logger(out)
    log.info("study %s shard %d/%d: %d trials, %d done, %d to run", kind, *shard, len(mine),
             len(mine) - len(todo), len(todo))
    from vitexp.ui import StudyProgress

    with StudyProgress(len(todo), enabled=progress) as bar:
        for key, cfg in todo:
            if not store.claim(key, seen.get(key)):
                log.info("trial %s done or claimed by another process; skipped", key)
                bar.end_trial(f"{key} skipped (done or running elsewhere)")
                continue
            _broadcast(cfg)
            label = trial_label(cfg.to_dict())
            bar.start_trial(label, cfg.epochs)
            t0 = time.time()
            try:
                row = run_trial(cfg, store=store, progress=bar)
                msg = trial_summary(label, row)
            except UserError:
                raise  # bad input stops the study: every other trial would fail the same way
            except Exception as e:  # noqa: BLE001 - one failed trial must not end the study
                if _world() > 1:
                    raise  # the other ranks are inside the same collective: they cannot go on
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.info("trial %s FAILED: %s\n%s", key, reason, traceback.format_exc())
                _record_failure(store, key, cfg, reason, time.time() - t0)
                msg = trial_summary(label, {"status": "failed", "error": reason})
                _free_memory()
            finally:
                store.release(key)
            log.info("trial %s %s", key, msg)
            bar.end_trial(msg)
    _broadcast(None)
    store.rebuild()
    if plot:
        plot_if_complete(spec, out)
    return _runs(out)


def trial_label(c: dict) -> str:
    """How logs and progress name a trial (from its config or its recorded row)."""
    return f"{c['model']} n={c['n_train'] or 'all'} {c['optimizer']} lr={c['lr']:.2g} wd={c['wd']:.2g}"


def trial_summary(label: str, row: dict) -> str:
    if row.get("status", "ok") != "ok":
        return f"{label}: FAILED ({row.get('error')}); a rerun retries it"
    return f"{label}: top1_err {row['top1_err']:.2f}%" + (" DIVERGED" if row["diverged"] else "")


def plot_if_complete(spec: dict, out: str | Path) -> None:
    """Draw the study's figures once every trial of the whole study (all shards) is done."""
    out = Path(out)
    if {k for k, _ in unique(studies.trials(spec))} <= TrialStore(out, create=False).done_keys():
        try:
            from vitexp.plots import plot_study

            plot_study(out)
        except UserError as e:
            _logger(out).info("no figure: %s", e)


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _join_torchrun(spec: dict) -> bool:
    """Under torchrun, join the process group (every trial then trains with DDP);
    True on the rank that runs the study (rank 0, or the only process)."""
    if _world() <= 1:
        return True
    from vitexp.train import init_distributed, resolve_device

    return init_distributed(resolve_device(spec["train"].get("device", "auto"))).main


def _broadcast(cfg: TrainConfig | None) -> TrainConfig | None:
    """Rank 0 tells the other ranks which trial comes next (None: the study is over)."""
    if _world() <= 1:
        return cfg
    import torch.distributed as dist

    box = [cfg]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _follow(out: Path) -> pd.DataFrame:
    """A non-zero rank: train each trial rank 0 announces, write nothing."""
    from vitexp.train import run_trial

    store = TrialStore(out, create=False)  # reads checkpoints to resume, never writes
    while (cfg := _broadcast(None)) is not None:
        run_trial(cfg, store=store)
    return pd.DataFrame()


def _runs(out: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(out / "runs.csv", dtype={"key": str})
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def _record_failure(store: TrialStore, key: str, cfg: TrainConfig, reason: str, wall: float) -> None:
    store.record(key, trial_row(cfg, key, status="failed", error=reason, wall_s=round(wall, 3), **provenance()))
    # a failed trial keeps no checkpoint: its retry starts clean
    Path(store.checkpoint_path(key)).unlink(missing_ok=True)


def _free_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def collect(folders: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Merge study folders (e.g. shards run apart) into `out`: every trial once,
    an ok result preferred over a failed one."""
    out = Path(out)
    srcs = [Path(f) for f in folders]
    for f in srcs:
        if not (f / "trials").is_dir():
            raise UserError(f"{f} is not a study folder (no trials/); give folders written by a study --out")
    specs = {}
    for f in srcs:
        if (f / "study.toml").exists():
            try:
                specs[f] = tomllib.loads((f / "study.toml").read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{f / 'study.toml'} is not valid TOML ({e}); fix or delete it") from None
    idents = {f: _identity(s) for f, s in specs.items()}
    kinds = {i["kind"] for i in idents.values()}
    if len(kinds) > 1:
        raise UserError(f"cannot merge studies of different kinds ({', '.join(sorted(map(str, kinds)))}); "
                        f"collect each kind into its own --out")
    if len({tuple(sorted(i.items())) for i in idents.values()}) > 1:
        desc = "; ".join(f"{f}: {', '.join(f'{k} {v}' for k, v in i.items())}" for f, i in idents.items())
        raise UserError(f"cannot merge different studies ({desc}); collect each into its own --out")
    if specs:
        check_folder(out, next(iter(specs.values())))
    store = TrialStore(out)
    have = store.finished()
    for f in srcs:
        if f.resolve() == out.resolve():
            continue
        for p in sorted((f / "trials").glob("*.json")):
            mine = have.get(p.stem)
            theirs = TrialStore(f, create=False).result(p.stem)
            if mine is not None and (mine.get("status") == "ok" or theirs.get("status") != "ok"):
                continue
            hist = f / "trials" / f"{p.stem}.history.csv"
            if hist.exists():
                tmp = tmp_path(out / "trials" / hist.name)
                shutil.copyfile(hist, tmp)
                os.replace(tmp, out / "trials" / hist.name)
            atomic_write_text(out / "trials" / p.name, p.read_text())
            have[p.stem] = theirs
        if not (out / "study.toml").exists() and (f / "study.toml").exists():
            atomic_write_text(out / "study.toml", (f / "study.toml").read_text())
    store.rebuild()
    return _runs(out)


def resolve_spec(kind: str, preset: str | None, study_overrides: dict, train_overrides: dict) -> dict:
    """Preset (by name, path, or the kind's default for the data set) + overrides."""
    from vitexp.sweep.presets import default_preset

    name = preset or default_preset(kind, train_overrides.get("dataset"))
    spec = load_preset(name)
    if spec["study"]["kind"] != kind:
        raise UserError(f"preset {name} is a {spec['study']['kind']} study, not a {kind} study; "
                        f"pick one of vitexp's {kind}_* presets")
    return studies.apply_overrides(spec, study_overrides, train_overrides)
