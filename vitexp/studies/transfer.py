"""[ViT]'s own protocol for the data-size effect: pre-train on sets of increasing size, then
measure the *transfer* (Sec. 4.2-4.3, Fig. 3-5).

For each model, seed and pre-training size: one ordinary trial on the source data set (the
scale study's budget rule; its kept weights are what transfers, and its k-shot linear
probes are taken on the target's images); then, per fine-tuning resolution and per lr of
[ViT] App. B.1.1's grid, one fine-tune trial on the target (`vitexp.finetune`), which waits
for its source. The lr of each (model, size, seed, resolution) is the one with the lowest
error on the held-out part of the target's training images; its test error is the result.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vitexp import analysis, plots
from vitexp.data.datasets import split_classes
from vitexp.errors import UserError
from vitexp.finetune import FINETUNE_LRS, HOLDOUT, check_target, finetune_fields, source_columns
from vitexp.source import Source
from vitexp.studies.base import (Knob, Study, int_knob, ints, mean_std, paired_table, positive_floats, seeds_phrase,
                                 tuned)
from vitexp.studies.registry import register
from vitexp.studies.scale import STUDY as SCALE
from vitexp.studies.scale import size_panel, size_table


class Transfer(Study):
    kind = "transfer"
    command = "transfer-study"
    takes_teacher = False  # its fine-tunes start from its own trials; a teacher is a scale-study arm
    title = "Transfer after pre-training (ViT)"
    help = ("ViT paper's protocol: pre-train CNN / ViT_P / ViT_C / hybrid on growing subsets, then fine-tune "
            "(at a higher resolution) and k-shot probe on a target.")
    knobs = (Knob("sizes", int, "comma-separated pre-training set sizes", many=True),
             Knob("steps", int, "pre-training budget in steps at the smallest size"),
             Knob("steps_exponent", float, "the budget grows as (size / smallest)^this (0: the same for every size)"),
             Knob("min_epochs", int, "pre-training epoch floor for the largest sizes"),
             Knob("epochs", int, "pre-train every size this many epochs instead of the step budget"),
             Knob("evals", int, "evaluations per pre-training trial"),
             Knob("target", str, "the data set transferred to (its classes must not be the source's), "
                                 "e.g. fashion-mnist:0,2,4,6,8"),
             Knob("target_n_train", int, "labelled target images (class-balanced; a held-out part chooses the lr)"),
             Knob("target_n_test", int, "target test images (the first n)"),
             Knob("resolutions", int, "comma-separated fine-tuning image sizes", many=True),
             Knob("finetune_steps", int, "fine-tuning steps"),
             Knob("finetune_batch", int, "fine-tuning batch size"),
             Knob("lrs", float, "comma-separated fine-tuning lrs at batch 512", many=True),
             Knob("holdout", float, "share of the target's training images that chooses the lr"),
             Knob("fewshot", int, "comma-separated shots of the linear probe on the target", many=True))
    sets = ("model", "seed", "subset_seed", "epochs", "fewshot", "n_train", "eval_every", "fewshot_data", "init_from",
            "holdout")  # --optimizer, --lr, --wd: the pre-training's overrides
    identity = ("target",)
    needs = ("model", "role", "size", "last_err")
    plot_command = "plot-transfer"

    def trials(self, spec, base, trial):
        s = spec["study"]
        target = s.get("target")
        if not isinstance(target, str) or not target:
            raise UserError("the transfer study has no target; give --target (e.g. fashion-mnist:0,2,4,6,8) or set "
                            "[study] target")
        if _share_images(base.dataset, target):
            raise UserError(f"--target {target} shares images with the source data set {base.dataset}; transfer to "
                            f"other images: other classes (fashion-mnist:0-4 -> fashion-mnist:5-9) or another data set")
        if not s.get("sizes"):
            raise UserError("the transfer study has no sizes; give --sizes 1000,3000,... or set [study] sizes")
        sizes = ints(s["sizes"], "sizes")
        if min(sizes) <= 0:
            raise UserError(f"--sizes must be positive, got {sizes}")
        resolutions = ints(s.get("resolutions", [base.image_size or 32]), "resolutions")
        lrs = positive_floats(s.get("lrs", list(FINETUNE_LRS)), "lrs")
        holdout = float(s.get("holdout", HOLDOUT))
        if not 0 < holdout < 1:
            raise UserError(f"--holdout must be a fraction in (0, 1), got {holdout}")
        fewshot = ints(s["fewshot"], "fewshot") if s.get("fewshot") else []
        n_target = int_knob(s, "target_n_train", 1000)
        n_test = s.get("target_n_test")
        steps, batch = int_knob(s, "finetune_steps", 500), int_knob(s, "finetune_batch", 128)
        out = []
        for model in s["models"]:
            lr, wd = tuned(spec, model, base.optimizer)
            for seed in ints(s.get("seeds", [0]), "seeds"):
                for n in sizes:
                    epochs = SCALE.epochs(s, n, min(sizes), base.batch_size)
                    pre = trial(model=model, n_train=n, seed=seed, subset_seed=seed, epochs=epochs,
                                eval_every=max(1, epochs // int_knob(s, "evals", 10)), lr=base.lr or lr,
                                wd=base.wd if base.wd is not None else wd, fewshot=fewshot,
                                fewshot_data=target if fewshot else None, keep_weights=True,
                                extra={"role": "pretrain", "size": n, "budget_steps": SCALE.budget(s, n, min(sizes))})
                    out.append(pre)
                    source = Source.planned(pre)
                    check_target(source, target)
                    for res in resolutions:
                        for ft_lr in lrs:
                            fields = finetune_fields(source, target, n_target, batch, steps, ft_lr, holdout, res)
                            del fields["model_def"]  # trial() sets it, as for the source
                            out.append(trial(**fields, seed=seed, subset_seed=seed, n_test=n_test, keep_weights=False,
                                             extra={"role": "finetune", "size": n, **source_columns(source, ft_lr)}))
        return out

    def figures(self, runs, out, n_boot=2500, seed=0):
        return plot_transfer(runs, Path(out))

    def tables(self, runs, n_boot=2500, seed=0):
        summary = transfer_summary(runs)
        out = []
        for metric in dict.fromkeys(summary["metric"]):
            part = summary[summary["metric"] == metric]
            out += [("h3", f"{_metric_title(metric)} (%) by pre-training size: {seeds_phrase(part['n'])}"),
                    ("table", size_table(part, "size"))]
        out += paired_tables(runs)
        lrs = chosen_lrs(runs)
        if not lrs.empty:
            out += [("h3", "Fine-tuning lr chosen on the held-out images (batch 512), per seed"), ("table", lrs)]
        compute = compute_table(runs)
        if not compute.empty:
            out += [("h3", "Compute per model: forward GF per image, mean wall time per trial (s)"), ("table", compute)]
        return out

    def captions(self, figure: Path) -> str:
        table = pd.read_csv(figure.with_suffix(".csv"))
        metrics = [_metric_title(m) for m in dict.fromkeys(table["metric"])]
        point = "one run per point" if table["n"].max() == 1 else "the mean over seeds with min–max bars (models side by side)"
        return f"Transfer error vs pre-training set size (log x) per model, {point}; panels: {', '.join(metrics)}."

    def must_converge(self, runs):
        ok = analysis.finished(runs)
        if "role" not in ok:
            return ok
        pre = ok[ok["role"] == "pretrain"]
        largest = pre[pre["size"] == pre.groupby("model")["size"].transform("max")]
        return pd.concat([largest, chosen(ok)])


def _share_images(source: str, target: str) -> bool:
    """Do two data sets hold an image in common (one data set, overlapping class selections)?"""
    (sb, sc), (tb, tc) = split_classes(source), split_classes(target)
    return sb == tb and (sc is None or tc is None or bool(set(sc) & set(tc)))


def _metric_title(metric: str) -> str:
    k = analysis.FEWSHOT.match(metric)
    if k:
        return f"{k[1]}-shot linear probe on the target"
    if metric.startswith("finetune_"):
        return f"fine-tuned at {metric.split('_')[1]} px"
    return metric


def chosen(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model, size, seed and fine-tuning resolution: the fine-tune whose lr did best on the
    held-out images (the smaller lr of equals); its last_err is the transfer result."""
    ok = analysis.finished(runs)
    ft = ok[ok.get("role") == "finetune"] if "role" in ok else ok.iloc[:0]
    if ft.empty:
        return ft
    ft = ft.sort_values(["val_err", "finetune_lr"])
    return ft.groupby(["model", "size", "seed", "image_size"], sort=True).head(1)


