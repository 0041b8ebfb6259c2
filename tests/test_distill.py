"""DeiT's distillation: the distillation token, the hard and soft losses, a frozen teacher read
from kept weights, its key in the student's, resume, and the bad teachers."""

import math
import re

import pandas as pd
import pytest
import torch

import vitexp.models as vm
from tests.conftest import REPO, assert_user_error, run_cli
from vitexp.config import TrainConfig
from vitexp.distill import Distiller, Teacher, load_teacher, teacher_columns
from vitexp.replay import replay_agreement
from vitexp.source import find_source
from vitexp.store import TrialStore
from vitexp.trainer import run_trial

TEACHER = TrainConfig(model="resnet_7mf", dataset="shapes", n_train=200, n_test=100, batch_size=50, epochs=2,
                      device="cpu", lr=0.5, wd=0.0, warmup_epochs=0.0, optimizer="sgd")


class Kill(Exception):
    pass


class Fixed(torch.nn.Module):
    """A teacher whose logits are given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_the_losses_are_deits_computed_by_hand():
    cls = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    dist = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    teacher = torch.tensor([[0.1, 3.0, 0.0], [2.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    cfg = TrainConfig(model="vit_p_7mf", label_smoothing=0.0)

    def ce(logits, target):  # -log softmax at the target, averaged
        return -sum(logits[i, t] - torch.logsumexp(logits[i], 0) for i, t in enumerate(target)) / len(target)

    hard = Distiller(Fixed(teacher), cfg)((cls, dist), None, y)
    assert torch.allclose(hard, 0.5 * ce(cls, y) + 0.5 * ce(dist, [1, 0]))
    soft_cfg = TrainConfig(model="vit_p_7mf", label_smoothing=0.0, distillation="soft", distill_tau=2.0,
                           distill_alpha=0.25)
    soft = Distiller(Fixed(teacher), soft_cfg)((cls, dist), None, y)
    p, q = (teacher / 2).softmax(1), (dist / 2).softmax(1)
    kl = (p * (p.log() - q.log())).sum() * 4 / dist.numel()
    assert torch.allclose(soft, 0.75 * ce(cls, y) + 0.25 * kl)


def test_agreement_counts_the_images_whose_label_is_the_teachers_argmax():
    teacher = torch.tensor([[0.1, 3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    d = Distiller(Fixed(teacher), TrainConfig(model="vit_p_7mf"))
    out = (torch.zeros(3, 3), torch.zeros(3, 3))
    d(out, None, torch.tensor([1, 2, 2]))  # argmax 1, 0, 2: two of three agree
    d(out, None, torch.tensor([1, 0, 2]))  # all three
    assert d.agreement() == pytest.approx(100 * 5 / 6)
    assert math.isnan(d.agreement())  # counting started again
    d(out, None, torch.eye(3))  # mixed labels are not counted
    assert math.isnan(d.agreement())


def test_a_student_has_a_distillation_token_and_evaluates_the_heads_averaged():
    torch.manual_seed(0)
    model = vm.build_model("vit_c_7mf", num_classes=4, distilled=True)
    plain = vm.build_model("vit_c_7mf", num_classes=4)
    assert model.seq_length == plain.seq_length + 1 and model.encoder.pos_embedding.shape[1] == model.seq_length
    for head in (model.heads.head, model.head_dist):
        torch.nn.init.normal_(head.weight)
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        tokens = model.encoder(torch.cat([model.class_token.expand(3, -1, -1), model.dist_token.expand(3, -1, -1),
                                          model._process_input(x)], 1))
        cls, dist = model.heads(tokens[:, 0]), model.head_dist(tokens[:, 1])
        assert torch.allclose(model(x).exp(), (cls.softmax(1) + dist.softmax(1)) / 2, atol=1e-6)
    with pytest.raises(Exception, match="cannot be a distilled student"):
        vm.build_model("resnet_7mf", distilled=True)


def test_the_teacher_is_frozen_and_its_key_is_in_the_students(tmp_path):
    run_trial(TEACHER, out=tmp_path / "teacher")
    source = find_source(str(tmp_path / "teacher"))
    student = TrainConfig(**{**TEACHER.to_dict(), "model": "vit_p_7mf", "teacher": source.init_from(),
                             "extra": teacher_columns(source)})
    assert student.key() != TrainConfig(**{**student.to_dict(), "teacher": {**source.init_from(), "key": "0" * 12}}).key()
    TrialStore(tmp_path / "student", create=False).stage_weights(source.weights, source.key)
    before = {k: v.clone() for k, v in torch.load(source.weights, weights_only=True)["state_dict"].items()}
    seen = {}
    import vitexp.trainer as trainer

    real = trainer.train_epoch

    def spy(t, epoch, progress=None):
        loss = real(t, epoch, progress)
        teacher = next(f for f in t.features if isinstance(f, Teacher)).distiller.teacher
        seen["grads"] = [p.grad for p in teacher.parameters()]
        seen["teacher"] = {k: v.clone() for k, v in teacher.state_dict().items()}
        seen["training"] = teacher.training
        return loss

    trainer.train_epoch = spy
    try:
        row = run_trial(student, out=tmp_path / "student")
    finally:
        trainer.train_epoch = real
    assert all(g is None for g in seen["grads"]) and not seen["training"]
    assert all(torch.equal(seen["teacher"][k], before[k]) for k in before)
    assert row["teacher_key"] == source.key and math.isfinite(row["top1_err"])
    history = pd.read_csv(TrialStore(tmp_path / "student").history_path(row["key"]))
    assert history["teacher_agree"].between(0, 100).all() and len(history) == TEACHER.epochs
    assert replay_agreement(tmp_path / "student", row["key"]) == history["teacher_agree"].iloc[-1] == row["teacher_agree"]
    assert not any(p.requires_grad for p in load_teacher(source.weights, torch.device("cpu")).parameters())


def test_a_killed_student_resumes_to_the_uninterrupted_result(tmp_path):
    run_trial(TEACHER, out=tmp_path / "teacher")
    source = find_source(str(tmp_path / "teacher"))
    student = TrainConfig(**{**TEACHER.to_dict(), "model": "vit_p_7mf", "epochs": 3, "teacher": source.init_from()})
    for name in ("whole", "killed"):
        TrialStore(tmp_path / name, create=False).stage_weights(source.weights, source.key)
    whole = run_trial(student, out=tmp_path / "whole")

    def die(ev):
        if ev["event"] == "epoch" and ev["epoch"] == 2:
            raise Kill

    with pytest.raises(Kill):
        run_trial(student, out=tmp_path / "killed", progress=die)
    killed = run_trial(student, out=tmp_path / "killed")
    for col in ("top1_err", "last_err", "train_loss"):
        assert whole[col] == killed[col], col


def test_bad_teachers_are_one_line_and_write_nothing(tmp_path, cli):
    run_trial(TEACHER, out=tmp_path / "teacher")
    common = ["train", "--dataset", "shapes", "--device", "cpu", "--out", tmp_path / "out"]
    cases = [
        (["--model", "resnet_7mf", "--teacher", tmp_path / "teacher"], ["cannot be a distilled student"]),
        (["--model", "vit_p_7mf", "--teacher", tmp_path / "teacher", "--dataset", "shapes:0-4"], ["trained on shapes"]),
        (["--model", "vit_p_7mf", "--teacher", tmp_path / "nothing"], ["--teacher", "no such folder"]),
        (["--model", "vit_p_7mf", "--teacher", f"{tmp_path / 'teacher'}:{'a' * 12}"], ["is not there"]),
        (["--model", "vit_p_7mf", "--teacher", tmp_path / "teacher", "--distillation", "warm"], ["distillation"]),
    ]
    for args, needles in cases:
        assert_user_error(cli(*common, *args), *needles)
        assert not (tmp_path / "out").exists()
    assert TrialStore(tmp_path / "teacher").kept_weights()


@pytest.mark.slow
def test_a_scale_study_with_a_distilled_arm(tmp_path):
    """Each size's student learns from that size's CNN trial, which runs first; the arm is a
    model of its own in the tables."""
    import pandas as pd

    out = tmp_path / "study"
    proc = run_cli("scale-study", "--models", "vit_p_7mf,resnet_7mf", "--teachers", "vit_p_7mf=resnet_7mf",
                   "--sizes", "100,200", "--steps", "4", "--min-epochs", "1", "--evals", "1", "--n-test", "100",
                   "--batch-size", "50", "--device", "cpu", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6
    students = runs[runs["teacher_key"].notna()]
    cnn = runs[runs["model"] == "resnet_7mf"].set_index("key")
    assert len(students) == 2 and set(students["teacher_key"]) == set(cnn.index)
    for _, s in students.iterrows():
        assert cnn.loc[s["teacher_key"], "n_train"] == s["n_train"]  # the teacher saw this size, no more
        assert s["started_at"] >= cnn.loc[s["teacher_key"], "started_at"]
    table = pd.read_csv(out / "figures" / "scale.csv")
    assert "vit_p_7mf taught by resnet_7mf" in set(table["model"]) and "vit_p_7mf" in set(table["model"])
    bad = run_cli("scale-study", "--teachers", "resnet_7mf=vit_p_7mf", "--dry-run", "--out", tmp_path / "x")
    assert_user_error(bad, "cannot be a distilled student")


def test_teachers_are_pairs_a_student_may_have_several():
    from vitexp.errors import UserError
    from vitexp.studies.scale import teacher_pairs

    assert teacher_pairs({"vit_p_7mf": ["resnet_7mf", "vit_c_7mf"], "vit_c_7mf": "resnet_7mf"}) == [
        ("vit_p_7mf", "resnet_7mf"), ("vit_p_7mf", "vit_c_7mf"), ("vit_c_7mf", "resnet_7mf")]
    assert teacher_pairs(["hybrid_7mf=resnet_7mf"]) == [("hybrid_7mf", "resnet_7mf")]
    for bad in (["vit_p_7mf"], {"vit_p_7mf": 3}, "x=y=z"):
        with pytest.raises(UserError, match="STUDENT=TEACHER"):
            teacher_pairs(bad)
    with pytest.raises(UserError, match="unknown model"):
        teacher_pairs({"vit_p_7mf": "resnet_8mf"})


@pytest.mark.slow
def test_a_study_with_one_teacher_for_every_trial(tmp_path):
    """--teacher on a study command: every trial is distilled from that finished trial, whose
    weights the study copies into its own folder; a CNN among the students is refused, nothing written."""
    import pandas as pd

    run_trial(TEACHER, out=tmp_path / "teacher")
    source = find_source(str(tmp_path / "teacher"))
    common = ["optimizer-study", "--teacher", tmp_path / "teacher", "--epochs", "1", "--seeds", "0",
              "--optimizers", "sgd", "--dataset", "shapes", "--n-train", "100", "--n-test", "100",
              "--batch-size", "50", "--device", "cpu", "--no-progress", "--no-plot"]
    assert_user_error(run_cli(*common, "--models", "vit_p_7mf,resnet_7mf", "--out", tmp_path / "bad"),
                      "cannot be a distilled student")
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "study"
    proc = run_cli(*common, "--models", "vit_p_7mf,vit_c_7mf", "--out", out)
    assert proc.returncode == 0, proc.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and (runs["status"] == "ok").all()
    assert set(runs["teacher_key"]) == {source.key} and set(runs["teacher_model"]) == {"resnet_7mf"}
    assert (out / "weights" / f"{source.key}.pt").read_bytes() == source.weights.read_bytes()
    plain = run_cli(*[a for a in common if a not in ("--teacher", tmp_path / "teacher")], "--models",
                    "vit_p_7mf,vit_c_7mf", "--dry-run", "--out", tmp_path / "plain")
    plain_keys = set(re.findall(r"\b[0-9a-f]{12}\b", plain.stdout))
    assert plain.returncode == 0 and len(plain_keys) == 2 and not set(runs["key"]) & plain_keys  # the teacher is keyed


@pytest.mark.slow
def test_a_distilled_arm_reuses_finished_plain_trials_and_retrains_weightless_teachers(tmp_path):
    """`collect --preset` starts a distillation study from a finished plain one: the students'
    plain twins come over as they are, the CNN trials that kept no weights do not (the students
    read them), so the new study trains only those and the students. Run in the plain folder
    itself, the distillation study is refused before it writes anything."""
    import pandas as pd

    from vitexp.tomlfile import dumps, read_toml

    base = read_toml(REPO / "experiments" / "scale_shapes.toml", "preset")
    base["study"].update(models=["vit_p_7mf", "resnet_7mf"], seeds=[0], sizes=[100, 200], steps=4, min_epochs=1,
                         evals=1)
    base["train"].update(n_test=100, batch_size=50)
    (tmp_path / "plain.toml").write_text(dumps(base))
    base["study"]["teachers"] = {"vit_p_7mf": "resnet_7mf"}
    (tmp_path / "distill.toml").write_text(dumps(base))
    common = ["--device", "cpu", "--no-progress", "--no-plot"]
    proc = run_cli("scale-study", "--preset", tmp_path / "plain.toml", "--no-keep-weights", "--out",
                   tmp_path / "plain", *common)
    assert proc.returncode == 0, proc.stderr
    before = {p: p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file()}
    for extra in ([], ["--dry-run"]):  # run in place, its students would find no teacher weights
        refused = run_cli("scale-study", "--preset", tmp_path / "distill.toml", "--out", tmp_path / "plain",
                          *common, *extra)
        assert_user_error(refused, "kept no weights")
    assert {p: p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file()} == before
    proc = run_cli("collect", tmp_path / "plain", "--preset", tmp_path / "distill.toml", "--out", tmp_path / "arm")
    assert proc.returncode == 0, proc.stderr
    plain = pd.read_csv(tmp_path / "plain" / "runs.csv").set_index("key")
    assert set(pd.read_csv(tmp_path / "arm" / "runs.csv")["model"]) == {"vit_p_7mf"}  # the weightless CNNs stay behind
    proc = run_cli("scale-study", "--preset", tmp_path / "distill.toml", "--out", tmp_path / "arm", *common)
    assert proc.returncode == 0, proc.stderr
    arm = pd.read_csv(tmp_path / "arm" / "runs.csv").set_index("key")
    assert len(arm) == 6 and (arm["status"] == "ok").all()
    vit = plain.index[plain["model"] == "vit_p_7mf"]
    assert (arm.loc[vit, "started_at"] == plain.loc[vit, "started_at"]).all()  # reused, not trained again
    cnn = arm.index[arm["model"] == "resnet_7mf"]
    assert all((tmp_path / "arm" / "weights" / f"{k}.pt").exists() for k in cnn)
    assert set(arm["teacher_key"].dropna()) == set(cnn)


def test_the_report_pairs_each_student_with_its_plain_twin():
    """Distilled minus plain is taken per size and seed (the same subset), then averaged."""
    import pandas as pd

    from vitexp.studies.scale import STUDY

    rows = []
    for seed, (plain, taught) in enumerate([(40.0, 30.0), (44.0, 30.0)]):
        base = {"status": "ok", "n_train": 100.0, "seed": seed, "diverged": False, "converged": True}
        rows += [dict(base, model="resnet_7mf", last_err=10.0, teacher_model=None),
                 dict(base, model="vit_p_7mf", last_err=plain, teacher_model=None),
                 dict(base, model="vit_p_7mf", last_err=taught, teacher_model="resnet_7mf",
                      teacher_agree=97.0 + seed)]
    blocks = STUDY.tables(pd.DataFrame(rows))
    at = next(i for i, (kind, b) in enumerate(blocks) if kind == "h3" and b.startswith("Distilled arm minus"))
    table = blocks[at + 1][1].set_index("model")
    assert list(table.index) == ["vit_p_7mf taught by resnet_7mf"]
    assert table.loc["vit_p_7mf taught by resnet_7mf", "n=100"] == f"-12.00 ± {pd.Series([10.0, 14.0]).std():.2f}"
    at = next(i for i, (kind, b) in enumerate(blocks) if kind == "h3" and b.startswith("How often the teacher"))
    assert blocks[at + 1][1].set_index("model").loc["vit_p_7mf taught by resnet_7mf", "n=100"] == 97.5
    plain_only = pd.DataFrame(rows).drop(columns="teacher_agree")
    assert not any(b.startswith("How often") for kind, b in STUDY.tables(plain_only) if kind == "h3")
