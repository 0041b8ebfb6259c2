"""The sweep layer: plan a study (preset + overrides -> spec -> trials -> this shard's
pending ones), run it (in process, in worker processes, under torchrun), collect shards.

- presets.py   experiments/*.toml by name
- plan.py      spec, trial list, shard, pending, start order; folder checks; dry-run table and cost
- execute.py   the one `run(plan)`: claims, heartbeats, recording, failures, fusing
- pool.py      worker processes sharing the folder, and the parent watching them
- torchrun.py  rank 0 runs the study, the other ranks train what it announces
- collect.py   merge study folders
- status.py    where a study stands, from its folder alone
"""

from vitexp.sweep.collect import collect
from vitexp.sweep.execute import run
from vitexp.sweep.plan import Plan, describe, estimate_cost, make_plan, parse_shard, resolve_spec

__all__ = ["Plan", "collect", "describe", "estimate_cost", "make_plan", "parse_shard", "resolve_spec", "run",
           "run_study"]


def run_study(spec: dict, out, shard: tuple[int, int] = (0, 1), workers: int | None = 1,
              progress: bool | None = False, fuse: int | None = None):
    """Plan and run a study in one call (a notebook's entry point); returns its runs table.
    WORKERS: 1 (default here) trains in this process, None lets vitexp choose (the CLI's
    default); FUSE: members per fused group (None: vitexp's default for the device)."""
    return run(make_plan(spec, out, shard), workers, progress, fuse)
