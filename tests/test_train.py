"""The training engine: schedule, weight-decay groups, EMA, divergence, resume, CSV schema."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import assert_user_error, run_cli
from vitexp import data as vdata
from vitexp import models as vmodels
from vitexp.config import TrainConfig
from vitexp.optim import EMA, build_scheduler, lr_factor, param_groups, peak_lr, warmup_steps
from vitexp.rows import HISTORY_COLUMNS, RUN_COLUMNS
from vitexp.store import TrialStore
from vitexp.trainer import run_trial

SMALLEST_VIT_C = min((n for n in vmodels.list_models() if n.startswith("vit_c_") and n.endswith("mf")),
                     key=lambda n: vmodels.complexity(n)["gmacs"])


def test_lr_schedule_values():
    total, warm, floor = 1000, 100, 0.005
    assert lr_factor(0, total, warm, floor) == pytest.approx(0.01 * (floor + (1 - floor) * 0.5 * (1 + math.cos(0))))
    # end of warmup: the cosine value itself
    c = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 99 / total))
    assert lr_factor(99, total, warm, floor) == pytest.approx(c)
    assert lr_factor(total // 2, total, warm, floor) == pytest.approx(floor + (1 - floor) * 0.5)
    assert lr_factor(total, total, warm, floor) == pytest.approx(floor)
    vals = [lr_factor(s, total, warm, floor) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone after warmup


def test_scheduler_drives_optimizer_and_scales_lr():
    cfg = TrainConfig(lr=0.1, wd=0.0, batch_size=256, lr_batch_size=1024, epochs=10, warmup_epochs=1)
    assert peak_lr(cfg) == pytest.approx(0.025)
    assert warmup_steps(cfg, 10) == 10
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=peak_lr(cfg))
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.025 * 0.1 * lr_factor(0, 100, 10, 0.005) / 0.1)
    assert max(lrs) == pytest.approx(lrs[9])  # peak right after warmup
    assert lrs[-1] == pytest.approx(0.025 * lr_factor(99, 100, 10, 0.005))
    # a warmup longer than a tenth of training is capped there
    assert warmup_steps(TrainConfig(epochs=10, warmup_epochs=5), 10) == 10


def test_weight_decay_groups_exclude_norms_biases_embeddings():
    model = vmodels.build_model(SMALLEST_VIT_C, num_classes=10)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(n.endswith("pos_embedding") for n in nd) and "class_token" in nd
    assert all(model.get_parameter(n).ndim <= 1 or n.endswith(("pos_embedding", "class_token")) for n in nd)
    assert all(model.get_parameter(n).ndim >= 2 for n in d)
    norms = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d))}
    assert norms and norms <= nd and any(n.endswith("bias") for n in nd)
    assert len(d) + len(nd) == len(list(model.parameters()))


def test_ema_matches_hand_computed_average():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9, every=1)
    w = [model[0].weight.detach().clone()]
    ema.update_parameters(model)  # first update copies
    expect = w[0].clone()
    for n in range(1, 5):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model[1].num_batches_tracked += 3
        ema.update_parameters(model)
        d = min(0.9, (1 + n - 1) / (10 + n - 1))
        expect = d * expect + (1 - d) * model[0].weight.detach()
    assert torch.allclose(ema.module[0].weight, expect, atol=1e-6)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked  # integer buffers copied


def test_ema_updates_when_an_epoch_is_shorter_than_its_period(monkeypatch, tiny):
    import vitexp.trainer as vtrain

    calls = []

    class CountingEMA(EMA):
        def update_parameters(self, model):
            calls.append(1)
            super().update_parameters(model)

    monkeypatch.setattr(vtrain, "EMA", CountingEMA)
    steps_per_epoch, epochs = 2, 4  # fewer steps per epoch than EMA_EVERY: tiny subsets in a scale study
    run_trial(TrainConfig(model=SMALLEST_VIT_C, **{**tiny, "n_train": 128, "epochs": epochs}))
    assert len(calls) == steps_per_epoch * epochs // vtrain.EMA_EVERY


def _first_bn_input_stats(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """What precise BN must give the first BatchNorm: the mean over BATCHES of its input's
    per-batch mean and (unbiased) variance (its input does not depend on any BN statistics)."""
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    hook.remove()
    model.train(was_training)
    return (torch.stack([s.mean((0, 2, 3)) for s in seen]).mean(0),
            torch.stack([s.var((0, 2, 3), unbiased=True) for s in seen]).mean(0))


@pytest.mark.parametrize("precise", [0, 128])
def test_precise_bn_recomputes_the_statistics_of_the_model_and_its_ema(tiny, precise):
    """pycls's protocol: before each evaluation the BN statistics of the model and of its EMA
    become those of the first `precise_bn` training images of the epoch, each seen through its
    own weights; off, evaluating leaves them as training left them."""
    import itertools

    from vitexp.trainer import setup_trial, test_epoch, train_epoch

    t = setup_trial(TrainConfig(model="resnet_7mf", precise_bn=precise, **{**tiny, "epochs": 1}).resolved())
    train_epoch(t, 0)
    batches = [x for x, _ in itertools.islice(t.train_loader, 2)]  # 128 images at batch 64
    models = {"model": t.model, "ema": t.ema.module}
    before = {n: [b.clone() for b in m.buffers()] for n, m in models.items()}
    expected = {n: _first_bn_input_stats(m, batches) for n, m in models.items()}
    test_epoch(t, 0)
    for name, m in models.items():
        bn = next(b for b in m.modules() if isinstance(b, nn.BatchNorm2d))
        if precise:
            assert torch.allclose(bn.running_mean, expected[name][0], atol=1e-5), name
            assert torch.allclose(bn.running_var, expected[name][1], rtol=1e-4, atol=1e-5), name
            assert bn.momentum == 0.1  # restored for training
        else:
            assert all(torch.equal(a, b) for a, b in zip(before[name], m.buffers())), name


def test_a_field_added_after_results_were_committed_keys_only_when_set():
    base = TrainConfig(model="resnet_7mf")
    assert "precise_bn" not in base.result_fields()
    assert TrainConfig(model="resnet_7mf", precise_bn=0).key() == base.key()
    assert TrainConfig(model="resnet_7mf", precise_bn=8192).key() != base.key()


def test_divergence_is_a_result_not_a_crash(tmp_path, tiny):
    cfg = TrainConfig(model=SMALLEST_VIT_C, optimizer="sgd", lr=1e4, wd=0.0, **tiny)
    row = run_trial(cfg, out=tmp_path)
    assert row["diverged"] is True and row["top1_err"] == 100.0 and row["last_err"] == 100.0
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert bool(runs.diverged.iloc[0]) and runs.top1_err.iloc[0] == 100.0


class Kill(Exception):
    pass


def test_killed_trial_resumes_to_the_same_result(tmp_path, tiny):
    cfg = TrainConfig(model=SMALLEST_VIT_C, **{**tiny, "epochs": 3})
    whole = run_trial(cfg, out=tmp_path / "whole")

    def die_after_epoch_2(ev):
        if ev["event"] == "epoch" and ev["epoch"] == 2:
            raise Kill

    with pytest.raises(Kill):
        run_trial(cfg, out=tmp_path / "killed", progress=die_after_epoch_2)
    store = TrialStore(tmp_path / "killed")
    assert store.checkpoint_path(cfg.key()).exists() and store.result(cfg.key()) is None
    resumed = run_trial(cfg, out=tmp_path / "killed")
    for k in ("top1_err", "last_err", "top1_err_model", "train_loss", "best_epoch"):
        assert resumed[k] == whole[k], k
    h1 = pd.read_csv(tmp_path / "whole" / "history.csv")
    h2 = pd.read_csv(tmp_path / "killed" / "history.csv")
    assert h1[["train_loss", "test_err", "ema_err", "lr"]].equals(h2[["train_loss", "test_err", "ema_err", "lr"]])
    assert not store.checkpoint_path(cfg.key()).exists()  # cleaned up once recorded


def test_csv_schema_and_provenance(tmp_path, tiny):
    cfg = TrainConfig(model=SMALLEST_VIT_C, **tiny)
    run_trial(cfg, out=tmp_path)
    runs = pd.read_csv(tmp_path / "runs.csv")
    hist = pd.read_csv(tmp_path / "history.csv")
    for c in RUN_COLUMNS + ["commit", "torch", "device", "batch_size", "label_smoothing", "ema", "params_m"]:
        assert c in runs.columns, c
    for c in HISTORY_COLUMNS:
        assert c in hist.columns, c
    assert len(runs) == 1 and len(hist) == tiny["epochs"]
    r = runs.iloc[0]
    assert r.n_train == 256 and r.status == "ok" and r.study == "train"
    assert r.top1_err == pytest.approx(hist.ema_err.min())  # protocol: best evaluated (EMA) error
    assert r.last_err == pytest.approx(hist.ema_err.iloc[-1])


@pytest.mark.slow
def test_train_cli_learns_shapes_and_is_idempotent(tmp_path):
    args = ["train", "--model", SMALLEST_VIT_C, "--dataset", "shapes", "--epochs", "3", "--device", "cpu",
            "--n-train", "5000", "--n-test", "1000", "--out", tmp_path]
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    row = pd.read_csv(tmp_path / "runs.csv").iloc[0]
    assert row.top1_err < 75  # chance is 90% error on 10 classes; vit_c_7mf gets 63%, vit_c_25mf 45%
    p2 = run_cli(*args)
    assert p2.returncode == 0 and "nothing to do" in p2.stdout
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 1


@pytest.mark.slow
def test_train_cli_divergence_exits_zero(tmp_path):
    p = run_cli("train", "--model", SMALLEST_VIT_C, "--optimizer", "sgd", "--lr", "10000", "--epochs", "1",
                "--n-train", "1024", "--n-test", "100", "--device", "cpu", "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    assert bool(pd.read_csv(tmp_path / "runs.csv").diverged.iloc[0])


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--optimizer", "lamb"], "optimizer"),
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "vit_q_1gf"], "unknown model"),
    (["--dataset", "imagenot"], "dataset"),
    (["--n-train", "10000000"], "n-train"),
])
def test_train_cli_bad_input(tmp_path, args, needle):
    assert_user_error(run_cli("train", "--device", "cpu", "--out", tmp_path, *args), needle)


def test_a_patch_that_does_not_divide_the_data_takes_the_models_resolution(tiny):
    """vit_c_7mf's 8 px patches on 28 px Fashion-MNIST: the data is resized to the model's 32 px,
    while a patch that divides the data (or an explicit --image-size) keeps its size."""
    assert TrainConfig(model="vit_c_7mf", dataset="fashion-mnist").resolved().image_size == 32
    assert TrainConfig(model="vit_c_25mf", dataset="fashion-mnist").resolved().image_size is None
    assert TrainConfig(model="resnet_7mf", dataset="fashion-mnist").resolved().image_size is None
    assert TrainConfig(model="vit_c_7mf", dataset="fashion-mnist", image_size=16).resolved().image_size == 16
    if not vdata.locate("fashion-mnist").startswith("/"):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    row = run_trial(TrainConfig(model="vit_c_7mf", **{**tiny, "dataset": "fashion-mnist", "epochs": 1}))
    assert row["image_size"] == 32 and row["top1_err"] < 100


def test_the_convergence_rule():
    """Converged: learned something (final error more than 5 points below chance) and the
    training loss flattened (the last quarter's fall at most 15% of the whole fall)."""
    from vitexp.rows import converged, converged_from

    flat = [2.0, 1.2, 0.9, 0.8, 0.75, 0.72, 0.70, 0.69]  # last quarter: 0.72 -> 0.69, 2% of 1.31
    falling = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.8, 0.6]  # still falling: 0.2 of 1.4
    assert converged(flat, 20.0, 90.0) and not converged(falling, 20.0, 90.0)
    # a run at chance never converges, however flat its loss; an unknown chance is not checked
    assert not converged(flat, 86.0, 90.0) and not converged(flat, 88.5, 90.0) and converged(flat, 86.0, float("nan"))
    assert not converged([2.3, 2.3, 2.3, 2.3], 40.0, 90.0)  # a loss that never fell learned nothing
    assert not converged([1.0], 20.0, 90.0) and not converged([], 20.0, 90.0)  # one epoch cannot show it
    assert not converged(flat, 100.0, float("nan")) and not converged(flat, float("nan"), 90.0)  # diverged
    # from history rows, in any order, with the data set's chance (5 classes: 80%)
    rows = [{"epoch": e, "train_loss": v} for e, v in reversed(list(enumerate(flat)))]
    assert converged_from(rows, 20.0, "fashion-mnist:0-4") and not converged_from(rows, 76.0, "fashion-mnist:0-4")