def per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per model, pre-training size, seed and metric (finetune_<px>_err: the chosen
    fine-tune's final test error; fewshot{k}_err: the pre-trained model's k-shot probe on the
    target), with its value and whether its run converged."""
    ok = analysis.finished(runs)
    parts = []
    for (_, _, _, res), g in chosen(runs).groupby(["model", "size", "seed", "image_size"]):
        parts.append(g.assign(metric=f"finetune_{int(res)}_err", value=g["last_err"]))
    pre = ok[ok["role"] == "pretrain"] if "role" in ok else ok.iloc[:0]
    for col in analysis.fewshot_columns(pre):
        parts.append(pre.assign(metric=col, value=pre[col]))
    cols = ["model", "size", "seed", "metric", "value", "converged"]
    if not parts:
        return pd.DataFrame(columns=cols)
    long = pd.concat(parts, ignore_index=True).dropna(subset=["value"])
    conv = long["converged"].fillna(False).astype(bool) if "converged" in long else True
    return long.assign(converged=conv, size=long["size"].astype(int))[cols]


def transfer_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model, pre-training size and metric (see `per_seed`): mean, std (ddof 1), min, max,
    n over seeds, and the runs behind it not converged."""
    long = per_seed(runs)
    cols = ["model", "size", "metric", "mean", "std", "min", "max", "n", "not_converged"]
    rows = []
    for (model, size, metric), g in long.groupby(["model", "size", "metric"], sort=True):
        rows.append({"model": model, "size": int(size), "metric": metric, "mean": g["value"].mean(),
                     "std": g["value"].std(), "min": g["value"].min(), "max": g["value"].max(), "n": len(g),
                     "not_converged": int((~g["converged"]).sum())})
    order = {m: i for i, m in enumerate(sorted(set(long["metric"]), key=_metric_order))}
    return pd.DataFrame(rows, columns=cols).sort_values(["metric", "model", "size"], key=lambda c: c.map(order)
                                                         if c.name == "metric" else c).reset_index(drop=True)


