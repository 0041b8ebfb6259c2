"""Bad input, through the command line: one line that names the problem and the
fix, exit code 2, no traceback, and nothing written (or nothing changed).

Each case is one `python -m vitexp ...` run; the README's "bad input" table lists
the same cases. Checks that need no subprocess (preset tables, field types) are at
the bottom.
"""

import shutil
import sys
from pathlib import Path

import pytest

from conftest import assert_user_error, run_cli
from vitexp.errors import UserError

FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# enough to keep a study short should a check ever let it through
QUICK = ["--samples", "1", "--epochs", "1", "--n-train", "64", "--n-test", "64", "--batch-size", "32",
         "--device", "cpu", "--no-plot", "--no-progress", "--models", "vit_p_25mf"]
TRAIN = ["train", "--epochs", "1", "--n-train", "64", "--n-test", "64", "--batch-size", "32", "--device", "cpu"]

PRESET = """[study]
kind = "stability"
models = ["vit_p_25mf"]
samples = 1
epochs = 1
[train]
dataset = "shapes"
n_train = 64
n_test = 64
batch_size = 32
device = "cpu"
[ranges.vit_p_25mf.adamw]
lr = {lr}
wd = {wd}
"""


def _preset(tmp: Path, lr="[1e-3, 1e-2]", wd="[0.01, 0.1]") -> Path:
    p = tmp / "my_preset.toml"
    p.write_text(PRESET.format(lr=lr, wd=wd))
    return p


def _study_folder(tmp: Path, kind: str, **extra) -> Path:
    """A folder holding (the study.toml of) another study."""
    f = tmp / "other"
    f.mkdir()
    lines = [f'[study]\nkind = "{kind}"'] + [f'{k} = "{v}"' for k, v in extra.items()] + ['[train]\ndataset = "shapes"']
    (f / "study.toml").write_text("\n".join(lines) + "\n")
    return f


def _runs_csv(tmp: Path, text: str) -> Path:
    f = tmp / "results"
    f.mkdir()
    (f / "runs.csv").write_text(text)
    return f


def _corrupt_fashion(tmp: Path) -> Path:
    d = tmp / "data" / "fashion-mnist"
    d.mkdir(parents=True)
    for name in FASHION_FILES:
        (d / name).write_bytes(b"\x1f\x8b garbage, not a gzip stream")
    return tmp / "data"


def _read_only_dir(tmp: Path) -> Path:
    """A folder this process cannot create anything in (root ignores permission bits:
    then a read-only file system, if there is one)."""
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    probe = ro / "probe"
    try:
        probe.mkdir()
    except OSError:
        return ro
    probe.rmdir()
    for cand in (Path("/sys/fs"), Path("/proc/sys")):
        try:
            (cand / "vitexp-probe").mkdir()
        except OSError:
            return cand
        (cand / "vitexp-probe").rmdir()
    pytest.skip("no folder here is unwritable to this user")


def _subset_case():
    """A subset larger than the data set: fashion-mnist where it is installed, else
    shapes (generated, so its limit is the generator's)."""
    if FASHION_MNIST_SYSTEM.is_dir():
        return ([*TRAIN, "--dataset", "fashion-mnist", "--n-train", "70000", "--out", "{out}"],
                ["--n-train 70000 is larger than fashion-mnist's train set (60000"])
    return [*TRAIN, "--n-train", "2000000", "--out", "{out}"], ["at most 1000000", "--n-train 2000000"]


