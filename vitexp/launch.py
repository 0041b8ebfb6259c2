"""`vitexp launch`: a study's shards as a SLURM job array through submitit.

The study command after `--` is parsed once, here, into its plan; every array task then
runs `sweep.run` on its shard of that plan in the one shared `--out` folder, where the
per-trial claims keep the tasks from ever running a trial twice. Tasks are submitit
checkpointables: on preemption or timeout submitit requeues them, and a requeued task
resumes its shard (a trial whose process was killed is taken over once its claim's
heartbeat is stale, its last epoch checkpoint kept). submitit is an optional dependency
(`pip install 'vitexp[slurm]'`); `cluster="local"` runs the tasks as local processes,
which is how the tests check the whole path.
"""

from __future__ import annotations

import dataclasses
import shutil

from vitexp.errors import UserError
from vitexp.store import TrialStore
from vitexp.sweep.plan import Plan


CLUSTERS = (None, "slurm", "local", "debug")  # submitit's executors (None: slurm where sbatch exists)


class ShardTask:
    """One array task: run a shard of the plan. Its `checkpoint` (what submitit calls on
    preemption or timeout) resubmits it as it is: the rerun resumes the shard."""

    def __call__(self, plan: Plan, shard: int, shards: int, workers: int | None, fuse: int | None = None):
        from vitexp.sweep import run

        run(dataclasses.replace(plan, shard=(shard, shards)), workers, progress=False, fuse=fuse)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def submit(plan: Plan, shards: int, cluster: str | None = None, wait: bool = False, workers: int | None = None,
           fuse: int | None = None, **params) -> list[str]:
    """Submit SHARDS tasks of PLAN; returns the job ids."""
    from vitexp.sweep.execute import check_options

    if shards < 1:
        raise UserError(f"--shards must be positive, got {shards}")
    if cluster not in CLUSTERS:
        raise UserError(f"--cluster must be one of {', '.join(c for c in CLUSTERS if c)}, got {cluster!r}")
    check_options(workers, fuse)  # every task would fail on them: refuse before submitting
    try:
        import submitit
    except ModuleNotFoundError:
        raise UserError("vitexp launch needs submitit; `pip install 'vitexp[slurm]'` (or submitit)") from None
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--cluster slurm needs SLURM's sbatch, and there is none here; run on the cluster's "
                        "login node, or use --cluster local")
    try:
        executor = submitit.AutoExecutor(folder=TrialStore(plan.out, create=False).slurm_dir / "%j", cluster=cluster)
    except RuntimeError as e:
        raise UserError(f"submitit cannot use this cluster ({str(e).splitlines()[0]}); run on the cluster's "
                        f"login node, or use --cluster local") from None
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    task = ShardTask()
    with executor.batch():
        jobs = [executor.submit(task, plan, i, shards, workers, fuse) for i in range(shards)]
    if wait:
        for job in jobs:
            job.result()  # re-raises a task's failure here
    return [job.job_id for job in jobs]
