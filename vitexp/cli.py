"""The command line: a thin Typer layer over functions a notebook can call.

Each command parses, calls one function, prints. The study commands (one per study
kind) and their plot commands are made from the study registry. Bad input is one
line on stderr and exit 2 (UserError); a run whose every trial failed exits 1; SIGINT
and SIGTERM exit 130 and 143 after saying how to resume.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import types
import typing
from pathlib import Path
from typing import List, Optional

# more busy CPU threads than cores (several trials or users on one machine) make
# OpenMP's spin-waiting slow torch down ~100x; set before torch is first imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# inductor's compiled kernels kept where every worker and every later run finds them: a model
# compiles in ~2 s once its kernels are there, 28-43 s when not (vitexp/config.py)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("VITEXP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vitexp"), "inductor"))

import typer
from rich.console import Console

from vitexp.distill import TEACHER_HELP
from vitexp.errors import Interrupted, StudyFailed, UserError
from vitexp.ui import print_table

app = typer.Typer(
    name="vitexp",
    help="Reproduce the inductive-bias studies of ViT (data-size scaling) and "
    "Early Convolutions (conv-stem stability): train, sweep, plot.",
    rich_markup_mode=None,  # plain help: readable piped and at any width
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _option(default, decls: list[str], help: str, annotation, flag: bool = False, hidden: bool = False) -> dict:
    return {"default": typer.Option(default, *decls, help=help, metavar="" if flag else None, hidden=hidden,
                                    show_default=default not in (None, ...)), "annotation": annotation}


def _table_params(table: dict) -> list[inspect.Parameter]:
    """Options from a table of name -> (flag, type, default (... required), help)."""
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, **_option(default, [flag], help_, kind))
            for name, (flag, kind, default, help_) in table.items()]


def _config_params(overrides: bool, exclude=(), kind: str | None = None, only: dict | None = None,
                   required=()) -> list[inspect.Parameter]:
    """One CLI option per TrainConfig field, with the field's help text. With
    `overrides` every default is None ("not given"), for commands whose presets
    supply the values; KIND's default preset's value (else the field's default) is in the help.
    ONLY: just these fields, name -> help (None: the field's own); REQUIRED: fields with no default."""
    from vitexp.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    preset_train = _default_study(kind, "train") if kind is not None else {}
    params = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in TrainConfig.NOT_OPTIONS or f.name in exclude or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        default = None if overrides or f.default is dataclasses.MISSING else f.default
        default = ... if f.name in required else default
        help_ = (only or {}).get(f.name) or f.metadata.get("help", "")
        if overrides and kind is not None:
            value = preset_train.get(f.name, None if f.default is dataclasses.MISSING else f.default)
            help_ += _shown(kind, value) if not isinstance(value, bool) else ""
        if base is bool:
            o = _option(default, [f"{flag}/--no-{flag[2:]}"], help_, Optional[bool], flag=True)
        elif typing.get_origin(base) is list:  # comma lists, like every list option of vitexp
            o = _option(",".join(map(str, default)) if default else None, [flag], help_ + " (comma-separated)",
                        Optional[str])
        else:
            o = _option(default, [flag], help_, Optional[base])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, **o))
    return params


def parse_list(text: str | None, kind=int, name: str = "list") -> list | None:
    """'1,5,10' -> [1, 5, 10]; None stays None."""
    if text is None:
        return None
    try:
        return [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{name.replace('_', '-')} takes comma-separated {kind.__name__} values, "
                        f"got '{text}'") from None


def with_params(fn, params: list[inspect.Parameter]):
    """FN with the signature Typer reads replaced by PARAMS (built at run time)."""
    @functools.wraps(fn)
    def wrapper(**kwargs):
        return fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(params)
    return wrapper


def _config(kwargs: dict, overrides: bool) -> dict:
    """The TrainConfig fields among a command's arguments (only the given ones with OVERRIDES)."""
    from vitexp.config import config_fields

    config = {k: kwargs.pop(k) for k in list(kwargs) if k in config_fields()}
    config["fewshot"] = parse_list(config.get("fewshot"), int, "fewshot")
    if not overrides and config["fewshot"] is None:
        config["fewshot"] = []
    return {k: v for k, v in config.items() if v is not None} if overrides else config


