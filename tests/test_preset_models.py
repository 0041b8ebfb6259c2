"""Models a preset defines ([models.NAME]: vitexp's builders or timm) and `timm:NAME`: they
train, resume after a kill, count their FLOPs, get keys of their own, and work (or are refused
in one line) wherever a built-in model works: few-shot features, precise BN, fused trials,
torch.compile, the figures' colours, `vitexp models`, `collect --preset`."""

import dataclasses
import math

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import assert_user_error, run_cli
from vitexp.config import TrainConfig
from vitexp.errors import UserError
from vitexp.fused import run_group
from vitexp.models import build_model, complexity, features
from vitexp.models import registry
from vitexp.models.registry import define
from vitexp.models.vit import RegisterViT
from vitexp.optim import param_groups
from vitexp.store import TrialStore
from vitexp.trainer import run_trial

timm = pytest.importorskip("timm")

REG_VIT = {"family": "vit_p", "width": 32, "depth": 2, "heads": 2, "mlp": 64, "patch": 8, "registers": 4}
CONVIT = {"timm": "convit_tiny", "init": "torchvision", "img_size": 32, "patch_size": 8, "embed_dim": 8,
          "num_heads": 4, "depth": 2, "local_up_to_layer": 1, "mlp_ratio": 2.0}
DEFINED = {"my_reg_vit": REG_VIT, "my_convit": CONVIT}
TINY = dict(dataset="shapes", n_train=256, n_test=100, batch_size=64, epochs=3, device="cpu", lr=0.05, wd=0.05,
            warmup_epochs=0.0)


class Kill(Exception):
    pass


def _cfg(name: str, **kw) -> TrainConfig:
    return TrainConfig(model=name, model_def=DEFINED[name], **{**TINY, **kw})


@pytest.mark.parametrize("name", list(DEFINED))
def test_a_defined_model_trains_resumes_after_a_kill_and_counts_its_flops(tmp_path, name):
    cfg = _cfg(name)
    whole = run_trial(cfg, out=tmp_path / "whole")
    assert whole["model"] == name and whole["model_def"] == DEFINED[name]

    def die_after_epoch_2(ev):
        if ev["event"] == "epoch" and ev["epoch"] == 2:
            raise Kill

    with pytest.raises(Kill):
        run_trial(cfg, out=tmp_path / "killed", progress=die_after_epoch_2)
    assert TrialStore(tmp_path / "killed").checkpoint_path(cfg.key()).exists()
    resumed = run_trial(cfg, out=tmp_path / "killed")
    for k in ("top1_err", "last_err", "train_loss", "best_epoch"):
        assert resumed[k] == whole[k], k
    cost = complexity(cfg.model_spec(), 32, num_classes=10)
    assert cost["gmacs"] > 0 and cost["params_m"] == pytest.approx(
        sum(p.numel() for p in build_model(cfg.model_spec(), 32, num_classes=10).parameters()) / 1e6)


def test_registers_cost_their_tokens_and_the_key_covers_every_keyword():
    base = _cfg("my_reg_vit")
    without = dataclasses.replace(base, model_def={**REG_VIT, "registers": 0})
    # the registers are 4 more tokens beside 16 patches and the class token: every linear layer
    # of the blocks sees 21 tokens instead of 17
    ratio = complexity(base.model_spec(), 32, num_classes=10)["gmacs"] / complexity(
        without.model_spec(), 32, num_classes=10)["gmacs"]
    assert 1.0 < ratio < 21 / 17 + 0.05
    keys = {base.key(), without.key(), dataclasses.replace(base, model_def={**REG_VIT, "depth": 3}).key(),
            _cfg("my_convit").key(), dataclasses.replace(_cfg("my_convit"), model_def={**CONVIT, "init": "timm"}).key()}
    assert len(keys) == 5
    assert _cfg("my_reg_vit").key() == base.key()  # the same definition, the same key
    # a built-in model's key does not see the new field (the committed-keys test checks every one)
    assert "model_def" not in TrainConfig(model="vit_p_7mf").result_fields()


def test_register_tokens_have_no_position_feed_no_head_and_carry_no_weight_decay():
    torch.manual_seed(0)
    model = build_model(define("my_reg_vit", REG_VIT), 32, in_chans=3, num_classes=10)
    assert isinstance(model, RegisterViT) and model.registers.shape == (1, 4, 32)
    assert model.encoder.pos_embedding.shape[1] == 17  # class token and 16 patches: no register has a position
    x = torch.randn(3, 3, 32, 32)
    before = features(model, x)  # the class token after the final norm (the head starts at zero)
    assert before.shape == (3, 32)
    with torch.no_grad():
        model.registers.add_(1.0)
    assert not torch.allclose(before, features(model, x))  # the blocks attend to them
    no_decay = {id(p) for p in param_groups(model, 0.05)[1]["params"]}
    assert id(model.registers) in no_decay
    assert torch.unique(model.registers).numel() > 1  # not one token repeated


