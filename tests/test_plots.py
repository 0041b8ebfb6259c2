"""Figures, their CSVs, the report and the CLI's plot commands, from fabricated
study folders (synthetic numbers in the layout the study runner writes)."""

import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error, run_cli

from vitexp import analysis, plots
from vitexp import report
from vitexp.markdown import markdown_table
from vitexp.report import write_report
from vitexp.rows import CONVERGENCE_RULE

PROVENANCE = {"commit": "c0ffee123456", "torch": "2.4.0", "device": "NVIDIA H100", "host": "node7",
              "vitexp": "0.1.0", "started_at": "2024-05-01T10:00:00+00:00"}


def write_study(folder, rows, kind, toml=True):
    """DIR/runs.csv, history.csv and study.toml as a finished study leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    runs = pd.DataFrame(rows)
    runs.insert(0, "key", [f"{kind[:3]}{i:05d}" for i in range(len(runs))])
    runs.insert(1, "study", kind)
    runs = runs.assign(**PROVENANCE)
    runs.to_csv(folder / "runs.csv", index=False)
    pd.DataFrame([{"key": k, "epoch": 1, "train_loss": 1.0, "test_err": 50.0, "ema_err": 50.0, "lr": 1e-3,
                   "seconds": 1.0, "images_per_s": 100.0} for k in runs["key"]]).to_csv(folder / "history.csv",
                                                                                       index=False)
    if toml:
        (folder / "study.toml").write_text(f'[study]\nkind = "{kind}"\nmodels = ["vit_p_1gf"]\n')
    return folder


def row(model, err, **kw):
    return {"status": "ok", "model": model, "dataset": "shapes", "n_train": 1000, "seed": 0, "optimizer": "adamw",
            "lr": 1e-3, "wd": 0.1, "epochs": 50, "batch_size": 128, "top1_err": err, "last_err": err,
            "diverged": False, "wall_s": 60.0, "converged_rule": CONVERGENCE_RULE, **kw}


def stability_rows(opt, n=32, seed=0):
    rng = np.random.default_rng(seed)
    best = {"adamw": 2e-3, "sgd": 1.9}[opt]
    rows = []
    for model, base, width in (("vit_p_1gf", 30, 8), ("vit_c_1gf", 26, 3), ("regnety_1gf", 24, 2)):
        for _ in range(n):
            lr = best * 10 ** rng.uniform(np.log10(1 / 8), np.log10(4))
            wd = 0.1 * 10 ** rng.uniform(-1, 0.5)
            rows.append(row(model, base + width * np.log10(lr / best) ** 2 + rng.normal(0, 0.3),
                            optimizer=opt, lr=lr, wd=wd))
    rows.append(row("vit_p_1gf", 100.0, optimizer=opt, lr=best * 4, diverged=True))
    rows.append(row("vit_p_1gf", float("nan"), optimizer=opt, status="failed", error="RuntimeError: CUDA OOM"))
    return rows


def scale_rows():
    rows = []
    for model, a in (("vit_p_1gf", 80), ("vit_c_1gf", 70), ("regnety_1gf", 50)):
        for n in (500, 2000, 8000):
            for seed in (0, 1):
                err = a * (n / 500) ** -0.3 + seed
                rows.append(row(model, err, n_train=n, seed=seed, fewshot1_err=err + 20, fewshot5_err=err + 10))
    return rows


def optimizer_rows():
    rows = []
    for model, base, gap in (("vit_p_1gf", 28, 5.0), ("vit_c_1gf", 25, 0.7), ("regnety_1gf", 22, -0.2)):
        for opt in ("adamw", "sgd"):
            for ep in (5, 10, 20):
                for seed in (0, 1):
                    rows.append(row(model, base + 60 / ep + (gap if opt == "sgd" else 0) + seed * 0.1,
                                    optimizer=opt, epochs=ep, seed=seed))
    return rows


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    return {"adamw": write_study(root / "stab_adamw", stability_rows("adamw"), "stability"),
            "sgd": write_study(root / "stab_sgd", stability_rows("sgd", seed=1), "stability"),
            "scale": write_study(root / "scale", scale_rows(), "scale"),
            "optimizer": write_study(root / "optimizer", optimizer_rows(), "optimizer", toml=False)}


def finished_runs(*folders):
    """runs.csv as a user would read it: results only, diverged at 100."""
    runs = pd.concat([pd.read_csv(f / "runs.csv") for f in folders], ignore_index=True)
    runs = runs[runs["status"] == "ok"].copy()
    runs.loc[runs["diverged"], "last_err"] = 100.0
    return runs


def assert_files(paths, *stems):
    names = {p.name for p in paths}
    for stem in stems:
        for ext in ("png", "pdf", "csv"):
            assert f"{stem}.{ext}" in names
    for p in paths:
        assert p.stat().st_size > 0


# -- figures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cdf(studies, tmp_path_factory):
    out = tmp_path_factory.mktemp("cdf")
    return out, report.draw("stability", [studies["adamw"], studies["sgd"]], out, n_boot=300)


def test_cdf_csv_is_the_edf_of_runs_csv(studies, cdf):
    out, paths = cdf
    assert_files(paths, "cdf", "lrwd_adamw", "lrwd_sgd")
    table = pd.read_csv(out / "cdf.csv")
    runs = finished_runs(studies["adamw"], studies["sgd"])
    for (opt, model), g in runs.groupby(["optimizer", "model"]):
        err = np.sort(g["last_err"].to_numpy())
        for metric, values in (("last_err", err), ("gap", err - err[0])):
            got = table[(table["optimizer"] == opt) & (table["model"] == model) & (table["metric"] == metric)]
            assert got["error"].to_numpy() == pytest.approx(np.unique(values))
            below = [np.mean(values < e) for e in np.unique(values)]  # F(e) = share strictly below e
            assert got["edf"].to_numpy() == pytest.approx(below)
            assert got["edf_right"].iloc[-1] == 1.0
            assert got["n"].iloc[0] == len(err) and got["failed"].iloc[0] == (model == "vit_p_1gf")
    # the diverged run is the last step, at 100
    p = table[(table["optimizer"] == "sgd") & (table["model"] == "vit_p_1gf") & (table["metric"] == "last_err")]
    assert p["error"].iloc[-1] == 100.0 and p["edf"].iloc[-1] == pytest.approx(32 / 33)
    assert p["diverged"].iloc[0] == 1


def test_lrwd_csv_holds_every_run_and_the_band(studies, cdf):
    out, _ = cdf
    table = pd.read_csv(out / "lrwd_sgd.csv")
    runs = finished_runs(studies["sgd"])
    pts = table[(table["element"] == "run") & (table["param"] == "lr")]
    assert len(pts) == len(runs)
    mine = pts.sort_values(["model", "value"])
    theirs = runs.sort_values(["model", "lr"])
    assert mine["value"].to_numpy() == pytest.approx(theirs["lr"].to_numpy())
    assert mine["last_err"].to_numpy() == pytest.approx(theirs["last_err"].to_numpy())
    for (model, param), g in table[table["element"] != "run"].groupby(["model", "param"]):
        b = g.set_index("element")["value"]
        assert b["lo"] <= b["best"] <= b["hi"]
    # the synthetic optimum (lr 1.9) lies in every ViT's good range
    best = table[(table["element"] != "run") & (table["param"] == "lr") & (table["model"] == "vit_c_1gf")]
    b = best.set_index("element")["value"]
    assert b["lo"] <= 1.9 <= b["hi"]


def test_too_few_runs_get_no_bootstrap_band(tmp_path):
    """With under 8 runs per bootstrap draw (32 runs) the "best" lr would be noise: no band,
    a note on the figure, blanks in the table."""
    folder = write_study(tmp_path / "few", stability_rows("sgd", n=6), "stability")
    report.draw("stability", [folder], tmp_path / "fig", n_boot=100)
    table = pd.read_csv(tmp_path / "fig" / "lrwd_sgd.csv")
    assert set(table["element"]) == {"run"}
    bands = analysis.hparam_bands(analysis.load_runs([folder]), n_boot=100)
    assert bands["best"].isna().all() and (bands["n_sample"] < analysis.MIN_PER_DRAW).all()


def test_scale_csv_is_the_mean_over_seeds(studies, tmp_path):
    paths = report.draw("scale", [studies["scale"]], tmp_path)
    assert_files(paths, "scale")
    table = pd.read_csv(tmp_path / "scale.csv")
    runs = finished_runs(studies["scale"])
    for metric in ("last_err", "fewshot1_err", "fewshot5_err"):
        by_hand = runs.groupby(["model", "n_train"])[metric].agg(["mean", "min", "max"])
        got = table[table["metric"] == metric].set_index(["model", "n_train"])[["mean", "min", "max"]]
        pd.testing.assert_frame_equal(got.sort_index(), by_hand.sort_index(), check_names=False)


def test_optimizer_csv_is_the_gap_of_the_means(studies, tmp_path):
    paths = report.draw("optimizer", [studies["optimizer"]], tmp_path)
    assert_files(paths, "optimizer")
    table = pd.read_csv(tmp_path / "optimizer.csv")
    means = finished_runs(studies["optimizer"]).groupby(["model", "optimizer", "epochs"])["last_err"].mean()
    gaps = table[table["panel"] == "gap"]
    assert len(gaps) == 9
    for r in gaps.itertuples():
        assert r.value == pytest.approx(means[(r.model, "sgd", r.epochs)] - means[(r.model, "adamw", r.epochs)])
    delta = table[table["panel"] == "delta"].set_index(["model", "epochs"])
    assert delta.loc[("regnety_1gf", 5), "optimizer"] == "sgd"  # its best optimizer, as in the paper
    assert delta.loc[("vit_p_1gf", 5), "value"] == pytest.approx(
        means[("vit_p_1gf", "adamw", 5)] - means[("vit_p_1gf", "adamw", 20)])


def test_model_colours_follow_the_family():
    styles = plots.model_styles(["vit_p_1gf", "vit_p_4gf", "vit_c_1gf", "regnety_4gf", "resnet50"])
    r, g, b, _ = styles["vit_p_4gf"]["color"]
    assert b > r  # ViT_P: blues
    r, g, b, _ = styles["vit_c_1gf"]["color"]
    assert r > b  # ViT_C: oranges
    r, g, b, _ = styles["resnet50"]["color"]
    assert r == g == b  # CNNs: greys
    assert plots.model_order(["regnety_4gf", "vit_p_4gf", "vit_c_1gf", "vit_p_1gf"]) == [
        "vit_p_1gf", "vit_p_4gf", "vit_c_1gf", "regnety_4gf"]


# -- report ----------------------------------------------------------------------------------------

def test_report_has_figures_tables_and_provenance(studies, tmp_path):
    folders = [studies["adamw"], studies["sgd"], studies["scale"], studies["optimizer"]]
    paths = write_report(folders, tmp_path, n_boot=200)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert paths[:2] == [tmp_path / "report.md", tmp_path / "report.html"]
    for stem in ("cdf", "lrwd_adamw", "lrwd_sgd", "scale", "optimizer"):
        assert f"figures/{stem}.png" in md and (tmp_path / "figures" / f"{stem}.pdf").exists()
        assert f"{stem}.png" in page
    for text in ("Provenance", "c0ffee123456", "NVIDIA H100", "2.4.0", "RuntimeError: CUDA OOM",
                 'kind = "stability"', "Optimizer gap", "fewshot5_err"):
        assert text in md and text in page, text
    assert page.count("data:image/png;base64,") == 5 and 'src="figures' not in page  # stands alone


def test_captions_say_what_the_figure_shows(studies, tmp_path):
    from vitexp.studies import get_study

    both = report.draw("stability", [studies["adamw"], studies["sgd"]], tmp_path / "both", n_boot=100)
    one = report.draw("stability", [studies["adamw"]], tmp_path / "one", n_boot=100)
    cdf = {p.parent.name: get_study("stability").captions(p) for p in both + one if p.name == "cdf.png"}
    assert "one row per optimizer (AdamW, SGD)" in cdf["both"] and "AdamW runs" in cdf["one"]
    lrwd = get_study("stability").captions(tmp_path / "both" / "lrwd_sgd.png")
    assert lrwd.startswith("SGD") and "vit_p_1gf, vit_c_1gf, regnety_1gf" in lrwd and "bootstrap" in lrwd
    scale = get_study("scale").captions(report.draw("scale", [studies["scale"]], tmp_path / "s")[0])
    assert "mean over seeds" in scale and "1, 5-shot" in scale


def test_markdown_table():
    df = pd.DataFrame({"model": ["a|b", "c"], "err": [12.345, 100.0], "lr": [0.00025, 1.9], "n": [3.0, 64.0]})
    assert markdown_table(df).splitlines() == ["| model | err | lr | n |", "|---|---|---|---|",
                                               "| a\\|b | 12.35 | 0.00025 | 3 |", "| c | 100.00 | 1.90 | 64 |"]


# -- the CLI ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_writes_and_prints_the_figures(studies, tmp_path):
    p = run_cli("plot-scale", studies["scale"], "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    assert str(tmp_path / "scale.png") in p.stdout and (tmp_path / "scale.pdf").exists()


@pytest.mark.slow
def test_cli_bad_input_is_one_line(studies, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_cli("plot-cdf", empty), "no runs.csv")
    (empty / "runs.csv").write_text("")
    assert_user_error(run_cli("plot-cdf", empty), "no runs")
    thin = write_study(tmp_path / "thin", [{"model": "vit_p_1gf", "top1_err": 30.0}], "stability")
    assert_user_error(run_cli("plot-cdf", thin), "lacks column", "optimizer", "lr", "wd")
    assert_user_error(run_cli("plot-scale", studies["adamw"]), "holds a stability study", "plot-cdf")
    assert_user_error(run_cli("plot-optimizer", studies["scale"]), "holds a scale study", "plot-scale")
    bad = write_study(tmp_path / "bad", [row("vit_p_1gf", "thirty")], "stability")
    assert_user_error(run_cli("plot-cdf", bad), "top1_err", "thirty")
    assert_user_error(run_cli("plot-cdf", studies["adamw"], studies["sgd"]), "--out")


def test_scale_figure_says_data_budget_seeds_and_marks_unconverged_points(tmp_path):
    import matplotlib.pyplot as plt

    from vitexp.studies.scale import plot_scale, scale_caption, scale_summary

    rows = [row(m, e, n_train=n, epochs=ep, seed=s, converged=not (m == "vit_p_1gf" and n == 400), dataset="shapes")
            for m, base in (("vit_p_1gf", 60.0), ("regnety_1gf", 20.0)) for n, ep in ((400, 64), (1600, 40))
            for s in (0, 1) for e in [base - n / 100 + s * 0.1 + 0.2]]
    runs = analysis.load_runs([write_study(tmp_path / "sc", rows, "scale")])
    summary = scale_summary(runs)
    caption = scale_caption(runs, summary)
    assert "shapes" in caption and "steps" in caption and "40–64 epochs" in caption and "2 seeds" in caption
    assert "open marker" in caption
    flagged = summary[(summary["metric"] == "last_err") & (summary["not_converged"] > 0)]
    assert list(zip(flagged["model"], flagged["n_train"])) == [("vit_p_1gf", 400)]
    seen = []
    real = plt.Axes.scatter
    plt.Axes.scatter = lambda ax, x, y, **kw: seen.append((list(x), kw.get("facecolor"))) or real(ax, x, y, **kw)
    try:
        plot_scale(runs, tmp_path / "fig")
    finally:
        plt.Axes.scatter = real
    assert ([400], "white") in seen  # the open marker, where a seed did not converge
    text = (tmp_path / "fig" / "scale.csv").read_text()
    assert "00000000" not in text  # floats as a reader expects them, no float noise


def test_one_models_curves_differ_by_the_field_that_differs(tmp_path):
    from vitexp import plots

    rows = [row("vit_p_1gf", 50.0 - n / 100, n_train=n) for n in (400, 1600, 6400)]
    folder = write_study(tmp_path / "c", rows, "scale")
    styles = []
    real = plots.mpl.axes.Axes.plot

    def spy(ax, *a, **kw):
        styles.append(kw.get("ls"))
        return real(ax, *a, **kw)

    plots.mpl.axes.Axes.plot = spy
    try:
        report.plot_curves([folder], tmp_path / "fig", every=True)
    finally:
        plots.mpl.axes.Axes.plot = real
    assert len(set(s for s in styles if s)) == 3  # three sizes, three dashes


def test_curves_say_which_weights_gave_the_error(tmp_path):
    """A history without the EMA's error is drawn from the raw weights' and says so, in the
    title and in the data file's `evaluated` column."""
    folder = write_study(tmp_path / "c", [row("vit_p_1gf", 40.0)], "scale")
    hist = pd.read_csv(folder / "history.csv").drop(columns="ema_err")
    hist.to_csv(folder / "history.csv", index=False)
    seen = []
    real = plots.mpl.axes.Axes.set_title
    plots.mpl.axes.Axes.set_title = lambda ax, t, *a, **kw: seen.append(t) or real(ax, t, *a, **kw)
    try:
        report.plot_curves([folder], tmp_path / "fig")
    finally:
        plots.mpl.axes.Axes.set_title = real
    assert set(pd.read_csv(tmp_path / "fig" / "curves.csv")["evaluated"]) == {"model"}
    assert any("raw weights" in t for t in seen)