def test_committed_folders_are_judged_again_by_todays_rule(tmp_path):
    """A folder recorded under an earlier rule: load_runs recomputes `converged` from its
    history.csv and keeps the flag as recorded beside it."""
    from vitexp import analysis

    folder = tmp_path / "old"
    folder.mkdir()
    runs = pd.DataFrame({"key": ["a", "b"], "status": "ok", "model": "vit_p_7mf", "dataset": "shapes",
                         "top1_err": [20.0, 88.0], "last_err": [20.0, 88.0], "diverged": False,
                         "converged": [False, True]})
    runs.to_csv(folder / "runs.csv", index=False)
    hist = pd.DataFrame([{"key": k, "epoch": e, "train_loss": v} for k in "ab"
                         for e, v in enumerate([2.0, 1.0, 0.7, 0.69])])
    hist.to_csv(folder / "history.csv", index=False)
    out = analysis.load_runs([folder]).set_index("key")
    assert out.loc["a", "converged"] and not out.loc["b", "converged"]  # b sits at chance (90%)
    assert list(out["converged_recorded"]) == [False, True]


def test_runs_record_convergence_and_how_they_ran(tmp_path, tiny):
    row = run_trial(TrainConfig(model=SMALLEST_VIT_C, **tiny), out=tmp_path)
    assert isinstance(row["converged"], bool) and row["fused_k"] == 1 and row["amp"] is False
    assert row["data_dir"] == "generated"


