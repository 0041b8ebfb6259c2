"""The command line: a thin Typer layer over functions a notebook can call.

Every command turns bad input into one line on stderr and exit code 2
(vitexp.errors.UserError); nothing here computes anything itself.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import typing
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from vitexp.errors import UserError

# more busy CPU threads than cores (several trials or users on one machine) make
# OpenMP's spin-waiting slow torch down ~100x; set before torch is first imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(
    name="vitexp",
    help="Reproduce the inductive-bias studies of ViT (data-size scaling) and "
    "Early Convolutions (conv-stem stability): train, sweep, plot.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _config_params(overrides: bool, exclude=()) -> list[inspect.Parameter]:
    """One CLI option per TrainConfig field, with the field's help text. With
    `overrides` every default is None ("not given"), for commands whose presets
    supply the values."""
    from vitexp.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra" or f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        base = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        default = None if overrides else (f.default if f.default is not dataclasses.MISSING else None)
        decls = [flag]
        if base is bool:
            decls = [f"{flag}/--no-{f.name.replace('_', '-')}"]
            annotation = Optional[bool] if overrides else bool
        elif typing.get_origin(base) is list:  # comma lists read better than repeated flags
            annotation = Optional[str]
            default = None
        else:
            annotation = Optional[base]
        option = typer.Option(default, *decls, help=f.metadata.get("help", ""), rich_help_panel="Trial config")
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))
    return params


def _parse_list(text: str, kind=int, name: str = "list") -> list:
    try:
        return [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{name} takes comma-separated {kind.__name__} values, got '{text}'") from None


def with_config(overrides: bool = False, exclude=()):
    """Give a command every TrainConfig field as an option; the command receives
    them as one dict `config` (only the given ones when `overrides`)."""

    def deco(fn):
        own = [p for name, p in inspect.signature(fn).parameters.items() if name != "config"]
        cfg_params = _config_params(overrides, exclude)
        names = {p.name for p in cfg_params}

        @functools.wraps(fn)
        def wrapper(**kwargs):
            config = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            if config.get("fewshot") is not None:
                config["fewshot"] = _parse_list(config["fewshot"], int, "fewshot")
            elif not overrides:
                config["fewshot"] = []
            if overrides:
                config = {k: v for k, v in config.items() if v is not None}
            return fn(config=config, **kwargs)

        wrapper.__signature__ = inspect.Signature(own + cfg_params)
        return wrapper

    return deco


# --- models (issue 2) ---------------------------------------------------------
@app.command()
def models(
    names: Optional[List[str]] = typer.Argument(None, help="only these models (default: all registered)"),
    resolution: Optional[int] = typer.Option(None, "--resolution", "-r", min=1,
                                             help="count every model at this input size (default: each model's own)"),
    csv: bool = typer.Option(False, "--csv", help="print CSV to stdout instead of a table"),
) -> None:
    """List the models and their cost: params (M), GF (forward MACs x 1e-9, batch 1), activations (M)."""
    from rich.table import Table

    from vitexp.models import complexity_table

    df = complexity_table(resolution, names)
    if csv:
        sys.stdout.write(df.to_csv(index=False))
        return
    table = Table()
    table.add_column("model", no_wrap=True)
    table.add_column("family")
    for col in ("res", "depth", "width", "params (M)", "GF", "acts (M)"):
        table.add_column(col, justify="right")
    for r in df.itertuples():
        table.add_row(r.model, r.family, str(r.resolution), str(r.depth), str(r.width), f"{r.params_m:.2f}",
                      f"{r.gflops:.3f}", f"{r.acts_m:.2f}")
    console.print(table)


# --- train (issue 3) ----------------------------------------------------------
@app.command()
@with_config()
def train(config: dict, out: Path = typer.Option(Path("runs/train"), help="results folder (runs.csv, history.csv)")):
    """Train one trial and append it to OUT/runs.csv; rerun the same command to resume a killed one."""
    from vitexp.config import TrainConfig
    from vitexp.store import TrialStore
    from vitexp.sweep.runner import check_folder
    from vitexp.train import run_trial
    from vitexp.ui import StudyProgress

    cfg = TrainConfig(**config).validate().resolved()
    check_folder(out, "train")  # single runs never mix into a study's folder
    store = TrialStore(out)
    done = store.result(cfg.key())
    if done is not None and done.get("status") == "ok":
        console.print(f"trial {cfg.key()} already in {out}: top1_err {done['top1_err']:.2f}% (nothing to do)")
        return
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    with StudyProgress(enabled=None if main_rank else False) as progress:
        progress.start_trial(f"{cfg.model} on {cfg.dataset}", cfg.epochs)
        row = run_trial(cfg, store=store, progress=progress)
    if not main_rank:
        return
    status = "DIVERGED" if row["diverged"] else "done"
    console.print(f"{status}: {row['model']} {row['dataset']} n={row['n_train']} {row['optimizer']} "
                  f"lr={row['lr']:.3g} wd={row['wd']:.3g} top1_err {row['top1_err']:.2f}% "
                  f"(last {row['last_err']:.2f}%) in {row['wall_s']:.1f}s -> {out}/runs.csv", highlight=False)


# --- studies (issue 4) --------------------------------------------------------
# fields a study sets per trial: the study's own options replace them
STUDY_FIELDS = ("model", "seed", "n_train", "subset_seed", "optimizer", "lr", "wd", "epochs", "fewshot")
# only the scale study sets the training-set size per trial; the others take --n-train as given
FIXED_SIZE_FIELDS = tuple(f for f in STUDY_FIELDS if f != "n_train")
_PRESET = typer.Option(None, "--preset", help="preset name in experiments/ or a .toml path "
                       "[default: KIND_DATASET if it exists, else KIND_shapes]")
_OUT = typer.Option(None, "--out", help="study folder [default: runs/PRESET]")
_SHARD = typer.Option(None, "--shard", help="run slice I of N (I/N); default: SLURM array variables, else 0/1")
_DRY = typer.Option(False, "--dry-run", help="print the trial table and the estimated cost; train nothing")
_PLOT = typer.Option(True, "--plot/--no-plot", help="draw the study's figures when it finishes")
_MODELS = typer.Option(None, "--models", help="comma-separated model names")
_SEEDS = typer.Option(None, "--seeds", help="comma-separated seeds")
_PROGRESS = typer.Option(None, "--progress/--no-progress", help="rich progress bars [default: on a terminal]")
_PACK = typer.Option(None, "--trials-per-gpu", help="run this many trials at once on the device (worker processes) "
                     "[default: 1 on a GPU; on the CPU one single-thread worker per core]")


def _study(kind: str, preset, out, shard, dry_run, plot, progress, models, seeds, trials_per_gpu: int | None,
           config: dict, **knobs):
    """Shared body of the study commands: resolve, then dry-run or run."""
    from vitexp import sweep

    study = {k: v for k, v in knobs.items() if v is not None}
    if models is not None:
        study["models"] = [m.strip() for m in models.split(",") if m.strip()]
    if seeds is not None:
        study["seeds"] = _parse_list(seeds, int, "seeds")
    spec = sweep.resolve_spec(kind, preset, study, config)
    name = spec["study"]["preset"] + (f"-{spec['study']['optimizer']}" if kind == "stability" else "")
    out = Path(out) if out is not None else Path("runs") / name
    part = sweep.parse_shard(shard)
    if dry_run:
        from rich.table import Table

        table = sweep.describe(spec, out)
        t = Table(title=f"{kind} study '{spec['study']['preset']}' -> {out} ({len(table)} trials)")
        for c in table.columns:
            t.add_column(c)
        for r in table.itertuples(index=False):
            t.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r])
        console.print(t)
        cost = sweep.estimate_cost(table, spec)
        console.print(f"to run: {cost['trials_todo']} trials ({cost['trials_done']} done), "
                      f"{cost['train_images']:,} training images, {cost['train_pflop']:.3g} PFLOP "
                      f"(forward+backward ~ 3x forward)", highlight=False)
        return
    from vitexp.sweep.packing import run_packed

    runs = run_packed(spec, out, part, trials_per_gpu, plot=plot, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun rank 0 reports
    ok = runs[runs.status == "ok"] if "status" in runs else runs
    console.print(f"{kind} study: {len(ok)} trials done in {out} (runs.csv, history.csv"
                  f"{', figures/' if plot and (out / 'figures').exists() else ''})", highlight=False)


@app.command("scale-study")
@with_config(overrides=True, exclude=STUDY_FIELDS)
def scale_study(config: dict, preset: Optional[str] = _PRESET, out: Optional[Path] = _OUT,
                shard: Optional[str] = _SHARD, dry_run: bool = _DRY, plot: bool = _PLOT,
                progress: Optional[bool] = _PROGRESS, models: Optional[str] = _MODELS,
                seeds: Optional[str] = _SEEDS, trials_per_gpu: Optional[int] = _PACK,
                sizes: Optional[str] = typer.Option(None, help="comma-separated training-set sizes"),
                steps: Optional[int] = typer.Option(None, help="optimisation budget in steps, the same for every size"),
                min_epochs: Optional[int] = typer.Option(None, help="epoch floor for the largest sizes"),
                epochs: Optional[int] = typer.Option(None, help="train every size this many epochs instead of the step budget"),
                fewshot: Optional[str] = typer.Option(None, help="comma-separated shots for the linear few-shot eval, e.g. 1,5,10")):
    """ViT paper: error vs training-set size for a ViT_P, its ViT_C twin and a CNN (nested subsets, early stopping)."""
    _study("scale", preset, out, shard, dry_run, plot, progress, models, seeds, trials_per_gpu, config,
           sizes=_parse_list(sizes, int, "sizes") if sizes else None, steps=steps, min_epochs=min_epochs,
           epochs=epochs, fewshot=_parse_list(fewshot, int, "fewshot") if fewshot else None)


@app.command()
@with_config(overrides=True, exclude=FIXED_SIZE_FIELDS)
def stability(config: dict, optimizer: str = typer.Option("adamw", help="adamw | sgd"),
              preset: Optional[str] = _PRESET, out: Optional[Path] = _OUT,
              shard: Optional[str] = _SHARD, dry_run: bool = _DRY, plot: bool = _PLOT,
              progress: Optional[bool] = _PROGRESS, models: Optional[str] = _MODELS,
              seeds: Optional[str] = _SEEDS, trials_per_gpu: Optional[int] = _PACK,
              samples: Optional[int] = typer.Option(None, help="(lr, wd) pairs per model [preset; paper: 64]"),
              sample_seed: Optional[int] = typer.Option(None, help="seed of the (lr, wd) sampler"),
              epochs: Optional[int] = typer.Option(None, help="epochs of every trial [preset; paper: 50]")):
    """EC paper: lr/wd stability, N log-uniform (lr, wd) samples per model for one optimizer."""
    _study("stability", preset, out, shard, dry_run, plot, progress, models, seeds, trials_per_gpu, config,
           optimizer=optimizer, samples=samples, sample_seed=sample_seed, epochs=epochs)


@app.command()
@with_config(overrides=True, exclude=FIXED_SIZE_FIELDS)
def tune(config: dict, preset: Optional[str] = _PRESET, out: Optional[Path] = _OUT,
         shard: Optional[str] = _SHARD, dry_run: bool = _DRY, plot: bool = _PLOT,
         progress: Optional[bool] = _PROGRESS, models: Optional[str] = _MODELS,
         seeds: Optional[str] = _SEEDS, trials_per_gpu: Optional[int] = _PACK,
         optimizers: Optional[str] = typer.Option(None, help="comma-separated, default adamw,sgd"),
         samples: Optional[int] = typer.Option(None, help="(lr, wd) pairs per model and optimizer [preset]"),
         sample_seed: Optional[int] = typer.Option(None, help="seed of the (lr, wd) sampler"),
         epochs: Optional[int] = typer.Option(None, help="epochs of every trial [preset]")):
    """lr/wd search: N log-uniform (lr, wd) samples per model and optimizer over wide ranges; the best is the tuned value."""
    _study("tune", preset, out, shard, dry_run, plot, progress, models, seeds, trials_per_gpu, config,
           optimizers=[o.strip() for o in optimizers.split(",")] if optimizers else None,
           samples=samples, sample_seed=sample_seed, epochs=epochs)


@app.command("optimizer-study")
@with_config(overrides=True, exclude=FIXED_SIZE_FIELDS)
def optimizer_study(config: dict, preset: Optional[str] = _PRESET, out: Optional[Path] = _OUT,
                    shard: Optional[str] = _SHARD, dry_run: bool = _DRY, plot: bool = _PLOT,
                    progress: Optional[bool] = _PROGRESS, models: Optional[str] = _MODELS,
                    seeds: Optional[str] = _SEEDS, trials_per_gpu: Optional[int] = _PACK,
                    optimizers: Optional[str] = typer.Option(None, help="comma-separated, default adamw,sgd"),
                    epochs: Optional[str] = typer.Option(None, help="comma-separated training lengths [paper: 50,100,200,400]")):
    """EC paper: AdamW vs SGD at tuned settings over training lengths (optimizer gap and training-length figures)."""
    _study("optimizer", preset, out, shard, dry_run, plot, progress, models, seeds, trials_per_gpu, config,
           optimizers=[o.strip() for o in optimizers.split(",")] if optimizers else None,
           epochs=_parse_list(epochs, int, "epochs") if epochs else None)


@app.command("collect")
def collect_cmd(folders: List[Path] = typer.Argument(..., help="study folders to merge (e.g. shards)"),
                out: Path = typer.Option(..., "--out", help="merged folder")):
    """Merge study folders (shards run on different machines) into one."""
    from vitexp import sweep

    runs = sweep.collect(folders, out)
    console.print(f"collected {len(runs)} trials into {out}/runs.csv")


# --- plots and report (issue 5) ----------------------------------------------

_FIG_DIRS = typer.Argument(..., help="study folders; several are concatenated (e.g. an AdamW and an SGD sweep)")
_FIG_OUT = typer.Option(None, "--out", help="figure folder (default: DIR/figures; needed for several DIRs)")


def _print_written(paths) -> None:
    for p in paths:
        console.print(str(p), highlight=False, soft_wrap=True)


@app.command("plot-cdf")
def plot_cdf_cmd(dirs: List[Path] = _FIG_DIRS, out: Optional[Path] = _FIG_OUT,
                 n_boot: int = typer.Option(2500, help="bootstrap draws for the best lr/wd and its range"),
                 seed: int = typer.Option(0, help="bootstrap seed")):
    """EC paper, lr/wd stability: error distribution functions and error vs lr / wd scatter plots."""
    from vitexp import plots

    _print_written(plots.plot_folders("stability", dirs, out, n_boot=n_boot, seed=seed))


@app.command("plot-scale")
def plot_scale_cmd(dirs: List[Path] = _FIG_DIRS, out: Optional[Path] = _FIG_OUT):
    """ViT paper: error (and few-shot error) vs training-set size, per model."""
    from vitexp import plots

    _print_written(plots.plot_folders("scale", dirs, out))


@app.command("plot-optimizer")
def plot_optimizer_cmd(dirs: List[Path] = _FIG_DIRS, out: Optional[Path] = _FIG_OUT):
    """EC paper: SGD - AdamW gap and training-length curves, per model."""
    from vitexp import plots

    _print_written(plots.plot_folders("optimizer", dirs, out))


@app.command("report")
def report_cmd(dirs: List[Path] = typer.Argument(..., help="study folders (of any kinds) in one report"),
               out: Optional[Path] = typer.Option(None, "--out", help="report folder (default: DIR; needed "
                                                                     "for several DIRs)"),
               n_boot: int = typer.Option(2500, help="bootstrap draws for the best lr/wd"),
               seed: int = typer.Option(0, help="bootstrap seed")):
    """report.md and a standalone report.html: figures, result tables, failed runs, provenance."""
    from vitexp.report import write_report

    _print_written(write_report(dirs, out, n_boot=n_boot, seed=seed))


# --- bench (issue 6) ----------------------------------------------------------
@app.command("bench")
def bench_cmd(model: str = typer.Option("vit_c_50mf", help="registered model name"),
              dataset: str = typer.Option("shapes", help="data set (in-memory ones are benched on the device)"),
              batch_size: int = typer.Option(256, help="batch size"),
              steps: int = typer.Option(30, help="timed steps (after --warmup untimed ones)"),
              warmup: int = typer.Option(5, help="untimed steps first (compilation, autotuning)"),
              device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
              compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model"),
              amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA"),
              baseline: bool = typer.Option(False, "--baseline/--no-baseline",
                                            help="also measure a plain fp32 DataLoader loop and print the ratio"),
              image_size: Optional[int] = typer.Option(None, help="resize the data to this"),
              num_workers: int = typer.Option(8, help="DataLoader workers of the baseline"),
              data_dir: Optional[str] = typer.Option(None, help="where data sets live"),
              csv: Path = typer.Option(Path("runs/bench.csv"), help="append the rows here")):
    """Training throughput, data/compute split, peak memory, FLOPs per image, TFLOP/s and MFU."""
    from rich.table import Table

    from vitexp.bench import append_row, bench

    if steps <= 0 or warmup < 0 or batch_size <= 0:
        raise UserError("--steps and --batch-size must be positive, --warmup >= 0")
    rows = [bench(model, dataset, batch_size, steps, warmup, device, compile, amp, False, image_size,
                  num_workers, data_dir)]
    if baseline:
        rows.append(bench(model, dataset, batch_size, steps, warmup, device, False, False, True, image_size,
                          num_workers, data_dir))
    t = Table(title=f"vitexp bench: {model} on {dataset}, batch {batch_size}, {rows[0]['device']}")
    cols = ["mode", "images_per_s", "step_ms", "data_ms", "data_frac", "peak_mem_gb", "train_gflop_per_image",
            "tflops", "mfu"]
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
        append_row(r, csv)
    console.print(t)
    if baseline:
        console.print(f"fast / baseline throughput: {rows[0]['images_per_s'] / rows[1]['images_per_s']:.2f}x")
    console.print(f"rows appended to {csv}")


# --- launch (issue 7) ---------------------------------------------------------
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(ctx: typer.Context,
           shards: int = typer.Option(..., help="number of array tasks (shards of the study)"),
           cluster: Optional[str] = typer.Option(None, help="slurm | local | debug [default: slurm when sbatch exists]"),
           partition: Optional[str] = typer.Option(None, help="SLURM partition"),
           gpus_per_node: Optional[int] = typer.Option(None, help="GPUs per task"),
           cpus_per_task: Optional[int] = typer.Option(None, help="CPUs per task"),
           mem_gb: Optional[int] = typer.Option(None, help="memory per task"),
           timeout_min: Optional[int] = typer.Option(None, help="time limit per task in minutes"),
           parallelism: Optional[int] = typer.Option(None, help="at most this many tasks at once"),
           wait: bool = typer.Option(False, "--wait/--no-wait", help="wait for every task to finish")):
    """Submit a study as a SLURM job array (submitit): `vitexp launch --shards 8 -- stability --out DIR ...`."""
    from vitexp.launch import submit

    slurm = {"slurm_partition": partition, "slurm_array_parallelism": parallelism} if cluster != "local" else {}
    ids = submit(list(ctx.args), shards, cluster, wait, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
                 mem_gb=mem_gb, timeout_min=timeout_min, **slurm)
    console.print(f"submitted {len(ids)} tasks: {', '.join(ids)}")


# --- doctor (issue 8) ---------------------------------------------------------
@app.command()
def doctor(device: str = typer.Option("auto", help="device for the test step"),
           data_dir: Optional[str] = typer.Option(None, help="where data sets live")):
    """Versions, device, data sets found, and one tiny training step: run this first when something is off."""
    from vitexp import doctor as d

    sections = [("versions", d.versions()), ("device", d.device_report()), ("data", d.data_report(data_dir)),
                ("tiny training step", d.tiny_step(device))]
    for title, items in sections:
        console.print(f"[bold]{title}[/]")
        for k, v in items.items():
            console.print(f"  {k:16s} {v}", highlight=False)
    if sections[-1][1]["status"] != "ok":
        raise UserError("the tiny training step failed (non-finite loss); see above")



def main() -> None:
    """Entry point: run the app, turning UserError into one line and exit 2."""
    try:
        app(standalone_mode=False)
    except UserError as e:
        from rich.markup import escape

        # escape: messages name preset tables like [study], which rich would eat as markup
        msg = " ".join(str(e).split())  # one line, whatever the message
        err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors arrive here in standalone_mode=False
        usage, abort = _click_exceptions()
        if isinstance(e, usage):
            e.show()
            sys.exit(2)
        if isinstance(e, abort):
            sys.exit(130)
        raise


def _click_exceptions() -> tuple[tuple, tuple]:
    """(usage errors, aborts) of click and of the click copy newer typers vendor."""
    import importlib

    usage, abort = [], [typer.Abort]
    for mod in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        usage += [getattr(m, "ClickException")] if hasattr(m, "ClickException") else []
        abort += [getattr(m, "Abort")] if hasattr(m, "Abort") else []
    return tuple(usage), tuple(abort)