# -- what a figure says ---------------------------------------------------------------------------

def test_display_names_are_the_papers():
    assert [plots.display_name(m) for m in ("vit_p_7mf", "vit_c_7mf_h4", "vit_p_7mf_p16", "regnety_1gf",
                                            "resnet50", "hybrid_r50_vit_b16", "timm:convit_tiny", "my_net")] == [
        "ViT_P-7MF", "ViT_C-7MF, 4 heads", "ViT_P-7MF, patch 16", "RegNetY-1GF", "ResNet-50", "R50+ViT-B/16",
        "convit_tiny (timm)", "my_net"]
    assert plots.display_name("vit_p_7mf" + analysis.TAUGHT + "resnet_7mf") == "ViT_P-7MF taught by ResNet-7MF"


def figure_texts(monkeypatch, draw) -> dict:
    """Every figure DRAW saves -> its texts (suptitle, panel titles, legend entries), by stem."""
    seen = {}
    real = plots.save

    def spy(fig, table, out, stem):
        texts = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]
        for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
            texts += [t.get_text() for t in legend.get_texts()]
        seen[stem] = "\n".join(texts)
        return real(fig, table, out, stem)

    monkeypatch.setattr(plots, "save", spy)
    draw()
    return seen


def test_figures_name_the_data_the_budget_and_the_models(studies, tmp_path, monkeypatch):
    texts = figure_texts(monkeypatch, lambda: (
        report.draw("stability", [studies["adamw"], studies["sgd"]], tmp_path / "s", n_boot=50),
        report.draw("optimizer", [studies["optimizer"]], tmp_path / "o"),
        report.plot_curves([studies["scale"]], tmp_path / "c")))
    assert set(texts) == {"cdf", "lrwd_adamw", "lrwd_sgd", "optimizer", "curves"}
    for stem, text in texts.items():
        assert "shapes" in text and "batch 128" in text, stem
        assert "ViT_P-1GF" in text and "vit_p_1gf" not in text, stem
    assert "1,000 training images, 50 epochs" in texts["cdf"] and "5–20 epochs" in texts["optimizer"]
    assert "95% bootstrap" in texts["cdf"] and "95% t interval" in texts["optimizer"]
    assert "n=8,000" in texts["curves"]  # the best trial of a scale study is one of its sizes: say which