# (id, setup(tmp) -> dict of placeholders, argv with {placeholders}, needles, what must stay as it was)
# "out": the --out folder must not exist afterwards; "trials": no trial recorded in it;
# "same": the prepared folder {dir} is byte for byte unchanged
CASES = [  # one subprocess each: the issue's list, in its order
    ("unknown-model", None, ["stability", *QUICK, "--models", "vit_zz", "--out", "{out}"],
     ["unknown model 'vit_zz'", "closest"], "out"),
    ("unknown-dataset", None, ["stability", *QUICK, "--dataset", "cifar11", "--out", "{out}"],
     ["unknown dataset 'cifar11'", "cifar10"], "out"),
    ("unknown-optimizer", None, ["stability", *QUICK, "--optimizer", "adam", "--out", "{out}"],
     ["unknown optimizer 'adam'", "adamw"], "out"),
    ("unknown-preset", None, ["stability", "--preset", "stability_shapez", "--out", "{out}"],
     ["unknown preset 'stability_shapez'", "stability_shapes"], "out"),
    ("lr-zero", None, [*TRAIN, "--lr", "0", "--out", "{out}"], ["--lr must be positive", "got 0"], "out"),
    ("wd-negative", None, [*TRAIN, "--wd", "-0.05", "--out", "{out}"], ["--wd must be in [0, 10]"], "out"),
    ("epochs-zero", None, ["stability", *QUICK, "--epochs", "0", "--out", "{out}"],
     ["--epochs must be in [1,", "got 0"], "out"),
    ("batch-size-zero", None, [*TRAIN, "--batch-size", "0", "--out", "{out}"],
     ["--batch-size must be in [1, 1048576]"], "out"),
    ("range-empty", lambda t: {"preset": _preset(t, lr="[3e-3, 3e-3]")},
     ["stability", "--preset", "{preset}", "--out", "{out}"],
     ["[ranges.vit_p_25mf.adamw] lr range [0.003, 0.003] is empty", "0 < LOW < HIGH"], "out"),
    ("range-inverted", lambda t: {"preset": _preset(t, wd="[0.5, 0.05]")},
     ["stability", "--preset", "{preset}", "--out", "{out}"],
     ["[ranges.vit_p_25mf.adamw] wd range [0.5, 0.05] is inverted", "0 < LOW < HIGH"], "out"),
    ("subset-too-large", None, *_subset_case(), "trials"),
    ("image-size-vs-patch", None, ["stability", *QUICK, "--image-size", "30", "--out", "{out}"],
     ["--image-size 30 is not divisible by vit_p_25mf's patch size 4", "multiple of 4"], "out"),
    ("data-folder-missing", None, [*TRAIN, "--dataset", "imagefolder:{tmp}/no-such-data", "--out", "{out}"],
     ["no train or val/ folder", "no-such-data"], "trials"),
    ("data-files-corrupt", lambda t: {"data": _corrupt_fashion(t)},
     [*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "{data}", "--out", "{out}"],
     ["is corrupt", "fetch it again"], "trials"),
    ("out-holds-another-study", lambda t: {"dir": _study_folder(t, "stability", optimizer="adamw")},
     ["scale-study", "--out", "{dir}"], ["holds a stability study", "another --out"], "same"),
    ("csv-missing-columns", lambda t: {"dir": _runs_csv(t, "key,model\nk1,vit_p_25mf\n")},
     ["plot-cdf", "{dir}"], ["lacks column(s)", "last_err"], "same"),
    ("csv-unparsable-value", lambda t: {"dir": _runs_csv(
        t, "key,study,status,model,optimizer,lr,wd,top1_err,last_err\n"
           "k1,stability,ok,vit_p_25mf,adamw,1e-3,0.1,n/a%,n/a%\n")},
     ["plot-cdf", "{dir}"], ["column top1_err has unparsable value 'n/a%'"], "same"),
    ("plot-empty-folder", lambda t: {"dir": (t / "empty").mkdir() or t / "empty"},
     ["plot-cdf", "{dir}"], ["no runs.csv in", "run a study"], "same"),
    ("shard-out-of-range", None, ["stability", *QUICK, "--shard", "3/2", "--out", "{out}"],
     ["--shard 3/2", "0 <= I < N"], "out"),
    ("out-unwritable", lambda t: {"ro": _read_only_dir(t)}, ["stability", *QUICK, "--out", "{ro}/study"],
     ["cannot write to output folder", "pick a writable --out"], None),
]