def _print_paths(paths) -> None:
    for p in paths:
        console.print(str(p))


# --- models -------------------------------------------------------------------------------------
@app.command()
def models(names: Optional[List[str]] = typer.Argument(None, help="only these models, space- or comma-separated "
                                                                  "(default: the built-in ones and the preset's)"),
           resolution: Optional[int] = typer.Option(None, "--resolution", "-r", min=1,
                                                    help="count every model at this input size (default: its own)"),
           classes: int = typer.Option(1000, "--classes", min=1, help="classes of the head the params count"),
           csv: bool = typer.Option(False, "--csv", help="print CSV to stdout instead of a table", metavar=""),
           preset: Optional[str] = typer.Option(None, "--preset", help="also the models of this preset's "
                                                "[models.NAME] tables (a name in experiments/ or a .toml path)")
           ) -> None:
    """The models and their cost: params (M, with a CLASSES-way head), GF (forward MACs x 1e-9, batch 1), activations (M)."""
    from vitexp.models import complexity_table

    names = [n for arg in names or [] for n in parse_list(arg, str, "names")] or None
    defined = {}
    if preset is not None:
        from vitexp.models import list_models
        from vitexp.sweep.presets import read_preset

        defined = read_preset(preset)[1].get("models", {})
        names = names or list_models() + list(defined)
    df = complexity_table(resolution, names, num_classes=classes, models=defined)
    if csv:
        sys.stdout.write(df.to_csv(index=False))
        return
    print_table(console, df.assign(params_m=df.params_m.round(2), gmacs=df.gmacs.round(3), acts_m=df.acts_m.round(2))
                 .rename(columns={"params_m": "params M", "gmacs": "GF", "acts_m": "acts M", "resolution": "res"}),
                 f"params: millions, with a {classes}-way head; GF: forward MACs x 1e-9; acts: millions")


# --- train ----------------------------------------------------------------------------------------
def train(out: Path, **kwargs):
    """Train one trial and append it to OUT/runs.csv; rerun the same command to resume a killed one."""
    from vitexp import runtime
    from vitexp.config import TrainConfig
    from vitexp.sweep.execute import run
    from vitexp.sweep.plan import single_plan
    from vitexp.sweep.presets import preset_model
    from vitexp.ui import done_line, error_phrase, hparams_line, settings_lines, trial_label

    teacher = kwargs.pop("teacher")  # a trial to find, not the config's teacher table
    fields = preset_model(_config(kwargs, overrides=False), kwargs.pop("preset"))
    if teacher is not None:
        from vitexp.distill import take_teacher

        teacher = take_teacher(teacher, fields)
    source = fields.get("extra", {}).pop("hparams_from", None)
    source = source or ("given" if fields.get("lr") is not None and fields.get("wd") is not None else None)
    cfg = TrainConfig(**fields).validate().resolved()
    plan = single_plan("train", [cfg], out, staged=(teacher,) if teacher is not None else (),
                       notes=(f"train {cfg.key()}: {trial_label(cfg.to_dict())}; {hparams_line(cfg, source)}",))
    done = plan.store.result(cfg.key())
    if done is not None and done.get("status") == "ok":
        console.print(f"trial {cfg.key()} already in {out}: {error_phrase(done)} (nothing to do)")
        return
    main = runtime.dist_env().main  # under torchrun only rank 0 reports
    if main:
        for line in settings_lines(cfg, fields, source):
            console.print(line, markup=False)
    run(plan)
    if main:
        console.print(done_line(plan.store.result(cfg.key()), out), soft_wrap=False)  # wrapped at words, not mid-word


