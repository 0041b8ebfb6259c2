"""[ViT]'s transfer protocol: hybrids, class-split data sets, held-out splits, fine-tuning from
kept weights (position embeddings, zero head, resume), bad `--from`s, and the transfer study."""

import math

import pandas as pd
import pytest
import torch

import vitexp.models as vm
from tests.conftest import assert_user_error, run_cli
from vitexp.config import TrainConfig, config_fields
from vitexp.data import load_data
from vitexp.errors import UserError
from vitexp.finetune import head_keys, load_source
from vitexp.source import find_source
from vitexp.models.registry import SMALL_LEVELS
from vitexp.store import TrialStore, read_weights
from vitexp.trainer import run_trial

SRC = TrainConfig(model="vit_p_7mf", dataset="shapes:0-4", n_train=200, n_test=100, batch_size=50, epochs=2,
                  device="cpu", lr=0.5, wd=0.0, warmup_epochs=0.0, ema_decay=0.9, optimizer="sgd")


class Kill(Exception):
    pass


# -- models and data -----------------------------------------------------------------------

@pytest.mark.parametrize("level", SMALL_LEVELS)
def test_a_hybrid_costs_its_level_and_reads_the_vit_p_grid(level):
    """Within 12% of the level's ViT_P/ViT_C/ResNet, and as many tokens as its ViT_P twin."""
    costs = {n: vm.complexity(n, 32, num_classes=10)["gmacs"] for n in
             (f"hybrid_{level}", f"vit_p_{level}", f"vit_c_{level}", f"resnet_{level}")}
    assert max(costs.values()) / min(costs.values()) <= 1.12, costs
    hybrid, vit = vm.build_model(f"hybrid_{level}", num_classes=10), vm.build_model(f"vit_p_{level}", num_classes=10)
    assert hybrid.seq_length == vit.seq_length and hybrid.hidden_dim == vit.hidden_dim
    x = torch.randn(2, 3, 32, 32)
    assert hybrid.conv_proj(x).shape == vit.conv_proj(x).shape  # the CNN's map is the token grid


def test_the_paper_hybrid_is_r50_stages_1_to_3_then_vit_b16():
    with torch.device("meta"):
        model = vm.build_model("hybrid_r50_vit_b16", num_classes=1000)
    assert model.seq_length == 14 * 14 + 1 and model.hidden_dim == 768 and len(model.encoder.layers) == 12
    stages = [m for m in model.conv_proj.cnn if isinstance(m, torch.nn.Sequential)]
    assert [len(s) for s in stages] == [3, 4, 9]
    assert model.conv_proj.proj.in_channels == 1024 and model.conv_proj.proj.kernel_size == (1, 1)


def test_a_class_selection_is_its_own_data_set():
    a = load_data("shapes:0-4", n_train=200, n_test=300)
    b = load_data("shapes:5-9", n_train=200, n_test=300)
    full = load_data("shapes", n_test=1000)
    assert a.num_classes == b.num_classes == 5 and set(a.train_y.tolist()) == set(range(5))
    assert torch.bincount(a.train_y).tolist() == [40] * 5
    # no image in common, and each is the full set's images of those classes, relabelled
    flat = {bytes(x.numpy()) for x in full.test_x[full.test_y >= 5]}
    assert {bytes(x.numpy()) for x in b.test_x} <= flat
    assert not {bytes(x.numpy()) for x in a.test_x} & flat
    picked = load_data("shapes:7,2", n_test=300)
    assert picked.num_classes == 2  # listed order: class 7 is label 0
    assert torch.equal(picked.test_x[picked.test_y == 0][:50], full.test_x[full.test_y == 7][:50])
    for bad in ("shapes:4", "shapes:3-12", "shapes:1,1", "shapes:a-b"):
        with pytest.raises(UserError, match="two or more distinct classes"):
            load_data(bad)


def test_a_held_out_split_is_balanced_disjoint_and_reported(tmp_path):
    b = load_data("shapes", n_train=500, n_test=100, holdout=0.1)
    assert len(b.train_y) == 450 and torch.bincount(b.val_y).tolist() == [5] * 10
    train, val = {bytes(x.numpy()) for x in b.train_x}, {bytes(x.numpy()) for x in b.val_x}
    assert not train & val
    row = run_trial(TrainConfig(**{**SRC.to_dict(), "dataset": "shapes", "holdout": 0.2, "epochs": 1}), out=tmp_path)
    assert row["n_train"] == 200 and row["n_holdout"] == 40 and 0 <= row["val_err"] <= 100
    # the row gives back its key (as every committed trial must): n_train is the config's
    fields = {k: v for k, v in row.items() if k in config_fields() and k != "fewshot"}
    assert TrainConfig(**fields).key() == row["key"]