MORE_CASES = [  # variants, through the same main() in this process (no 5 s interpreter start)
    ("lr-negative", None, [*TRAIN, "--lr", "-0.1", "--out", "{out}"], ["--lr must be positive"], "out"),
    ("epochs-negative-in-list", None, ["optimizer-study", "--models", "vit_p_25mf", "--epochs", "2,-1",
                                       "--out", "{out}"], ["--epochs must be positive"], "out"),
    ("samples-zero", None, ["stability", *QUICK, "--samples", "0", "--out", "{out}"],
     ["--samples must be in [1,"], "out"),
    ("lr-range-inverted", lambda t: {"preset": _preset(t, lr="[1e-2, 1e-3]")},
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["lr range [0.01, 0.001] is inverted"], "out"),
    ("range-missing-ends", lambda t: {"preset": _preset(t, lr="[]")},
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["lr must be [LOW, HIGH] with two numbers"], "out"),
    ("preset-not-toml", lambda t: {"preset": (t / "p.toml").write_text("[study\n") and t / "p.toml"},
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["is not valid TOML"], "out"),
    ("preset-unknown-key", lambda t: {"preset": (t / "p.toml").write_text(
        '[study]\nkind = "stability"\nmodels = ["vit_p_25mf"]\nsamplez = 3\n') and t / "p.toml"},
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["unknown [study] key of a stability study 'samplez'", "samples"], "out"),
    ("preset-wrong-type", lambda t: {"preset": (t / "p.toml").write_text(
        '[study]\nkind = "stability"\nmodels = ["vit_p_25mf"]\n[train]\nepochs = "3"\n') and t / "p.toml"},
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["epochs must be int, got '3'"], "out"),
    ("preset-of-another-kind", None, ["scale-study", "--preset", "stability_shapes", "--out", "{out}"],
     ["is a stability study, not a scale study"], "out"),
    ("seeds-empty", None, ["stability", *QUICK, "--seeds", ",", "--out", "{out}"], ["--seeds is empty"], "out"),
    ("sizes-empty", None, ["scale-study", "--sizes", ",", "--out", "{out}"], ["no sizes", "--sizes"], "out"),
    ("sizes-negative", None, ["scale-study", "--sizes", "100,-5", "--out", "{out}"],
     ["--sizes must be positive"], "out"),
    ("unknown-model-train", None, [*TRAIN, "--model", "vit_zz", "--out", "{out}"], ["unknown model"], "out"),
    ("unknown-dataset-train", None, [*TRAIN, "--dataset", "mnist", "--out", "{out}"], ["unknown dataset"], "out"),
    ("unknown-device", None, [*TRAIN, "--device", "tpu", "--out", "{out}"], ["unknown device 'tpu'"], None),
    ("out-holds-another-optimizer", lambda t: {"dir": _study_folder(t, "stability", optimizer="adamw")},
     ["stability", *QUICK, "--optimizer", "sgd", "--out", "{dir}"],
     ["optimizer adamw, not sgd", "another --out"], "same"),
    ("out-holds-another-dataset", lambda t: {"dir": _study_folder(t, "stability", optimizer="adamw")},
     ["stability", *QUICK, "--dataset", "fashion-mnist", "--out", "{dir}"],
     ["dataset shapes, not fashion-mnist"], "same"),
    ("out-is-a-file", lambda t: {"file": (t / "file").write_text("x") and t / "file"},
     ["stability", *QUICK, "--out", "{file}"], ["is a file, not a folder"], None),
    ("train-out-is-a-file", lambda t: {"file": (t / "file").write_text("x") and t / "file"},
     [*TRAIN, "--out", "{file}"], ["is a file, not a folder", "give a folder"], None),
    ("shard-malformed", None, ["stability", *QUICK, "--shard", "half", "--out", "{out}"],
     ["--shard takes I/N"], "out"),
    ("plot-no-such-folder", None, ["plot-scale", "{tmp}/nowhere"], ["no runs.csv in"], None),
    ("collect-not-a-study", lambda t: {"dir": (t / "empty").mkdir() or t / "empty"},
     ["collect", "{dir}", "--out", "{out}"], ["is not a study folder"], "out"),
]