app.command("train")(with_params(train, [
    inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY,
                      default=typer.Option(Path("runs/train"), help="results folder"), annotation=Path),
    inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, **_option(
        None, ["--preset"], "a preset whose [models.NAME] and [tuned.NAME] tables --model may name "
                            "(a name in experiments/ or a .toml path)", Optional[str])),
    inspect.Parameter("teacher", inspect.Parameter.KEYWORD_ONLY, **_option(
        None, ["--teacher"], TEACHER_HELP.format("this ViT", ""), Optional[str]))]
    + _config_params(overrides=False)))


# --- finetune -------------------------------------------------------------------------------------
def finetune(source: str, dataset: str, out: Path, progress: bool | None, steps: int | None, epochs: int | None,
             lr: str | None, holdout: float, model: str | None, **config) -> None:
    """Fine-tune a finished trial's weights on a target data set ([ViT] App. B.1.1): zero head,
    position embeddings interpolated, SGD; the lr chosen on held-out training images."""
    from vitexp.config import TrainConfig
    from vitexp.finetune import FINETUNE_LRS, budget_steps, chosen, chosen_line, plan_finetune
    from vitexp.sweep.execute import run
    from vitexp.sweep.plan import single_plan

    lrs = parse_list(lr, float, "lr") or list(FINETUNE_LRS)
    base = TrainConfig(dataset=dataset, subset_seed=config["seed"], **config)
    src, cfgs = plan_finetune(source, base, budget_steps(steps, epochs, base, holdout), lrs, holdout, model)
    plan = single_plan("finetune", cfgs, out, staged=(src,))
    run(plan, progress=progress)
    console.print(chosen_line(chosen([plan.store.result(c.key()) for c in cfgs]), src, holdout, out))


def _finetune_params() -> list[inspect.Parameter]:
    from vitexp import finetune as ft

    return (_table_params(ft.OPTIONS) + _config_params(overrides=False, only=ft.CONFIG_OPTIONS, required=ft.REQUIRED)
            + _table_params({"out": ("--out", Path, Path("runs/finetune"), "results folder"),
                             "progress": ("--progress/--no-progress", Optional[bool], None,
                                          "live progress [default: on a terminal]")}))


app.command("finetune")(with_params(finetune, _finetune_params()))


# --- studies ----------------------------------------------------------------------------------------
def _default_study(kind: str, table: str = "study") -> dict:
    """The [study] (or TABLE) of KIND's default preset (empty where it cannot be read)."""
    from vitexp.sweep.presets import default_preset, load_preset
    from vitexp.studies import STUDIES

    try:
        return load_preset(default_preset(kind, None), list(STUDIES))[table]
    except UserError:
        return {}


def _shown(kind: str, value) -> str:
    """' [KIND_shapes: VALUE]': the default preset's value in an option's help."""
    if value is None or value == []:
        return ""
    return f" [{kind}_shapes: {','.join(map(str, value)) if isinstance(value, list) else value}]"


def _common_params(study) -> list[inspect.Parameter]:
    default_out = "runs/PRESET" + ("-OPTIMIZER" if "optimizer" in study.identity else "")
    opts = {
        "preset": _option(None, ["--preset"], "preset name in experiments/ or a .toml path "
                          f"[default: {study.kind}_<--dataset> where experiments/ has one, else {study.kind}_shapes]",
                          Optional[str]),
        "out": _option(None, ["--out"], f"study folder [default: {default_out}]", Optional[Path]),
        "shard": _option(None, ["--shard"], "run slice I of N (I/N) [default: SLURM array variables, else 0/1]",
                         Optional[str]),
        "dry_run": _option(False, ["--dry-run"], "print the trial table, the cost and the estimated time; "
                           "train nothing", bool, flag=True),
        "plot": _option(True, ["--plot/--no-plot"], "draw the study's figures when it completes", bool, flag=True),
        "progress": _option(None, ["--progress/--no-progress"], "live progress [default: on a terminal]",
                            Optional[bool], flag=True),
        "models": _option(None, ["--models"], "comma-separated model names"
                          + _shown(study.kind, _default_study(study.kind).get("models")), Optional[str]),
        "seeds": _option(None, ["--seeds"], "comma-separated seeds"
                         + _shown(study.kind, _default_study(study.kind).get("seeds", [0])), Optional[str]),
        "workers": _option(None, ["--workers"], "trials at once (worker processes) "
                           "[default: 1 on a GPU; on a CPU one single-thread worker per core]", Optional[int]),
        "trials_per_gpu": _option(None, ["--trials-per-gpu"], "old name of --workers", Optional[int], hidden=True),
        "fuse": _option(None, ["--fuse"], "train up to K trials of one architecture as one batched model "
                        "(1: off) [default: 8 on a GPU, off on a CPU]", Optional[int]),
    }
    if study.takes_teacher:
        opts["teacher"] = _option(None, ["--teacher"], TEACHER_HELP.format(
            "every trial (all ViTs)", "; its weights are copied into the study folder"), Optional[str])
    return [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, **v) for k, v in opts.items()]