# -- fine-tuning ---------------------------------------------------------------------------

def test_position_embeddings_interpolate_as_computed_by_hand():
    pe = torch.randn(1, 1 + 16, 3)
    assert torch.equal(vm.interpolate_pos_embed(pe, (4, 4)), pe)  # the same grid: the identity
    a, b, c, d = 1.0, 2.0, 3.0, 5.0
    small = torch.tensor([[9.0], [a], [b], [c], [d]]).reshape(1, 5, 1)  # class token 9, grid [[a, b], [c, d]]
    big = vm.interpolate_pos_embed(small, (4, 4))
    # half-pixel centres: output pixel i samples input i/2 - 1/4, clamped: weights 1, 3/4-1/4, 1/4-3/4, 1
    row = lambda p, q: [p, 0.75 * p + 0.25 * q, 0.25 * p + 0.75 * q, q]  # noqa: E731
    top, bottom = row(a, b), row(c, d)
    want = [row(t, u) for t, u in zip(top, bottom)]  # per column, between the two rows
    want = [[want[j][i] for j in range(4)] for i in range(4)]
    assert big[0, 0, 0] == 9.0
    assert torch.allclose(big[0, 1:, 0].reshape(4, 4), torch.tensor(want))


def test_a_finetune_starts_from_the_source_ema_with_a_zero_head(tmp_path):
    run_trial(SRC, out=tmp_path / "src")
    source = find_source(str(tmp_path / "src"))
    kept = read_weights(source.weights)
    model = vm.build_model("vit_p_7mf", image_size=64, in_chans=3, num_classes=5)
    load_source(model, kept)
    head = head_keys(model)
    assert head == {"heads.head.weight", "heads.head.bias"}
    assert all(not model.state_dict()[k].any() for k in head)
    body = {k: v for k, v in model.state_dict().items() if k not in head and k != "encoder.pos_embedding"}
    assert all(torch.equal(v, kept["state_dict"][k]) for k, v in body.items())
    pe = model.encoder.pos_embedding
    assert pe.shape == (1, 65, 64)
    assert torch.equal(pe, vm.interpolate_pos_embed(kept["state_dict"]["encoder.pos_embedding"], (8, 8)))
    # grey target from a colour source: the first conv summed over the colours
    grey = vm.build_model("vit_p_7mf", image_size=32, in_chans=1, num_classes=5)
    load_source(grey, kept)
    assert torch.equal(grey.conv_proj.weight, kept["state_dict"]["conv_proj.weight"].sum(1, keepdim=True))


@pytest.mark.slow
def test_finetune_chooses_the_lr_on_held_out_images_and_says_where_it_came_from(tmp_path):
    run_trial(SRC, out=tmp_path / "src")
    proc = run_cli("finetune", "--from", tmp_path / "src", "--dataset", "shapes:5-9", "--n-train", 200,
                   "--n-test", 100, "--image-size", 64, "--steps", 6, "--batch-size", 30, "--lr", "0.01,0.3",
                   "--device", "cpu", "--out", tmp_path / "ft")
    assert proc.returncode == 0, proc.stderr
    runs = pd.read_csv(tmp_path / "ft" / "runs.csv")
    assert sorted(runs["finetune_lr"]) == [0.01, 0.3] and (runs["study"] == "finetune").all()
    (src_key,) = TrialStore(tmp_path / "src").kept_weights()
    assert (runs["source_key"] == src_key).all() and (runs["source_image_size"] == 32).all()
    assert (runs["image_size"] == 64).all() and (runs["holdout"] == 0.1).all() and (runs["wd"] == 0).all()
    best = runs.sort_values(["val_err", "finetune_lr"]).iloc[0]
    assert f"lr {best['finetune_lr']:g} chosen" in proc.stdout and f"{best['last_err']:.2f}%" in proc.stdout
    # the source is in the key: another source, another trial
    cfg = TrainConfig(model="vit_p_7mf", dataset="shapes:5-9", init_from={"key": src_key})
    assert cfg.key() != TrainConfig(model="vit_p_7mf", dataset="shapes:5-9", init_from={"key": "0" * 12}).key()


