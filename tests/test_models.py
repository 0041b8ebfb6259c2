"""The model zoo: [EC]'s table reproduced, the stem rule, the small family's
matched costs, position-embedding resizing, features, and `vitexp models`."""

import io
import math

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import assert_user_error, run_cli
from vitexp.config import tuned_hparams
from vitexp import models as vm
from vitexp.cli import app
from vitexp.errors import UserError
from vitexp.models.registry import SMALL_LEVELS, level_models

# [EC] section 2 (PAPERS.md): params (M), GF, acts (M) at each model's own resolution
PAPER = {
    "vit_p_1gf": (4.8, 1.1, 5.5), "vit_p_4gf": (18.5, 3.9, 11.1),
    "vit_p_18gf": (86.6, 17.5, 24.0), "vit_p_36gf": (178.4, 35.9, 37.3),
    "vit_c_1gf": (4.6, 1.1, 5.7), "vit_c_4gf": (17.8, 4.0, 11.3),
    "vit_c_18gf": (81.6, 17.7, 24.1), "vit_c_36gf": (167.8, 35.0, 36.7),
    "regnety_1gf": (9.6, 1.0, 6.2), "regnety_4gf": (22.4, 4.1, 14.5),
    "regnety_16gf": (72.3, 15.5, 30.7), "regnety_32gf": (128.6, 31.1, 46.2),
}
# run for real in the forward/backward test (the builders' every code path); the
# bigger ones run on the meta device, which checks shapes and the autograd graph for free
REAL = {name for level in SMALL_LEVELS for name in level_models(level)} | {"vit_p_1gf", "vit_c_1gf", "regnety_1gf"}

def matches_paper(ours: float, paper: float) -> bool:
    """Within 2%, or equal at the paper's one-decimal rounding (1.076 GF is the paper's "1.1")."""
    return abs(ours / paper - 1) <= 0.02 or round(ours, 1) == paper


@pytest.fixture(scope="module")
def paper_table():
    return vm.complexity_table(names=list(PAPER)).set_index("model")


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_table(paper_table, name):
    row = paper_table.loc[name]
    params, gf, acts = PAPER[name]
    assert row.resolution == vm.get_spec(name).resolution
    assert matches_paper(row.params_m, params), (row.params_m, params)
    assert matches_paper(row.gmacs, gf), (row.gmacs, gf)
    assert abs(row.acts_m / acts - 1) <= 0.02, (row.acts_m, acts)


def test_registry():
    names = vm.list_models()
    assert set(PAPER) | {"resnet50", "resnet101"} <= set(names)
    for name in names:
        spec = vm.get_spec(name)
        assert spec.name == name and spec.family in vm.FAMILIES
        assert vm.is_vit(name) == name.startswith(("vit_", "hybrid_"))
        for opt in ("adamw", "sgd"):
            lr, wd = tuned_hparams(name, opt)
            assert lr > 0 and wd > 0
    assert tuned_hparams("vit_c_4gf", "sgd") == (1.3, 2.2e-5)
    assert tuned_hparams("vit_p_36gf", "adamw") == tuned_hparams("vit_p_18gf", "adamw")
    assert tuned_hparams("resnet50", "sgd") == tuned_hparams("regnety_4gf", "sgd")
    with pytest.raises(UserError, match="closest: vit_c_50mf"):
        vm.get_spec("vit_c_50fm")
    with pytest.raises(UserError, match="adamw"):
        tuned_hparams("vit_c_50mf", "adam")