GOOD_PRESET = PRESET.format(lr="[1e-4, 1e-2]", wd="[0.01, 0.1]")


def _write(name: str, text: str | bytes):
    """A setup that writes TEXT to tmp/NAME and names it {preset}."""
    def setup(t: Path) -> dict:
        p = t / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        return {"preset": p}
    return setup


def _committed_study(t: Path) -> dict:
    """A copy of a committed stability study as {dir}: finished, without training one."""
    from conftest import REPO

    return {"dir": Path(shutil.copytree(REPO / "results" / "stability_shapes_adamw", t / "done"))}


def _finished_study(t: Path) -> dict:
    """A finished CPU study (one tiny trial) as {dir}."""
    from vitexp.cli import main

    f = t / "done"
    argv, sys.argv = sys.argv, ["vitexp", "stability", *QUICK, "--out", str(f)]
    try:
        main()
    finally:
        sys.argv = argv
    assert (f / "runs.csv").is_file()
    return {"dir": f}


GOOD = '[study]\nkind = "stability"\nmodels = ["vit_p_25mf"]\nsamples = 1\nepochs = 1\n'
TRAIN_TABLE = '[train]\nn_train = 64\nn_test = 64\nbatch_size = 32\ndevice = "cpu"\n'
NEW_CASES = [  # nonsense that once passed or crashed: each one line, exit 2, nothing written
    ("grad-clip-negative", None, [*TRAIN, "--grad-clip", "-1", "--out", "{out}"], ["--grad-clip must be positive"], "out"),
    ("lr-inf", None, [*TRAIN, "--lr", "inf", "--out", "{out}"], ["--lr must be positive", "got inf"], "out"),
    ("lr-nan", None, [*TRAIN, "--lr", "nan", "--out", "{out}"], ["--lr must be positive", "got nan"], "out"),
    ("wd-inf", None, [*TRAIN, "--wd", "inf", "--out", "{out}"], ["--wd must be in [0, 10]", "got inf"], "out"),
    ("momentum-nan", None, [*TRAIN, "--momentum", "nan", "--out", "{out}"], ["--momentum must be in [0, 1)"], "out"),
    ("momentum-one", None, [*TRAIN, "--momentum", "1", "--out", "{out}"], ["--momentum must be in [0, 1)"], "out"),
    ("min-lr-frac-negative", None, [*TRAIN, "--min-lr-frac", "-1", "--out", "{out}"],
     ["--min-lr-frac must be in [0, 1]"], "out"),
    ("batch-size-huge", None, [*TRAIN, "--batch-size", "1000000000", "--out", "{out}"], ["--batch-size must be in"], "out"),
    ("batch-larger-than-data", None, [*TRAIN, "--batch-size", "100", "--out", "{out}"],
     ["--batch-size 100 is larger than the training set (64 images)"], "out"),
    ("n-train-below-classes", None, [*TRAIN, "--n-train", "5", "--batch-size", "4", "--out", "{out}"],
     ["--n-train 5 is fewer images than shapes's 10 classes"], "out"),
    ("n-test-zero", None, [*TRAIN, "--n-test", "0", "--out", "{out}"], ["--n-test must be positive"], "out"),
    ("warmup-nan", None, [*TRAIN, "--warmup-epochs", "nan", "--out", "{out}"], ["--warmup-epochs must be"], "out"),
    ("dropout-two", None, [*TRAIN, "--dropout", "2", "--out", "{out}"], ["--dropout must be in [0, 1)"], "out"),
    ("crop-pad-negative", None, [*TRAIN, "--crop-pad", "-1", "--out", "{out}"], ["--crop-pad must be in"], "out"),
    ("crop-pad-beyond-image", None, [*TRAIN, "--crop-pad", "100", "--out", "{out}"],
     ["--crop-pad 100 is larger than the image"], "out"),
    ("seed-negative", None, [*TRAIN, "--seed", "-1", "--out", "{out}"], ["--seed must be in [0, 2**63)"], "out"),
    ("seed-huge", None, [*TRAIN, "--seed", str(2**63), "--out", "{out}"], ["--seed must be in [0, 2**63)"], "out"),
    ("subset-seed-negative", None, [*TRAIN, "--subset-seed", "-3", "--out", "{out}"], ["--subset-seed must be"], "out"),
    ("image-size-huge", None, [*TRAIN, "--image-size", "100000", "--out", "{out}"], ["--image-size must be in"], "out"),
    ("image-size-tiny-cnn", None, [*TRAIN, "--model", "resnet_7mf", "--image-size", "4", "--out", "{out}"],
     ["--image-size 4 is too small"], "out"),
    ("label-smoothing-one", None, [*TRAIN, "--label-smoothing", "1", "--out", "{out}"],
     ["--label-smoothing must be in [0, 1)"], "out"),
    ("ema-decay-one", None, [*TRAIN, "--ema-decay", "1", "--out", "{out}"], ["--ema-decay must be in (0, 1)"], "out"),
    ("mixup-negative", None, [*TRAIN, "--mixup", "-1", "--out", "{out}"], ["--mixup must be in"], "out"),
    ("cutmix-nan", None, [*TRAIN, "--cutmix", "nan", "--out", "{out}"], ["--cutmix must be in"], "out"),
    ("eval-every-zero", None, [*TRAIN, "--eval-every", "0", "--out", "{out}"], ["--eval-every must be"], "out"),
    ("lr-batch-size-zero", None, [*TRAIN, "--lr-batch-size", "0", "--out", "{out}"], ["--lr-batch-size must be"], "out"),
    ("num-workers-negative", None, [*TRAIN, "--num-workers", "-1", "--out", "{out}"], ["--num-workers must be"], "out"),
    ("fewshot-zero", None, [*TRAIN, "--fewshot", "0", "--out", "{out}"], ["--fewshot shots must be positive"], "out"),
    ("fewshot-not-a-number", None, [*TRAIN, "--fewshot", "1,x", "--out", "{out}"],
     ["--fewshot takes comma-separated int"], "out"),
    ("fewshot-more-than-the-subset", None, [*TRAIN, "--fewshot", "10", "--out", "{out}"],
     ["--fewshot 10 needs 10 training images per class", "give 6"], "out"),
    ("out-empty", None, [*TRAIN, "--out", ""], ["--out must name a folder"], None),
    ("data-dir-is-a-file", lambda t: {"file": (t / "file").write_text("x") and t / "file"},
     [*TRAIN, "--data-dir", "{file}", "--out", "{out}"], ["--data-dir", "is a file, not a folder"], "out"),
    ("seeds-negative", None, ["stability", *QUICK, "--seeds", "-1", "--out", "{out}"], ["--seed must be in"], "out"),
    ("seeds-fractional", _write("p.toml", GOOD + "seeds = [1.5]\n" + TRAIN_TABLE),
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["--seeds takes whole numbers", "1.5"], "out"),
    ("range-to-inf", _write("p.toml", GOOD + TRAIN_TABLE + "[ranges.vit_p.adamw]\nlr = [1e-3, inf]\nwd = [0.01, 0.1]\n"),
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["lr range [0.001, inf] is not finite"], "out"),
    ("tuned-inf", _write("p.toml", GOOD + TRAIN_TABLE + "[tuned.vit_p_25mf]\nadamw = [inf, 0.1]\n"),
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["lr must be finite"], "out"),
    ("preset-misspelled-table", _write("p.toml", GOOD + TRAIN_TABLE.replace("[train]", "[trian]")),
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["unknown table [trian]", "closest: train"], "out"),
    ("preset-study-not-a-table", _write("p.toml", 'study = 3\n'),
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["[study] must be a table"], "out"),
    ("preset-not-utf8", _write("p.toml", b'[study]\nkind = "stability"\ndescription = "\xff\xfe"\n'),
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["is not UTF-8"], "out"),
    ("preset-is-a-folder", lambda t: {"preset": (t / "pdir").mkdir() or t / "pdir"},
     ["stability", "--preset", "{preset}", "--out", "{out}"], ["is a folder"], "out"),
    ("samples-huge-dry-run", None, ["stability", *QUICK, "--samples", "1000000000000", "--dry-run", "--out", "{out}"],
     ["--samples must be in [1,"], "out"),
    ("sizes-zero", None, ["scale-study", "--sizes", "0,100", "--out", "{out}"], ["--sizes must be positive"], "out"),
    ("steps-negative", None, ["scale-study", "--steps", "-1", "--out", "{out}"], ["--steps must be in [0,"], "out"),
    ("steps-exponent-large", None, ["scale-study", "--steps-exponent", "5", "--out", "{out}"],
     ["--steps-exponent takes a number in [0, 2]"], "out"),
    ("evals-zero", None, ["scale-study", "--evals", "0", "--out", "{out}"], ["--evals must be in [1,"], "out"),
    ("optimizers-unknown", None, ["optimizer-study", "--optimizers", "adam", "--out", "{out}"],
     ["unknown optimizer 'adam'"], "out"),
    ("tune-samples-zero", None, ["tune", "--preset", "tune_fashion-mnist_cpu", "--samples", "0", "--out", "{out}"],
     ["--samples must be in [1,"], "out"),
    ("workers-zero", None, ["stability", *QUICK, "--workers", "0", "--out", "{out}"],
     ["--workers must be in [1, 256]", "got 0"], "out"),
    ("models-empty", None, ["stability", *QUICK, "--models", ",", "--out", "{out}"], ["no models"], "out"),
    ("n-boot-zero", lambda t: _committed_study(t), ["plot-cdf", "{dir}", "--n-boot", "0", "--out", "{out}"],
     ["--n-boot must be at least 1"], "same"),
    ("device-cuda-on-a-cpu", None, ["stability", *QUICK, "--device", "cuda", "--out", "{out}"],
     ["no CUDA GPU", "--device cpu"], "out"),
    ("fuse-zero-dry-run", None, ["stability", *QUICK, "--fuse", "0", "--dry-run", "--out", "{out}"],
     ["--fuse must be in [1, 64]"], "out"),
    ("ranges-unknown-key", _write("p.toml", GOOD_PRESET + 'momentum = 0.5\n'),
     ["stability", "--preset", "{preset}", "--device", "cpu", "--out", "{out}"],
     ["unknown key in [ranges.vit_p_25mf.adamw] 'momentum'"], "out"),
    ("ranges-unknown-optimizer", _write("p.toml", GOOD_PRESET.replace("[ranges.vit_p_25mf.adamw]\n",
                                                                       "[ranges.vit_p_25mf]\nmomentum = 0.5\n"
                                                                       "[ranges.vit_p_25mf.adamw]\n")),
     ["stability", "--preset", "{preset}", "--device", "cpu", "--out", "{out}"],
     ["unknown optimizer in [ranges.vit_p_25mf] 'momentum'"], "out"),
    ("preset-name-a-number", _write("p.toml", GOOD_PRESET.replace('kind = "stability"', 'kind = "stability"\npreset = 5')),
     ["stability", "--preset", "{preset}", "--device", "cpu"], ["[study] preset must be a plain name"], "out"),
    ("preset-name-a-path", _write("p.toml", GOOD_PRESET.replace('kind = "stability"',
                                                           'kind = "stability"\npreset = "../../x"')),
     ["stability", "--preset", "{preset}", "--device", "cpu"], ["[study] preset must be a plain name"], "out"),
    ("out-name-too-long", None, ["stability", *QUICK, "--out", "{tmp}/" + "x" * 300], ["at most 255"], "out"),
    ("out-not-utf8", None, ["stability", *QUICK, "--out", "{tmp}/bad\udcff"], ["not UTF-8"], "out"),
    ("out-path-too-long", None, ["stability", *QUICK, "--out", "{tmp}/" + "/".join(["y" * 200] * 25)],
     ["a study folder's path must stay under"], "out"),
    ("seeds-too-many", None, ["stability", *QUICK, "--seeds", ",".join(map(str, range(2000))), "--dry-run",
                              "--out", "{out}"], ["--seeds has 2,000 values, at most 1,000"], "out"),
    ("bench-csv-a-folder", lambda t: {"dir": (t / "d").mkdir() or t / "d"},
     ["bench", "--model", "vit_p_7mf", "--device", "cpu", "--csv", "{dir}"], ["is a folder"], "same"),
    ("bench-fuse-huge", None, ["bench", "--fuse", "100000", "--device", "cpu", "--csv", "{out}/b.csv"],
     ["--fuse in [1, 64]"], "out"),
    ("shard-of-zero", None, ["stability", *QUICK, "--shard", "1/0", "--out", "{out}"],
     ["--shard 1/0: N is the number of shards and must be at least 1, e.g. 0/4"], "out"),
    ("launch-cluster-bogus", None, ["launch", "--shards", "2", "--cluster", "bogus", "--", "stability", *QUICK,
                                    "--out", "{out}"], ["--cluster must be one of slurm, local, debug"], "out"),
    ("launch-fuse-zero", None, ["launch", "--shards", "2", "--cluster", "local", "--", "stability", *QUICK,
                                "--fuse", "0", "--out", "{out}"], ["--fuse must be in [1, 64]"], "out"),
    ("launch-slurm-without-sbatch", None, ["launch", "--shards", "2", "--cluster", "slurm", "--", "stability",
                                           *QUICK, "--out", "{out}"], ["needs SLURM's sbatch"], "out"),
]