def test_torchvision_init_of_a_timm_model_keeps_convit_locality():
    spec = define("my_convit", CONVIT)
    torch.manual_seed(0)
    model = build_model(spec, 32, in_chans=3, num_classes=10)
    assert torch.count_nonzero(model.get_classifier().weight) == 0  # a zero head, as torchvision's ViT
    fc = model.blocks[1].mlp.fc1  # xavier-uniform: the bound sqrt(6 / (fan_in + fan_out))
    assert fc.weight.abs().max() <= math.sqrt(6 / sum(fc.weight.shape)) + 1e-6
    assert fc.weight.std() > 0.02 * 2  # far above timm's std 0.02 at this width
    timm_init = build_model(define("timm_init", {**CONVIT, "init": "timm"}), 32, in_chans=3, num_classes=10)
    # the GPSA's locality init (its positional projection and identity values) is timm's own, unchanged
    assert torch.equal(model.blocks[0].attn.pos_proj.weight, timm_init.blocks[0].attn.pos_proj.weight)
    assert torch.equal(model.blocks[0].attn.v.weight, torch.eye(8 * 4))


def test_fewshot_features_of_a_timm_model_are_its_pre_logits():
    model = build_model(define("my_convit", CONVIT), 32, in_chans=3, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    want = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(features(model, x), want)


def test_a_timm_cnn_with_batchnorm_trains_with_precise_bn_and_fewshot(tmp_path):
    cfg = TrainConfig(model="timm:resnet10t", fewshot=[2], precise_bn=128, **{**TINY, "epochs": 1})
    row = run_trial(cfg, out=tmp_path)
    assert row["status"] == "ok" and 0 <= row["fewshot2_err"] <= 100 and row["model_def"] == {}
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model(cfg.model_spec(), 32, num_classes=10).modules())


def test_fused_members_of_a_timm_model_equal_their_trials(tmp_path):
    """vmap over functional_call runs a timm ConViT (GPSA included) as it runs unfused."""
    cfgs = [_cfg("my_convit", lr=lr, seed=s, subset_seed=s, epochs=2) for lr, s in ((0.05, 0), (0.1, 1))]
    for c in cfgs:
        run_trial(c, out=tmp_path / "one")
    run_group(cfgs, TrialStore(tmp_path / "fused"))
    TrialStore(tmp_path / "fused").rebuild()
    one, fused = (pd.read_csv(tmp_path / d / "history.csv", dtype={"key": str}) for d in ("one", "fused"))
    for c in cfgs:
        a, b = (h[h.key == c.key()].reset_index() for h in (one, fused))
        assert ((a.train_loss - b.train_loss).abs() / a.train_loss).max() < 1e-4
        assert (a.ema_err - b.ema_err).abs().max() <= 1.0 + 1e-9  # one test image of 100


@pytest.mark.slow
def test_a_compiled_timm_model_learns_what_the_eager_one_does(tmp_path):
    eager = run_trial(_cfg("my_convit", compile=False), out=tmp_path / "eager")
    compiled = run_trial(_cfg("my_convit", compile=True), out=tmp_path / "compiled")
    assert compiled["compiled_graphs"] >= 1
    assert abs(compiled["train_loss"] - eager["train_loss"]) / eager["train_loss"] < 1e-3
    assert abs(compiled["top1_err"] - eager["top1_err"]) <= 2.0  # two test images of 100


PRESET = '''[study]
kind = "scale"
models = ["vit_p_7mf", "my_convit"]
sizes = [100]
steps = 4
evals = 1
[train]
optimizer = "sgd"
n_test = 50
batch_size = 50
device = "cpu"
[models]
my_convit = {convit}
[tuned.my_convit]
sgd = [0.5, 1e-5]
'''


def _preset(tmp_path, convit: str = "{ timm = \"convit_tiny\", family = \"vit_c\", img_size = 32, "
                                     "patch_size = 8, embed_dim = 8, num_heads = 4, depth = 2 }", extra: str = ""):
    p = tmp_path / "p.toml"
    p.write_text(PRESET.format(convit=convit) + extra)
    return p