@pytest.mark.slow
def test_a_killed_finetune_resumes_to_the_uninterrupted_result(tmp_path):
    from vitexp.finetune import finetune_fields

    run_trial(SRC, out=tmp_path / "src")
    source = find_source(str(tmp_path / "src"))
    cfg = TrainConfig(**{**SRC.to_dict(), **finetune_fields(source, "shapes:5-9", 150, 30, 12, 0.3, 0.2, 64)})
    rows = {}
    for name in ("whole", "killed"):
        TrialStore(tmp_path / name, create=False).stage_weights(source.weights, source.key)
    rows["whole"] = run_trial(cfg, out=tmp_path / "whole")

    def die(ev):
        if ev["event"] == "epoch" and ev["epoch"] == 2:
            raise Kill

    with pytest.raises(Kill):
        run_trial(cfg, out=tmp_path / "killed", progress=die)
    rows["killed"] = run_trial(cfg, out=tmp_path / "killed")
    assert cfg.epochs > 2
    for col in ("last_err", "val_err", "train_loss"):
        assert rows["whole"][col] == rows["killed"][col], col


def test_bad_sources_are_one_line_and_write_nothing(tmp_path, cli):
    run_trial(SRC, out=tmp_path / "src")
    key = SRC.key()
    failed = TrialStore(tmp_path / "src")
    failed.record("f" * 12, {"key": "f" * 12, "status": "failed", "error": "OOM", "model": "vit_p_7mf"})
    common = ["--dataset", "shapes:5-9", "--device", "cpu", "--out", tmp_path / "out"]
    cases = [
        (["--from", tmp_path / "nothing"], ["no such folder"]),
        (["--from", f"{tmp_path / 'src'}:{'a' * 12}"], ["is not there"]),
        (["--from", f"{tmp_path / 'src'}:{'f' * 12}"], ["failed (OOM)"]),
        (["--from", f"{tmp_path / 'src'}:{key}", "--model", "resnet_7mf"], ["is a vit_p_7mf trial", "--model"]),
        (["--from", f"{tmp_path / 'src'}:{key}", "--image-size", "60"], ["not divisible", "patch size 8"]),
        (["--from", f"{tmp_path / 'src'}:{key}", "--lr", "0.1,0.3", "--holdout", "0"], ["held-out split"]),
    ]
    for args, needles in cases:
        assert_user_error(cli("finetune", *args, *common), *needles)
        assert not (tmp_path / "out").exists()
    TrialStore(tmp_path / "src").checkpoint_path("c" * 12).write_bytes(b"x")
    assert_user_error(cli("finetune", "--from", f"{tmp_path / 'src'}:{'c' * 12}", *common), "still running")
    unkept = TrainConfig(**{**SRC.to_dict(), "seed": 1, "keep_weights": False})
    run_trial(unkept, out=tmp_path / "src")
    assert_user_error(cli("finetune", "--from", f"{tmp_path / 'src'}:{unkept.key()}", *common), "kept no weights")
    assert_user_error(cli("finetune", "--from", tmp_path / "src", *common), "holds 2 finished trials")
    assert not (tmp_path / "out").exists()