def test_a_dip_in_test_error_mid_run_is_not_what_is_reported(tmp_path):
    """A trial whose test error dips mid-run (a lucky epoch) reports its final model's error;
    the minimum stays in runs.csv as `top1_err` (pycls's convention) and no table reads it."""
    from vitexp import analysis, rows
    from vitexp.studies.scale import scale_summary

    cfg = TrainConfig(model=SMALLEST_VIT_C, dataset="shapes", epochs=4)
    hist = [{"epoch": e, "train_loss": v, "test_err": t, "ema_err": t}
            for e, (v, t) in enumerate([(2.0, 50.0), (1.0, 20.0), (0.8, 40.0), (0.79, 35.0)])]
    got = rows.summary(cfg, hist, diverged=False)
    assert (got["top1_err"], got["last_err"]) == (20.0, 35.0)
    folder = tmp_path / "dip"
    folder.mkdir()
    pd.DataFrame([{"key": "a", "status": "ok", "model": SMALLEST_VIT_C, "n_train": 100, "seed": 0,
                   "diverged": False, **got}]).to_csv(folder / "runs.csv", index=False)
    summary = scale_summary(analysis.load_runs([folder]))
    assert summary["mean"].tolist() == [35.0] and summary["metric"].tolist() == [analysis.ERR]