def test_models_lists_a_presets_models_counted_like_the_built_in_ones(tmp_path):
    proc = run_cli("models", "--preset", _preset(tmp_path), "my_convit,vit_p_7mf", "--classes", "10", "--csv")
    assert proc.returncode == 0, proc.stderr
    from io import StringIO

    df = pd.read_csv(StringIO(proc.stdout)).set_index("model")
    assert df.loc["my_convit", "family"] == "vit_c"
    spec = define("my_convit", {"timm": "convit_tiny", "family": "vit_c", "img_size": 32, "patch_size": 8,
                                "embed_dim": 8, "num_heads": 4, "depth": 2})
    assert df.loc["my_convit", "gmacs"] == pytest.approx(complexity(spec, 32, num_classes=10)["gmacs"])


def test_reading_a_preset_defines_nothing_in_the_process(tmp_path):
    """A preset's models are known where its tables are passed (a trial's model_def, a study's
    spec), never by a name registered as a side effect of reading it."""
    from vitexp.sweep.presets import read_preset

    _, tables = read_preset(str(_preset(tmp_path)))
    with pytest.raises(UserError, match="unknown model 'my_convit'"):
        registry.get_spec("my_convit")
    assert registry.get_spec("my_convit", tables["models"]).family == "vit_c"
    assert "my_convit" not in registry.list_models()