# -- the study -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_toy_transfer_study_runs_end_to_end(tmp_path):
    """Two workers: every fine-tune waits for its source; figures and tables come out."""
    out = tmp_path / "study"
    proc = run_cli("transfer-study", "--models", "resnet_7mf,vit_p_7mf", "--sizes", "100,200", "--steps", "4",
                   "--min-epochs", "1", "--evals", "1", "--target-n-train", "100", "--target-n-test", "100",
                   "--finetune-steps", "3", "--finetune-batch", "30", "--lrs", "0.01,0.1", "--resolutions", "32,64",
                   "--fewshot", "2", "--n-test", "100", "--batch-size", "50", "--device", "cpu", "--out", out,
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 * 2 * (1 + 2 * 2) and (runs["status"] == "ok").all()
    pre, ft = runs[runs["role"] == "pretrain"], runs[runs["role"] == "finetune"]
    assert set(ft["source_key"]) == set(pre["key"]) and pre["fewshot2_err"].notna().all()
    assert (pre["fewshot_data"] == "shapes:5-9").all() and (ft["dataset"] == "shapes:5-9").all()
    for _, f in ft.iterrows():  # every fine-tune started after its source was recorded
        assert f["started_at"] >= pre.set_index("key").loc[f["source_key"], "started_at"]
    table = pd.read_csv(out / "figures" / "transfer.csv")
    assert set(table["metric"]) == {"finetune_32_err", "finetune_64_err", "fewshot2_err"}
    assert (table["n"] == 1).all() and math.isfinite(table["mean"].max())


def test_a_shard_holds_its_finetunes_sources():
    from vitexp.sweep import make_plan, resolve_spec

    spec = resolve_spec("transfer", "transfer_shapes", {"sizes": [400, 800, 1600]}, {})
    shards = [make_plan(spec, "/tmp/never-written", (i, 3)).mine for i in range(3)]
    assert sum(map(len, shards)) == len(make_plan(spec, "/tmp/never-written").trials)
    for mine in shards:
        keys = {k for k, _ in mine}
        assert all(c.init_from["key"] in keys for _, c in mine if c.init_from)
        assert len(mine) > 0


def test_the_claims_differences_are_paired_by_size_and_seed():
    """Each model minus the CNN (and the hybrid) and 64 px minus 32 px, taken per size and seed
    from the fine-tune each seed chose on its held-out images, then averaged: by hand."""
    from vitexp.studies.transfer import paired_tables

    rows = []
    err = {("resnet_7mf", 0): 10.0, ("resnet_7mf", 1): 14.0, ("vit_p_7mf", 0): 25.0, ("vit_p_7mf", 1): 21.0,
           ("hybrid_7mf", 0): 15.0, ("hybrid_7mf", 1): 16.0}
    for (model, seed), e in err.items():
        for res, shift in ((32, 0.0), (64, -2.0 if model == "vit_p_7mf" else 1.0)):
            for lr, val, worse in ((0.1, 30.0, 0.0), (0.3, 20.0, 0.0), (1.0, 20.0, 50.0)):  # 0.3 chosen: ties go low
                rows.append({"status": "ok", "role": "finetune", "model": model, "size": 100, "seed": seed,
                             "image_size": res, "finetune_lr": lr, "val_err": val, "converged": True,
                             "last_err": e + shift + worse + (7.0 if lr == 0.1 else 0.0)})
    blocks = paired_tables(pd.DataFrame(rows))
    titles = [b for kind, b in blocks if kind == "h3"]
    tables = {t: b for t, (kind, b) in zip(titles, blocks[1::2])}
    assert len(titles) == 5 and "minus resnet_7mf" in titles[0] and "minus hybrid_7mf" in titles[2]
    more = [dict(r, size=400, last_err=r["last_err"] - (6.0 if r["model"] == "vit_p_7mf" else 1.0) * (1 + r["seed"]))
            for r in rows]  # a larger pre-training set: ViT_P gains 6 and 12 points, the others 1 and 2
    both = paired_tables(pd.DataFrame(rows + more))
    gain = next(t for (_, title), (_, t) in zip(both[::2], both[1::2]) if "minus at 400" in title).set_index("model")
    assert gain.loc["vit_p_7mf", "at 32 px"] == f"+9.00 ± {pd.Series([6.0, 12.0]).std():.2f}"
    assert gain.loc["resnet_7mf", "at 64 px"] == f"+1.50 ± {pd.Series([1.0, 2.0]).std():.2f}"
    cnn32 = tables[titles[0]].set_index("model")["n=100"]
    assert cnn32["vit_p_7mf"] == f"+11.00 ± {pd.Series([15.0, 7.0]).std():.2f}"  # 25-10, 21-14
    assert cnn32["hybrid_7mf"] == f"+3.50 ± {pd.Series([5.0, 2.0]).std():.2f}"
    hyb64 = tables[titles[3]].set_index("model")["n=100"]
    assert hyb64["vit_p_7mf"] == f"+4.50 ± {pd.Series([7.0, 2.0]).std():.2f}"  # (25-2)-(15+1), (21-2)-(16+1)
    res = tables[titles[4]].set_index("model")["n=100"]
    assert "64 px minus" in titles[4] and res["vit_p_7mf"] == "-2.00 ± 0.00" and res["resnet_7mf"] == "+1.00 ± 0.00"


def test_a_finetune_budget_in_epochs_or_steps():
    from vitexp.config import TrainConfig
    from vitexp.errors import UserError
    from vitexp.finetune import budget_steps

    base = TrainConfig(dataset="fashion-mnist", n_train=1000, batch_size=100)
    assert budget_steps(None, None, base, 0.1) == 500 and budget_steps(40, None, base, 0.1) == 40
    assert budget_steps(None, 3, base, 0.1) == 3 * 9  # 900 images after the held-out tenth: 9 batches
    with pytest.raises(UserError, match="not both"):
        budget_steps(40, 3, base, 0.1)