def paired_tables(runs: pd.DataFrame) -> list[tuple]:
    """The differences the claims rest on, each taken within a size and seed (the same source
    subset) before averaging: every model minus the CNN and minus the hybrid at each
    fine-tuning resolution ([ViT] Fig. 3-5: who gains more from pre-training data), and each
    model's highest fine-tuning resolution minus its lowest ([ViT] Sec. 3.2)."""
    long = per_seed(runs)
    ft = long[long["metric"].str.startswith("finetune_")]
    if ft.empty:
        return []
    wide = ft.pivot_table(index=["model", "size", "seed"], columns="metric", values="value")
    out = []
    models = plots.model_order(ft["model"])
    for ref in [m for fam in ("cnn", "hybrid") for m in models if plots.family(m) == fam]:
        for metric in sorted(wide.columns, key=_metric_order):
            col = wide[metric].unstack("model")
            diff = col.drop(columns=ref).sub(col[ref], axis=0).stack().dropna()
            if not diff.empty:
                diff.index = diff.index.set_names(["size", "seed", "model"])
                out += [("h3", f"{_metric_title(metric).capitalize()}: minus {ref} at the same size and seed "
                               f"(points, mean ± std over seeds)"),
                        ("table", paired_table(diff.reorder_levels(["model", "size", "seed"]), "size"))]
    res = sorted(wide.columns, key=_metric_order)
    sizes = sorted(set(ft["size"]))
    if len(sizes) > 1:  # nested subsets: one seed's smallest set lies inside its largest
        by_size = wide.unstack("size")
        gain = pd.DataFrame({f"at {_metric_title(m).split(' at ')[1]}": mean_std(
            by_size[(m, sizes[0])] - by_size[(m, sizes[-1])]) for m in res})
        gain = gain.reindex(plots.model_order(gain.index)).reset_index(names="model")
        out += [("h3", f"Fine-tuned error at {sizes[0]:,} minus at {sizes[-1]:,} pre-training images, same seed "
                       f"(points gained, mean ± std over seeds)"), ("table", gain)]
    if len(res) > 1:
        diff = (wide[res[-1]] - wide[res[0]]).dropna()
        out += [("h3", f"{_metric_title(res[-1]).capitalize()} minus {_metric_title(res[0])}, same trial's "
                       f"weights (points, mean ± std over seeds)"), ("table", paired_table(diff, "size"))]
    return out


