"""The study kinds by name. Built-in kinds register themselves when `vitexp.studies`
is imported; a notebook or a test registers its own the same way."""

from __future__ import annotations

from vitexp.errors import unknown
from vitexp.studies.base import Study

STUDIES: dict[str, Study] = {}


def register(study: Study) -> Study:
    STUDIES[study.kind] = study
    return study


def get_study(kind: str) -> Study:
    if kind not in STUDIES:
        raise unknown("study kind", str(kind), STUDIES)
    return STUDIES[kind]