def _knob_params(study) -> list[inspect.Parameter]:
    """One option per study knob; its help names the default preset's value."""
    preset = _default_study(study.kind)

    return [inspect.Parameter(k.name, inspect.Parameter.KEYWORD_ONLY,
                              **_option(None, [f"--{k.name.replace('_', '-')}"],
                                        k.help + _shown(study.kind, preset.get(k.name)),
                                        Optional[str] if k.many else Optional[k.type])) for k in study.knobs]


def plan_from_params(study, kwargs: dict):
    """The plan of a study command's parsed options."""
    from vitexp import sweep

    knobs = {k.name: parse_list(kwargs[k.name], k.type, k.name) if k.many else kwargs[k.name] for k in study.knobs}
    config = _config({k: v for k, v in kwargs.items() if k not in knobs}, overrides=True)
    knobs["models"] = parse_list(kwargs["models"], str, "models")
    knobs["seeds"] = parse_list(kwargs["seeds"], int, "seeds")
    teacher = kwargs.get("teacher")
    if teacher is not None:
        from vitexp.distill import take_teacher

        teacher = take_teacher(teacher, config)
    spec = sweep.resolve_spec(study.kind, kwargs["preset"], knobs, config)
    out = kwargs["out"] if kwargs["out"] is not None else Path("runs") / study.out_name(spec)
    return sweep.make_plan(spec, out, sweep.parse_shard(kwargs["shard"]), staged=(teacher,) if teacher else ())


def workers_option(kwargs: dict) -> int | None:
    """--workers, or its old name --trials-per-gpu."""
    return kwargs["workers"] if kwargs.get("workers") is not None else kwargs.get("trials_per_gpu")


def run_study_command(study, kwargs: dict) -> None:
    """The body of every study command: plan, then dry-run or run, then figures."""
    from vitexp import runtime, sweep

    from vitexp.sweep.execute import check_options
    from vitexp.sweep.plan import dry_run

    check_options(workers_option(kwargs), kwargs["fuse"])  # what the real run would refuse
    plan = plan_from_params(study, kwargs)
    if kwargs["dry_run"]:
        table, title, lines = dry_run(plan, workers_option(kwargs))
        print_table(console, table, title)
        for line in lines:
            console.print(line)
        return
    runs = sweep.run(plan, workers_option(kwargs), kwargs["progress"], kwargs["fuse"])
    if not runtime.dist_env().main:
        return  # under torchrun rank 0 reports
    drawn = ""
    if kwargs["plot"] and plan.complete():
        from vitexp.report import draw

        drawn = ", figures/" if draw(study.kind, [plan.out]) else ""
    ok = runs[runs.status == "ok"] if "status" in runs else runs
    console.print(f"{study.kind} study: {len(ok)} trials done in {plan.out} (runs.csv, history.csv{drawn})")


def _study_command(study):
    def command(**kwargs):
        run_study_command(study, kwargs)

    command.__doc__ = study.help
    params = _common_params(study) + _knob_params(study) + _config_params(overrides=True, exclude=study.sets,
                                                                           kind=study.kind)
    return with_params(command, params)


