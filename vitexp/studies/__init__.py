"""Study kinds: one module each (scale, stability, optimizer, tune, transfer), registered by
name. `trials(spec)` is the one way from a resolved preset to its trial configs.

- base.py       the Study interface and what every kind shares (checks, samplers)
- registry.py   kinds by name (register your own: `register(MyStudy())`)
"""

from __future__ import annotations

import dataclasses

from vitexp.config import TrainConfig
# the built-in kinds register themselves, in the order reports show them
from vitexp.studies import scale  # noqa: F401, I001
from vitexp.studies import stability  # noqa: F401
from vitexp.studies import optimizer  # noqa: F401
from vitexp.studies import tune  # noqa: F401
from vitexp.studies import transfer  # noqa: F401
from vitexp.studies.base import Knob, Study, check_spec, log_uniform, sampling_range
from vitexp.studies.registry import STUDIES, get_study, register

def trials(spec: dict) -> list[TrainConfig]:
    """Every trial of the study, resolved, in a fixed order (shards slice this order)."""
    study = get_study(spec["study"].get("kind"))
    s, base = check_spec(spec, study)
    defined = spec.get("models", {})

    def trial(**kw) -> TrainConfig:
        extra = {**base.extra, "study": study.kind, "preset": s.get("preset", ""), **kw.pop("extra", {})}
        model_def = defined.get(kw.get("model", base.model), {})  # the key covers a defined model's table
        return dataclasses.replace(base, extra=extra, model_def=model_def, **kw).validate().resolved()

    return study.trials(spec, base, trial)


# the names from the objects themselves, so the list cannot drift from what is defined
__all__ = ["STUDIES"] + [f.__name__ for f in (Knob, Study, get_study, log_uniform, register, sampling_range, trials)]
