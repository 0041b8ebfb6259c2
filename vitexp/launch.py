"""`vitexp launch`: a study's shards as a SLURM job array through submitit.

Every task runs the same study command with `--shard I/N` into one shared
`--out` folder; the runner's per-trial claims keep the tasks from ever running a
trial twice, and a task that dies leaves its trial to a rerun. submitit is an
optional dependency (`pip install vitexp[slurm]`); `cluster="local"` runs the
tasks as local processes, which is how the tests check the whole path.
"""

from __future__ import annotations

from pathlib import Path

from vitexp.errors import UserError

STUDY_COMMANDS = ("scale-study", "stability", "optimizer-study", "tune")


def _run_shard(argv: list[str], shard: int, shards: int) -> None:
    """Body of one array task: the study command with its shard."""
    from vitexp.cli import app

    app([*argv, "--shard", f"{shard}/{shards}", "--no-progress"], standalone_mode=False)


def _out_folder(argv: list[str]) -> Path:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--out="):
            return Path(a.split("=", 1)[1])
    raise UserError("vitexp launch needs the study's --out: every task writes into that one shared folder")


def submit(argv: list[str], shards: int, cluster: str | None = None, wait: bool = False,
           **params) -> list[str]:
    """Submit `shards` tasks of the study command `argv`; returns the job ids."""
    if not argv or argv[0] not in STUDY_COMMANDS:
        raise UserError(f"vitexp launch runs a study: give one of {', '.join(STUDY_COMMANDS)} and its options "
                        f"after --, e.g. `vitexp launch --shards 8 -- stability --out /shared/st`")
    if shards < 1:
        raise UserError(f"--shards must be positive, got {shards}")
    if any(a == "--shard" or a.startswith("--shard=") for a in argv):
        raise UserError("vitexp launch sets --shard itself; drop it from the study command")
    out = _out_folder(argv)
    try:
        import submitit
    except ModuleNotFoundError:
        raise UserError("vitexp launch needs submitit; `pip install 'vitexp[slurm]'` (or submitit)") from None
    executor = submitit.AutoExecutor(folder=out / "slurm" / "%j", cluster=cluster)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    with executor.batch():
        jobs = [executor.submit(_run_shard, argv, i, shards) for i in range(shards)]
    if wait:
        for job in jobs:
            job.result()  # re-raises a task's failure here
    return [job.job_id for job in jobs]