@pytest.mark.parametrize("setup,argv,needles,unchanged", [pytest.param(*c[1:], id=c[0]) for c in NEW_CASES])
def test_nonsense_is_refused(tmp_path, cli, setup, argv, needles, unchanged):
    if "cuda" in argv and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    _check(tmp_path, cli, setup, argv, needles, unchanged)


@pytest.mark.slow
def test_a_slurm_array_variable_that_is_no_number(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "abc")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert_user_error(run_cli("stability", *QUICK, "--out", tmp_path / "out"), "SLURM_ARRAY_TASK_ID", "integers")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_finished_study_rerun_for_another_device_changes_nothing(tmp_path, monkeypatch, capsys):
    """Nothing to run: no device check, and not a byte of the folder changes."""
    from vitexp.cli import main

    folder = _finished_study(tmp_path)["dir"]
    before = _snapshot(folder)
    monkeypatch.setattr(sys, "argv", ["vitexp", "stability", *QUICK, "--device", "cuda", "--out", str(folder)])
    main()
    assert _snapshot(folder) == before


@pytest.mark.slow
def test_an_error_inside_a_worker_is_one_line_and_the_folder_is_left_as_it_was(tmp_path):
    """Bad input only a trial finds (an image folder whose train/ and val/ classes differ),
    inside a worker process: the parent prints its one line, exit 2, and the folder this
    run created is gone."""
    from PIL import Image

    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for cls in classes:
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "img" / split / cls / "0.png")
    p = run_cli("stability", *QUICK, "--dataset", f"imagefolder:{tmp_path / 'img'}", "--n-train", "2",
                "--batch-size", "2", "--trials-per-gpu", "2", "--samples", "2", "--out", tmp_path / "out")
    assert_user_error(p, "train/ and val/ have different class folders")
    assert not (tmp_path / "out").exists()


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _check(tmp_path, run, setup, argv, needles, unchanged):
    places = {"tmp": tmp_path, "out": tmp_path / "out", **(setup(tmp_path) if setup else {})}
    before = _snapshot(places["dir"]) if "dir" in places else None
    p = run(*[a.format(**places) for a in argv])
    assert_user_error(p, *needles)
    if unchanged == "out":
        assert not places["out"].exists(), sorted(places["out"].rglob("*"))
    elif unchanged == "trials":
        assert not list(places["out"].glob("trials/*.json")) and not (places["out"] / "runs.csv").exists()
    elif unchanged == "same":
        assert _snapshot(places["dir"]) == before