@pytest.mark.parametrize("name", vm.list_models())
def test_forward_backward(name):
    """Every model trains at 32 px (the paper ViTs with their 16 px patches: a 2x2 grid)."""
    device = "cpu" if name in REAL else "meta"
    with torch.device(device):
        model = vm.build_model(name, image_size=32, in_chans=1, num_classes=5, dropout=0.1)
        x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert vm.is_vit(model) == name.startswith(("vit_", "hybrid_"))


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_vit_c_stem_rule(patch):
    """log2(p) stride-2 3x3 convs whose channels double up to the width, then a 1x1 to the width."""
    with torch.device("meta"):
        model = vm.build_model("vit_c_4gf", image_size=64, patch_size=patch)
    convs = [m for m in model.conv_proj.modules() if isinstance(m, nn.Conv2d)]
    n = int(math.log2(patch))
    assert [c.stride[0] for c in convs] == [2] * n + [1]
    assert [c.kernel_size[0] for c in convs] == [3] * n + [1]
    assert [c.out_channels for c in convs] == [384 >> (n - 1 - i) for i in range(n)] + [384]
    grid = model.conv_proj(torch.empty(1, 3, 64, 64, device="meta")).shape
    assert grid == (1, 384, 64 // patch, 64 // patch)
    assert model.seq_length == (64 // patch) ** 2 + 1


def test_explicit_stems():
    with torch.device("meta"):
        full = vm.build_model("vit_c_18gf")
        small = vm.build_model("vit_c_36gf", image_size=32, patch_size=4)
    convs = [m for m in full.conv_proj.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [
        (64, 2), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (768, 1)]
    convs = [m for m in small.conv_proj.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in convs] == [(256, 2), (256, 1), (512, 2), (1024, 1)]
    for bad in (6, 32):
        with pytest.raises(UserError, match="patch size"):
            vm.build_model("vit_c_18gf", image_size=96, patch_size=bad)


def test_small_family_matched():
    """The models of a level cost the same (within 12%) and what their name says; every
    level has a ViT_P, its ViT_C twin, a hybrid and a ResNet, all but the CPU level a RegNetY too."""
    for level in SMALL_LEVELS:
        mf = float(level.removesuffix("mf"))
        names = level_models(level)
        families = {vm.get_spec(n).family for n in names}
        assert {"vit_p", "vit_c", "hybrid", "resnet"} <= families and ("regnety" in families) == (level != "7mf"), names
        costs = {n: vm.complexity(n, 32, num_classes=10)["gmacs"] * 1e3 for n in names}
        assert max(costs.values()) / min(costs.values()) <= 1.12, costs
        assert all(abs(c / mf - 1) <= 0.10 for c in costs.values()), costs
        assert vm.get_spec(f"vit_c_{level}").kwargs["depth"] == vm.get_spec(f"vit_p_{level}").kwargs["depth"] - 1
    # 28 px Fashion-MNIST: a 7x7 grid of 4 px patches
    model = vm.build_model("vit_c_25mf", image_size=28, in_chans=1, num_classes=10)
    assert model.seq_length == 7 * 7 + 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_paper_geometry_twins_at_cpu_cost():
    """[EC]'s 16x16 stride-16 patchify stem and its four-conv stem at 64 px: 16 tokens like the
    7mf twins at 32 px, the same cost as they (within 12%), ViT_C one block shallower."""
    costs = {n: vm.complexity(n, None, in_chans=1, num_classes=10)["gmacs"]
             for n in ("vit_p_7mf_p16", "vit_c_7mf_p16", "vit_p_7mf", "vit_c_7mf")}
    assert max(costs.values()) / min(costs.values()) <= 1.12, costs
    p, c = (vm.build_model(f"vit_{f}_7mf_p16", in_chans=1, num_classes=10) for f in "pc")
    assert vm.get_spec("vit_p_7mf_p16").resolution == 64 and p.seq_length == c.seq_length == 4 * 4 + 1
    assert (p.conv_proj.kernel_size, p.conv_proj.stride) == ((16, 16), (16, 16))
    convs = [m for m in c.conv_proj.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size[0], m.stride[0]) for m in convs] == [
        (8, 3, 2), (16, 3, 2), (32, 3, 2), (64, 3, 2), (64, 1, 1)]
    assert len(c.encoder.layers) == len(p.encoder.layers) - 1
    assert c(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_head_layout_twins_cost_the_same():
    """The 7mf twins with 2 and 4 heads change only how the width splits into heads: the same
    cost and parameters as the one-head twins (within 12%), the same depth, width and tokens."""
    names = [f"vit_{f}_7mf{h}" for f in "pc" for h in ("", "_h2", "_h4")]
    cost = {n: vm.complexity(n, None, in_chans=1, num_classes=10) for n in names}
    for f in "pc":
        base = cost[f"vit_{f}_7mf"]
        for h, heads in (("_h2", 2), ("_h4", 4)):
            name = f"vit_{f}_7mf{h}"
            assert 1 / 1.12 <= cost[name]["gmacs"] / base["gmacs"] <= 1.12, cost
            assert cost[name]["params_m"] == base["params_m"], cost
            model = vm.build_model(name, in_chans=1, num_classes=10)
            assert {layer.self_attention.num_heads for layer in model.encoder.layers} == {heads}
            assert model.hidden_dim == 64 and model.seq_length == 4 * 4 + 1
            assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert vm.get_spec("vit_c_7mf_h4").kwargs["depth"] == vm.get_spec("vit_p_7mf_h4").kwargs["depth"] - 1


def test_wider_twins_scale_like_the_paper():
    """The 25mf_p8 twins grow the 7mf ones as [EC] grows 1GF to 4GF: twice the width and heads,
    the same 8x8 patches, tokens and depth, so about four times the parameters; they cost
    the same as each other (within 12%) and about 25 MF."""
    cost = {n: vm.complexity(n, 32, in_chans=1, num_classes=10) for n in
            ("vit_p_25mf_p8", "vit_c_25mf_p8", "vit_p_7mf", "vit_c_7mf")}
    assert cost["vit_p_25mf_p8"]["gmacs"] / cost["vit_c_25mf_p8"]["gmacs"] <= 1.12
    assert all(abs(cost[f"vit_{f}_25mf_p8"]["gmacs"] * 1e3 / 25 - 1) <= 0.10 for f in "pc"), cost
    assert 3.5 <= cost["vit_p_25mf_p8"]["params_m"] / cost["vit_p_7mf"]["params_m"] <= 4.5, cost
    for f in "pc":
        wide, base = vm.get_spec(f"vit_{f}_25mf_p8").kwargs, vm.get_spec(f"vit_{f}_7mf").kwargs
        assert (wide["width"], wide["heads"]) == (2 * base["width"], 2 * base["heads"])
        assert (wide["patch"], wide["depth"]) == (base["patch"], base["depth"])
    p, c = (vm.build_model(f"vit_{f}_25mf_p8", in_chans=1, num_classes=10) for f in "pc")
    assert p.seq_length == c.seq_length == 4 * 4 + 1 and len(c.encoder.layers) == len(p.encoder.layers) - 1
    assert c(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_small_resnet():
    """The CIFAR ResNet: full resolution in the first stage, halved per stage, basic blocks."""
    model = vm.build_model("resnet_7mf", in_chans=1, num_classes=10)
    x = torch.randn(2, 1, 32, 32)
    sizes = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:]))) for b in model.blocks]
    assert model(x).shape == (2, 10)
    for h in hooks:
        h.remove()
    assert sizes == [(8, 32, 32)] * 2 + [(16, 16, 16)] * 2 + [(32, 8, 8)] * 2