def _plot_command(study):
    def command(dirs: List[Path] = typer.Argument(..., help=f"{study.kind} study folders; {study.several}"),
                out: Optional[Path] = typer.Option(None, "--out", help="figure folder [default: DIR/figures; "
                                                                       "needed for several DIRs]"),
                **boot):
        from vitexp.report import draw

        _print_paths(draw(study.kind, dirs, out, **boot))

    params = list(inspect.signature(command).parameters.values())[:2]
    if study.bootstrap:
        params += [inspect.Parameter("n_boot", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
                       2500, help="bootstrap draws (25% of the runs each) for the best lr/wd and its range")),
                   inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                                     default=typer.Option(0, help="bootstrap seed"))]
    article = "an" if study.kind[0] in "aeiou" else "a"
    command.__doc__ = f"Figures of {article} {study.kind} study: {study.title}."
    return with_params(command, params)


def _register_studies() -> None:
    from vitexp.studies import STUDIES

    for study in STUDIES.values():
        app.command(study.command, help=study.help)(_study_command(study))
        if study.plot_command:
            app.command(study.plot_command)(_plot_command(study))


_register_studies()


@app.command("plot-curves")
def plot_curves_cmd(dirs: List[Path] = typer.Argument(..., help="study folders"),
                    out: Optional[Path] = typer.Option(None, "--out", help="figure folder [default: DIR/figures; "
                                                                           "needed for several DIRs]"),
                    all_trials: bool = typer.Option(False, "--all", help="every trial, not the best per model",
                                                    metavar="")):
    """Learning curves: training loss and test error per epoch, of the best trial per model (and optimizer)."""
    from vitexp.report import plot_curves

    _print_paths(plot_curves(dirs, out, every=all_trials))


@app.command("collect")
def collect_cmd(folders: List[Path] = typer.Argument(..., help="study folders to merge (e.g. shards)"),
                out: Path = typer.Option(..., "--out", help="merged folder"),
                preset: Optional[str] = typer.Option(None, "--preset", help="only the trials of this preset's "
                                                     "study, which OUT then holds: start a new study from the "
                                                     "trials it shares with finished ones")):
    """Merge study folders (shards run on different machines) into one."""
    from vitexp import sweep

    spec = None
    if preset is not None:
        from vitexp.sweep.presets import load_preset
        from vitexp.studies import STUDIES

        spec = load_preset(preset, list(STUDIES))
    runs = sweep.collect(folders, out, spec)
    console.print(f"collected {len(runs)} trials into {out}/runs.csv")


@app.command("status")
def status_cmd(folder: Path = typer.Argument(..., help="a study folder")):
    """Trials done, running (where, since when), failed and left, with an ETA."""
    from vitexp.sweep.status import study_status

    for line in study_status(folder):
        console.print(line)


@app.command("report")
def report_cmd(dirs: List[Path] = typer.Argument(..., help="study folders (of any kinds) in one report"),
               out: Optional[Path] = typer.Option(None, "--out", help="report folder [default: DIR; needed "
                                                                      "for several DIRs]"),
               n_boot: int = typer.Option(2500, help="bootstrap draws for the best lr/wd"),
               seed: int = typer.Option(0, help="bootstrap seed")):
    """report.md and a standalone report.html: figures, result tables, convergence, failed runs, provenance."""
    from vitexp.report import write_report

    _print_paths(write_report(dirs, out, n_boot=n_boot, seed=seed))


@app.command()
def presets(kind: Optional[str] = typer.Option(None, "--kind", help="only this study kind's presets (scale, "
                                                                   "stability, optimizer, tune, transfer)")):
    """Every study preset: its kind, data set, the device it is sized for, trials and training
    images (`STUDY --preset NAME --dry-run` estimates its time on this machine). Presets live in
    experiments/ beside the package, or in $VITEXP_EXPERIMENTS."""
    from vitexp.sweep.plan import preset_table

    table = preset_table(kind)
    if table.empty:
        from vitexp.errors import unknown
        from vitexp.studies import STUDIES

        raise unknown("--kind", str(kind), list(STUDIES))
    print_table(console, table.drop(columns="description"), title=f"{len(table)} presets")