class Recorder:
    """A toy trial feature: records each hook's call and changes what each hook may change."""

    def __init__(self):
        self.calls = []
        self.epochs = 0

    def build_options(self):
        self.calls.append("build_options")
        return {"distilled": True}

    def init_weights(self, model):
        self.calls.append("init_weights")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

    def loss(self, criterion, device):
        self.calls.append("loss")

        def doubled(out, x, y):  # a distilled model trains with two heads
            return 2 * criterion(out[0], y)
        return doubled

    def epoch_columns(self):
        self.epochs += 1
        return {"toy_epochs": self.epochs}


def test_a_feature_changes_a_trial_only_through_its_hooks(tmp_path, monkeypatch):
    """The trainer calls each `Feature` hook: build options reach the builder, first weights
    are the feature's, its loss is what the step minimises, its epoch columns reach history.csv
    and the trial's row (the last epoch's). The table in `vitexp.features` is where it comes from."""
    from vitexp import features, trainer

    toy = Recorder()
    built = {}
    real_build = vmodels.build_model

    def build(*a, **kw):
        built.update(kw)
        return real_build(*a, **kw)

    monkeypatch.setattr(trainer.vmodels, "build_model", build)
    monkeypatch.setattr(features, "FEATURES", {"seed": lambda cfg, store: toy})  # seed 1 is set: it asks
    cfg = TrainConfig(model=SMALLEST_VIT_C, n_train=64, n_test=32, batch_size=32, epochs=2, seed=1, compile=False)
    t = trainer.setup_trial(cfg.resolved())
    assert t.features == [toy] and toy.calls == ["build_options", "init_weights", "loss"]
    assert built["distilled"] and all(not p.any() for p in t.model.parameters())
    x, y = next(iter(t.train_loader))
    assert t.loss(t.net(x), x, y).item() == pytest.approx(2 * t.criterion(t.net(x)[0], y).item())
    row = run_trial(cfg, out=tmp_path)
    history = pd.read_csv(TrialStore(tmp_path).history_path(row["key"]))
    assert history["toy_epochs"].tolist() == [1, 2] and row["toy_epochs"] == 2