@pytest.mark.slow
def test_a_scale_study_with_a_preset_model_runs_and_colours_it_by_its_family(tmp_path):
    from vitexp import analysis, plots

    out = tmp_path / "study"
    proc = run_cli("scale-study", "--preset", _preset(tmp_path), "--out", out, "--no-progress", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    runs = analysis.load_runs([out])
    assert set(runs.model) == {"vit_p_7mf", "my_convit"} and (runs.status == "ok").all()
    assert plots.family("my_convit") == "other"  # unknown outside a drawing of its runs
    with plots.drawing(runs):
        assert plots.family("my_convit") == "vit_c"  # from its runs' model_def


@pytest.mark.slow
def test_collect_with_a_preset_takes_only_that_studys_trials(tmp_path):
    first = tmp_path / "first"
    assert run_cli("scale-study", "--preset", _preset(tmp_path), "--sizes", "100,200", "--out", first,
                   "--no-progress", "--no-plot").returncode == 0
    proc = run_cli("collect", first, "--out", tmp_path / "second", "--preset", _preset(tmp_path))
    assert proc.returncode == 0, proc.stderr
    taken = TrialStore(tmp_path / "second").finished()
    assert {r["n_train"] for r in taken.values()} == {100} and len(taken) == 2
    assert TrialStore(tmp_path / "second").read_spec()["study"]["sizes"] == [100]


BAD = [  # (id, [models] table of my_convit or extra preset text, needles)
    ("unknown-timm-name", '{ timm = "convit_tinyy" }', ["unknown timm model 'convit_tinyy'", "convit_tiny"]),
    ("keyword-timm-rejects", '{ timm = "convit_tiny", img_size = 32, patch_size = 8, colour = 3 }',
     ["timm cannot build convit_tiny", "colour", "[models.my_convit]"]),
    ("output-not-logits", '{ timm = "convit_tiny", img_size = 32, patch_size = 8, embed_dim = 8, depth = 1, '
                          'global_pool = "" }', ["outputs (2, 16, 10)", "not (2, 10)"]),
    ("too-big-for-the-data", '{ timm = "inception_v3" }',  # needs 75 px and more, takes no img_size
     ["my_convit cannot take 3-channel 32 px images"]),
    ("builder-lacks-keys", '{ family = "vit_p", width = 64 }', ["lacks depth, heads, mlp, patch"]),
    ("builder-unknown-keyword", '{ family = "resnet", layers = [1, 1], colour = 2 }',
     ["unknown keyword of vitexp's resnet builder in [models.my_convit] 'colour'"]),
    ("family-unknown", '{ family = "vit_x", width = 64 }', ["needs family = one of vit_p, vit_c, hybrid, regnety, resnet"]),
    ("redefines-a-built-in", None, ["redefines the built-in model 'vit_p_7mf'"]),
    ("init-unknown", '{ timm = "convit_tiny", img_size = 32, patch_size = 8, init = "jax" }',
     ["unknown init in [models.my_convit] 'jax'", "torchvision"]),
    ("negative-width", '{ family = "vit_p", width = -64, depth = 2, heads = 1, mlp = 64, patch = 8 }',
     ["width must be a positive whole number, got -64"]),
    ("heads-do-not-divide", '{ family = "vit_p", width = 64, depth = 2, heads = 5, mlp = 64, patch = 8 }',
     ["width 64 does not split into 5 heads"]),
    ("width-a-word", '{ family = "vit_c", width = "wide", depth = 2, heads = 1, mlp = 64, patch = 8 }',
     ["width must be a positive whole number, got 'wide'"]),
    ("stage-widths-mismatch", '{ family = "resnet", layers = [1, 1], widths = [8, 16, 32] }',
     ["3 widths for 2 stages"]),
]


@pytest.mark.parametrize("table,needles", [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_a_bad_model_definition_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, table, needles):
    from vitexp.cli import main

    if table is None:
        preset = _preset(tmp_path, extra="[models.vit_p_7mf]\nfamily = \"vit_p\"\n")
    else:
        preset = _preset(tmp_path, convit=table)
    monkeypatch.setattr("sys.argv", ["vitexp", "scale-study", "--preset", str(preset), "--out",
                                     str(tmp_path / "out"), "--no-progress"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    for n in needles:
        assert n.lower() in err[0].lower(), (n, err[0])
    assert not (tmp_path / "out").exists()


def test_a_study_refuses_to_guess_a_preset_models_lr(tmp_path):
    preset = _preset(tmp_path)
    preset.write_text(preset.read_text().replace("[tuned.my_convit]\nsgd = [0.5, 1e-5]\n", ""))
    assert_user_error(run_cli("scale-study", "--preset", preset, "--out", tmp_path / "out"),
                      "my_convit has no tuned (lr, wd) for sgd", "[tuned.my_convit]", "vitexp tune")
    assert not (tmp_path / "out").exists()


def test_without_timm_a_timm_model_names_the_install_command(tmp_path):
    code = ("import sys; sys.modules['timm'] = None\n"
            "from vitexp.cli import main\nsys.argv = ['vitexp', 'train', '--model', 'timm:resnet18', "
            f"'--out', r'{tmp_path / 'out'}']\nmain()")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert_user_error(proc, "needs timm", "pip install 'vitexp[timm]'")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_takes_a_presets_model_and_tuned_values(tmp_path):
    proc = run_cli("train", "--preset", _preset(tmp_path), "--model", "my_convit", "--optimizer", "sgd",
                   "--dataset", "shapes", "--n-train", "64", "--n-test", "32", "--batch-size", "32", "--epochs", "1",
                   "--device", "cpu", "--out", tmp_path / "t")
    assert proc.returncode == 0, proc.stderr
    (row,) = TrialStore(tmp_path / "t").finished().values()
    assert row["lr"] == 0.5 and row["wd"] == 1e-5 and row["model_def"]["timm"] == "convit_tiny"


def test_unknown_preset_model_name_in_train_is_one_line():
    with pytest.raises(UserError, match="unknown model 'my_convitt'"):
        TrainConfig(model="my_convitt").validate()


@pytest.mark.parametrize("preset", ["scale_shapes_priors", "scale_fashion-mnist_cpu_priors"])
def test_the_soft_prior_models_cost_what_their_level_costs(preset):
    """The studies compare models of one cost level: each defined model within 12% of the
    level's ViT_P in forward GF, as the built-in 7 MF models are."""
    from vitexp.sweep.presets import read_preset

    _, tables = read_preset(preset)
    level = complexity("vit_p_7mf", 32, num_classes=10)["gmacs"]
    assert tables["models"]
    for name, table in tables["models"].items():
        assert abs(complexity(define(name, table), 32, num_classes=10)["gmacs"] / level - 1) <= 0.12, name


def test_a_timm_vit_at_its_defaults_is_built_at_the_datas_size(tmp_path):
    """`timm:NAME` of a ViT (made for 224 px) trains on 32 px images: timm sizes its position
    embeddings to the data; a timm CNN, which takes no img_size, is built as it is."""
    from vitexp.models import build_model, registry

    vit = build_model(registry.get_spec("timm:vit_tiny_patch16_224"), image_size=32, in_chans=3, num_classes=10)
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 10) and vit.patch_embed.img_size == (32, 32)
    cnn = build_model(registry.get_spec("timm:resnet18"), image_size=32, in_chans=3, num_classes=10)
    assert cnn(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_bench_measures_a_presets_own_model(tmp_path):
    """`vitexp bench --preset P --model NAME` builds NAME from P's table and trains it at P's
    [tuned] values (nothing registered by reading P)."""
    preset = _preset(tmp_path, extra="")
    preset.write_text(preset.read_text().replace("sgd = [0.5, 1e-5]", "sgd = [0.5, 1e-5]\nadamw = [0.001, 0.05]"))
    p = run_cli("bench", "--preset", preset, "--model", "my_convit", "--batch-size", "8", "--steps", "1",
                "--warmup", "0", "--device", "cpu", "--csv", tmp_path / "b.csv")
    assert p.returncode == 0, p.stderr
    row = pd.read_csv(tmp_path / "b.csv").iloc[-1]
    assert row["model"] == "my_convit" and row["images_per_s"] > 0