@app.command()
def claims(dirs: Optional[List[Path]] = typer.Argument(None, help="results roots (or study folders) that "
                                                                      "hold the folders the claims name "
                                                                      "[default: results]"),
               claims_file: Optional[Path] = typer.Option(None, "--claims", help="the claims file [default: "
                                                                             "experiments/claims.toml]"),
               fmt: str = typer.Option("table", "--format", help="table | md | csv | json"),
               plot: bool = typer.Option(True, "--plot/--no-plot", help="draw the forest plot (DIR/figures/verdicts.png)"),
               readme: Optional[Path] = typer.Option(None, "--readme", help="also rewrite this README's generated "
                                                                            "claims table")):
    """Every claim's verdict from the committed results, under one rule (experiments/claims.toml)."""
    from vitexp import claims as vclaims
    from vitexp.report import figure_dir

    vclaims.check_format(fmt)
    roots = dirs or [Path("results")]
    table = vclaims.claims_table(roots, claims_file)
    if fmt != "table":
        console.print(vclaims.render(table, fmt), end="", markup=False)
    else:
        print_table(console, vclaims.display(table).drop(columns="paper says"), title="Claims (rule: vitexp claims --help)")
        console.print(f"rule: {vclaims.RULE}", markup=False)
    if plot:
        paths = vclaims.forest_plot(table, figure_dir([roots[0]], None))
        err_console.print(f"wrote {paths[0]}", markup=False)
    if readme is not None:
        err_console.print(f"wrote {vclaims.write_readme(readme, table)}", markup=False)


# --- bench -------------------------------------------------------------------------------------------
@app.command("bench")
def bench_cmd(model: str = typer.Option("vit_c_50mf", help="a built-in model's name, a preset's (--preset) or timm:NAME"),
              dataset: str = typer.Option("shapes", help="data set (in-memory ones are benched on the device)"),
              batch_size: int = typer.Option(256, help="batch size"),
              steps: int = typer.Option(30, help="timed steps (after --warmup untimed ones)"),
              warmup: int = typer.Option(5, help="untimed steps first (compilation, autotuning)"),
              device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
              compile: bool = typer.Option(False, "--compile/--no-compile", metavar="",
                                           help="also measure the model torch.compiled, beside eager"),
              amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA", metavar=""),
              baseline: bool = typer.Option(False, "--baseline/--no-baseline", metavar="",
                                            help="also measure a plain fp32 DataLoader loop and print the ratio"),
              image_size: Optional[int] = typer.Option(None, help="resize the data to this"),
              num_workers: int = typer.Option(8, help="DataLoader workers of the baseline"),
              data_dir: Optional[str] = typer.Option(None, help="where data sets live"),
              fuse: int = typer.Option(1, help="K > 1: K trials one by one vs fused into one batched model"),
              csv: Path = typer.Option(Path("runs/bench.csv"), help="append the rows here"),
              preset: Optional[str] = typer.Option(None, "--preset", help="a preset whose [models.NAME] "
                                                   "--model may name (a name in experiments/ or a .toml path)")):
    """Training throughput, data/compute split, peak memory, FLOPs per image, TFLOP/s and MFU."""
    from vitexp.bench import append_row, bench, bench_fused, print_rows

    from vitexp.sweep.execute import MAX_FUSE
    from vitexp.sweep.presets import preset_model

    # a preset's own model: its table and [tuned] values travel in the config
    fields = {k: v for k, v in preset_model({"model": model}, preset).items() if k in ("model_def", "lr", "wd")}

    if steps <= 0 or warmup < 0 or batch_size <= 0 or not 1 <= fuse <= MAX_FUSE:
        raise UserError(f"--steps and --batch-size must be positive, --warmup >= 0, --fuse in [1, {MAX_FUSE}]")
    if csv.is_dir():
        raise UserError(f"--csv {csv} is a folder; give a file to append the rows to, e.g. {csv / 'bench.csv'}")
    args = dict(model=model, dataset=dataset, batch_size=batch_size, steps=steps, warmup=warmup, device=device,
                image_size=image_size, data_dir=data_dir, fields=fields)
    if fuse > 1:
        rows = bench_fused(k=fuse, amp=amp, **args)
    else:
        rows = [bench(**args, compile=False, amp=amp, num_workers=num_workers)]
        if compile:  # eager and compiled side by side, measured in one run
            rows.append(bench(**args, compile=True, amp=amp, num_workers=num_workers))
        if baseline:
            rows.append(bench(**args, compile=False, amp=False, baseline=True, num_workers=num_workers))
    for r in rows:
        append_row(r, csv)
    print_rows(rows, console)
    console.print(f"rows appended to {csv}")


