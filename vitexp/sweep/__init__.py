"""Studies as data (presets -> trial configs) and the one runner that runs them."""

from vitexp.sweep.runner import collect, describe, estimate_cost, parse_shard, resolve_spec, run_study
from vitexp.sweep.studies import log_uniform, sampling_range, trials

__all__ = ["collect", "describe", "estimate_cost", "log_uniform", "parse_shard", "resolve_spec", "run_study",
           "sampling_range", "trials"]