def test_cdf_bands_and_optimizer_gap_intervals_are_in_the_data_files(studies, cdf):
    out, _ = cdf
    table = pd.read_csv(out / "cdf.csv")
    assert (table["edf_lo"] <= table["edf_right"] + 1e-12).all() and (table["edf_right"] <= table["edf_hi"] + 1e-12).all()
    assert (table["edf_hi"] - table["edf_lo"]).max() > 0.1


def test_optimizer_gap_bars_are_the_t_interval_over_seeds(studies, tmp_path):
    report.draw("optimizer", [studies["optimizer"]], tmp_path)
    gaps = pd.read_csv(tmp_path / "optimizer.csv").query("panel == 'gap'")
    # optimizer_rows: seed 1 adds 0.1 to both optimizers, so every paired gap is exact
    assert (gaps["n"] == 2).all() and gaps["half"].abs().max() < 1e-9
    assert set(gaps.columns) >= {"value", "half", "n"}


def test_transfer_panels_set_models_side_by_side_with_bars():
    from vitexp.studies.scale import size_panel

    part = pd.DataFrame([{"model": m, "size": n, "mean": 30.0 + i, "min": 25.0, "max": 40.0, "not_converged": 0}
                         for i, m in enumerate(("vit_p_7mf", "vit_c_7mf", "resnet_7mf")) for n in (1000, 3000)])
    fig, axes = plots.figure(1, 2)
    styles, labels = plots.model_styles(part["model"]), {m: m for m in part["model"]}
    size_panel(axes[0][0], part, "size", styles, labels, bars=True)
    size_panel(axes[0][1], part, "size", styles, labels)
    xs = [tuple(line.get_xdata()) for line in axes[0][0].get_lines() if line.get_label() in labels]
    assert len(set(x[0] for x in xs)) == 3  # dodged: no two models at one x
    assert not [c for c in axes[0][0].collections if type(c).__name__ == "FillBetweenPolyCollection"]
    assert [c for c in axes[0][1].collections if "Poly" in type(c).__name__]  # the scale figure keeps bands