# --- launch ------------------------------------------------------------------------------------------
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
           wait: bool = typer.Option(False, "--wait/--no-wait", help="wait for every task to finish", metavar="")):
    """Submit a study as a SLURM job array (submitit): `vitexp launch --shards 8 -- stability --out DIR ...`."""
    from vitexp.launch import submit

    plan, params = study_plan_from_argv(list(ctx.args))
    slurm = {"slurm_partition": partition, "slurm_array_parallelism": parallelism} if cluster != "local" else {}
    ids = submit(plan, shards, cluster, wait, workers=workers_option(params), fuse=params.get("fuse"),
                 gpus_per_node=gpus_per_node,
                 cpus_per_task=cpus_per_task, mem_gb=mem_gb, timeout_min=timeout_min, **slurm)
    console.print(f"submitted {len(ids)} tasks: {', '.join(ids)}")


def study_plan_from_argv(argv: list[str]):
    """The plan a study command line would run, parsed by that command itself (`vitexp launch`)."""
    from vitexp.studies import STUDIES

    commands = {s.command: s for s in STUDIES.values()}
    if not argv or argv[0] not in commands:
        raise UserError(f"vitexp launch runs a study: give one of {', '.join(commands)} and its options "
                        f"after --, e.g. `vitexp launch --shards 8 -- stability --out /shared/st`")
    params = typer.main.get_command(app).commands[argv[0]].make_context(argv[0], list(argv[1:])).params
    if params.get("shard") is not None:
        raise UserError("vitexp launch sets --shard itself; drop it from the study command")
    if params.get("out") is None:
        raise UserError("vitexp launch needs the study's --out: every task writes into that one shared folder")
    return plan_from_params(commands[argv[0]], params), params


# --- doctor ------------------------------------------------------------------------------------------
@app.command()
def doctor(device: str = typer.Option("auto", help="device for the test step"),
           data_dir: Optional[str] = typer.Option(None, help="where data sets live")):
    """Versions, device, data sets found, and one tiny training step: run this first when something is off."""
    from vitexp import doctor as d

    sections = [("versions", d.versions()), ("device", d.device_report()), ("data", d.data_report(data_dir)),
                ("tiny training step", d.tiny_step(device))]
    for title, items in sections:
        console.print(title)
        for k, v in items.items():
            console.print(f"  {k:16s} {v}", markup=False)  # not markup: 'vitexp[slurm]' is text
    if sections[-1][1]["status"] != "ok":
        raise UserError("the tiny training step failed (non-finite loss); see above")


def _version(value: bool) -> None:
    if value:
        from vitexp import __version__

        console.print(f"vitexp {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                          help="print vitexp's version and exit")) -> None:
    pass


def main() -> None:
    """Entry point: run the app; UserError is one line and exit 2, StudyFailed exit 1,
    an interruption says how to resume (exit 130 / 143)."""
    from rich.markup import escape

    try:
        app(standalone_mode=False)
    except UserError as e:
        # escape: messages name preset tables like [study], which rich would eat as markup
        err_console.print(f"error: {escape(' '.join(str(e).split()))}")
        sys.exit(2)
    except StudyFailed as e:
        err_console.print(f"failed: {escape(' '.join(str(e).split()))}")
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt) as e:
        code, name = (e.exit_code, e.name) if isinstance(e, Interrupted) else (130, "SIGINT")
        err_console.print(f"interrupted ({name}); finished trials are kept: rerun the same command to resume")
        sys.exit(code)
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