@pytest.mark.slow
@pytest.mark.parametrize("setup,argv,needles,unchanged", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(tmp_path, setup, argv, needles, unchanged):
    _check(tmp_path, lambda *a: run_cli(*a, timeout=300), setup, argv, needles, unchanged)


@pytest.mark.parametrize("setup,argv,needles,unchanged", [pytest.param(*c[1:], id=c[0]) for c in MORE_CASES])
def test_more_bad_input(tmp_path, cli, setup, argv, needles, unchanged):
    _check(tmp_path, cli, setup, argv, needles, unchanged)


# -- without a subprocess -------------------------------------------------------------

def test_preset_tables_are_checked():
    from vitexp.studies import trials
    from vitexp.sweep import resolve_spec

    def spec(**tables):
        s = resolve_spec("stability", None, {"models": ["vit_p_25mf"], "samples": 2}, {})
        s.update(tables)
        return s

    with pytest.raises(UserError, match=r"unknown \[ranges\] model or family 'vit_p_25fm'"):
        trials(spec(ranges={"vit_p_25fm": {"adamw": {"lr": [1e-3, 1e-2], "wd": [0.01, 0.1]}}}))
    with pytest.raises(UserError, match="unknown optimizer in"):
        trials(spec(ranges={"vit_p": {"adam": {"lr": [1e-3, 1e-2], "wd": [0.01, 0.1]}}}))
    with pytest.raises(UserError, match="not positive"):
        trials(spec(ranges={"vit_p": {"adamw": {"lr": [0, 1e-2], "wd": [0.01, 0.1]}}}))
    with pytest.raises(UserError, match=r"must be \[LR, WD\]"):
        trials(spec(tuned={"vit_p_25mf": {"adamw": 1e-3}}))
    with pytest.raises(UserError, match="lr must be finite and > 0"):
        trials(spec(tuned={"vit_p_25mf": {"adamw": [-1e-3, 0.1]}}))
    s = spec()
    s["study"]["samples"] = "many"
    with pytest.raises(UserError, match="--samples takes an integer"):
        trials(s)
    s = spec()
    s["study"]["models"] = "vit_p_25mf"
    with pytest.raises(UserError, match="must be a list"):
        trials(s)
    # a study's checks use each trial's own model: a CNN-only study takes any image size
    s = resolve_spec("stability", None, {"models": ["regnety_25mf"], "samples": 1}, {"image_size": 30})
    assert trials(s)[0].image_size == 30


@pytest.mark.parametrize("field,value,needle", [
    ("epochs", "3", "epochs must be int"), ("lr", True, "lr must be float or None"),
    ("n_train", 2.5, "n_train must be int or None"), ("fewshot", [1, "5"], "fewshot must be a list of int"),
    ("model", "vit_zz", "unknown model"), ("dataset", "mnist", "unknown dataset"),
])
def test_config_fields_are_checked(field, value, needle):
    from vitexp.config import TrainConfig

    with pytest.raises(UserError, match=needle):
        TrainConfig(**{field: value}).validate()


@pytest.mark.slow
def test_usage_errors_are_short_too():
    # click's own errors (unknown option, bad type) exit 2 without a traceback
    p = run_cli("stability", "--samples", "many")
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout and "Invalid value" in p.stderr


def _readme_examples():
    from conftest import REPO

    section = (REPO / "README.md").read_text().split("## Bad input")[1].split("## Reliability")[0]
    rows = [ln.split("|")[1:3] for ln in section.splitlines() if ln.startswith("| `vitexp ")]
    return [(cmd.strip().strip("`"), msg.strip().strip("`")) for cmd, msg in rows]


@pytest.mark.parametrize("command,message", _readme_examples(), ids=lambda v: v if v.startswith("vitexp") else "")
def test_the_readmes_examples(tmp_path, monkeypatch, capsys, command, message):
    """Each example of the README's bad-input table, run as written (in a fresh folder):
    exactly its line, '...' standing for the rest."""
    import re
    import shlex

    from vitexp.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", shlex.split(command))
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.fullmatch(".*".join(map(re.escape, message.split("..."))), err), (err, message)
    assert not list(tmp_path.iterdir())  # nothing written