def test_small_input_cnn_stems():
    with torch.device("meta"):
        small, big = vm.build_model("resnet50", image_size=32), vm.build_model("resnet50")
        rsmall, rbig = vm.build_model("regnety_1gf", image_size=64), vm.build_model("regnety_1gf")
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert big.conv1.stride == (2, 2) and isinstance(big.maxpool, nn.MaxPool2d)
    assert rsmall.stem[0].stride == (1, 1) and rbig.stem[0].stride == (2, 2)


def test_resize_pos_embed():
    torch.manual_seed(0)
    name = "vit_p_25mf"
    model = vm.build_model(name, num_classes=3)
    old = model.encoder.pos_embedding.detach().clone()
    vm.resize_pos_embed(model, 48)
    new = model.encoder.pos_embedding
    assert new.shape == (1, 12 * 12 + 1, old.shape[2]) and new.requires_grad
    assert torch.equal(new[:, 0], old[:, 0])  # class token untouched
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)
    with pytest.raises(UserError, match="divisible"):
        vm.resize_pos_embed(model, 30)


@pytest.mark.parametrize("name,dim", [("vit_c_25mf", 64), ("regnety_25mf", 504), ("resnet_25mf", 64),
                                      ("resnet50", 2048)])
def test_features(name, dim):
    model = vm.build_model(name, image_size=16, num_classes=7).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        f = vm.features(model, x)
        assert f.shape == (3, dim)
        head = model.heads if vm.is_vit(model) else model.fc
        assert torch.allclose(head(f), model(x), atol=1e-5)
    assert not head._forward_pre_hooks  # the hook is gone


def test_complexity_of_a_model_object_leaves_it_untouched():
    model = vm.build_model("regnety_25mf", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert vm.complexity(model, 32) == pytest.approx(vm.complexity("regnety_25mf", 32, num_classes=10))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_models_csv():
    result = CliRunner().invoke(app, ["models", "--csv"])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(io.StringIO(result.stdout))
    assert {"model", "family", "resolution", "params_m", "gmacs", "acts_m"} <= set(df.columns)
    assert list(df.model) == vm.list_models()
    assert df.set_index("model").loc["regnety_4gf", "resolution"] == 240


@pytest.mark.slow
def test_cli_models_errors():
    assert_user_error(run_cli("models", "vit_c_50fm"), "unknown model", "vit_c_50mf")
    assert_user_error(run_cli("models", "vit_p_1gf", "--resolution", "30"), "divisible", "16")
