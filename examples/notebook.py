"""vitexp from Python, as a notebook uses it: a model and its cost, one trial, a small study,
its tables. Run: python examples/notebook.py [OUT] (a minute on a CPU; OUT defaults to a
temporary folder)."""

import sys
import tempfile
from pathlib import Path

from vitexp import analysis, models
from vitexp.config import TrainConfig
from vitexp.studies.scale import cnn_gaps, scale_summary
from vitexp.sweep import resolve_spec, run_study
from vitexp.trainer import run_trial

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())

# a model of the zoo and what it costs (MACs x 1e-9 at its native 32 px, params in millions)
net = models.build_model("vit_c_7mf", num_classes=10)
cost = models.complexity("vit_c_7mf", num_classes=10)
print(f"vit_c_7mf: {cost['params_m']:.3f}M params, {cost['gmacs'] * 1e3:.1f} MMACs a 32 px image")

# one trial: a TrainConfig is checked when made; run_trial returns its runs.csv row
cfg = TrainConfig(model="vit_c_7mf", dataset="shapes", n_train=256, n_test=200, batch_size=64, epochs=2,
                  device="cpu")
row = run_trial(cfg, out=out / "trial")
print(f"one trial: final test error {row['last_err']:.1f}%, converged: {row['converged']}")

# a study: a preset plus overrides (study knobs, then TrainConfig fields) -> spec -> run
spec = resolve_spec("scale", "scale_shapes", {"sizes": [128, 256], "steps": 8, "seeds": [0],
                                              "models": ["vit_c_7mf", "resnet_7mf"]},
                    {"n_test": 200, "batch_size": 64, "device": "cpu"})
run_study(spec, out / "study")

# its tables, as the figures and reports read them (error = the final model's, `analysis.ERR`)
runs = analysis.load_runs([out / "study"])
summary = scale_summary(runs)
print(summary.loc[summary["metric"] == analysis.ERR, ["model", "n_train", "mean", "n"]].to_string(index=False))
print(cnn_gaps(summary).to_string(index=False))