def _metric_order(metric: str):
    k = analysis.FEWSHOT.match(metric)
    return (1, int(k[1])) if k else (0, int(metric.split("_")[1]) if metric.startswith("finetune_") else 0)


def chosen_lrs(runs: pd.DataFrame) -> pd.DataFrame:
    """The lr each fine-tune chose, per model, resolution and size: seeds' values joined."""
    ch = chosen(runs)
    if ch.empty:
        return pd.DataFrame()
    ch = ch.assign(res=ch["image_size"].astype(int).astype(str) + " px")
    wide = ch.groupby(["model", "res", "size"])["finetune_lr"].agg(
        lambda v: ", ".join(f"{x:g}" for x in v)).unstack("size")
    wide.columns = [f"n={c}" for c in wide.columns]
    wide = wide.reset_index()
    return wide.iloc[sorted(range(len(wide)), key=lambda i: (plots.model_order(wide["model"]).index(
        wide["model"][i]), wide["res"][i]))].reset_index(drop=True)


def compute_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model: its forward GF at each resolution the study uses, and the mean wall time
    of its pre-training and fine-tuning trials."""
    from vitexp.models import complexity
    from vitexp.models.registry import spec_of

    ok = analysis.finished(runs)
    if "role" not in ok or ok.empty:
        return pd.DataFrame()
    rows = []
    for model in plots.model_order(ok["model"]):
        g = ok[ok["model"] == model]
        row = {"model": model}
        chans = int(g["in_chans"].iloc[0]) if "in_chans" in g else 1
        for res in sorted(set(g["image_size"].dropna().astype(int))):
            spec = spec_of(model, analysis.model_def(g))
            row[f"GF at {res} px"] = round(complexity(spec, res, in_chans=chans, num_classes=5)["gmacs"], 4)
        for role in ("pretrain", "finetune"):
            row[f"{role} wall s"] = round(g.loc[g["role"] == role, "wall_s"].mean(), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def plot_transfer(runs: pd.DataFrame, out: Path) -> list[Path]:
    """transfer.*: one panel per metric (fine-tuned at each resolution, k-shot probes), error vs
    pre-training size (log x), one line per model: mean over seeds, min-max bars."""
    plots.require_results(runs)
    summary = transfer_summary(runs)
    if summary.empty:
        raise UserError("the transfer study has no finished fine-tunes or probes to plot yet; run it first")
    metrics = list(dict.fromkeys(summary["metric"]))
    styles, labels = plots.model_styles(runs["model"]), plots.model_labels(runs)
    with plots.style():
        ncols = min(3, len(metrics))
        fig, axes = plots.figure(-(-len(metrics) // ncols), ncols, width=4.2, height=3.3)
        axes = axes.ravel()
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        for ax, metric in zip(axes, metrics):
            size_panel(ax, summary[summary["metric"] == metric], "size", styles, labels, bars=True)
            ax.set_xlabel("pre-training images")
            ax.set_ylabel("target top-1 error (%)")
            ax.set_title(_metric_title(metric))
        fig.legend(handles=axes[0].get_legend_handles_labels()[0], loc="outside right center")
        ok = analysis.finished(runs)
        pre = ok[ok["role"] == "pretrain"]
        src = ", ".join(sorted(set(pre["dataset"].astype(str))))
        tgt = ", ".join(sorted(set(ok.loc[ok["role"] == "finetune", "dataset"].astype(str)))) or "?"
        n = summary["n"]
        fig.suptitle(f"Transfer: pre-trained on {src}, transferred to {tgt}\n"
                     f"({'one run per point' if n.max() == 1 else seeds_phrase(n, std=False) + ', bars: min–max'}"
                     f"{'; open marker: a run there not converged' if summary['not_converged'].sum() else ''})")
        return plots.save(fig, summary, out, "transfer")


STUDY = register(Transfer())
