"""Rich progress for long work: studies (trials done / left, ETA) and the epoch
and step of the trial in flight. The trainer and runner only call `update`."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class StudyProgress:
    """Two bars: trials of the study, and epochs of the trial in flight."""

    def __init__(self, total_trials: int | None = None, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, disable=not self.enabled, transient=False)
        self.total = total_trials
        self.trials = None
        self.epochs = None

    def __enter__(self):
        self.progress.__enter__()
        if self.total is not None:
            self.trials = self.progress.add_task("trials", total=self.total, info="")
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def start_trial(self, label: str, epochs: int) -> None:
        if self.epochs is not None:
            self.progress.remove_task(self.epochs)
        self.epochs = self.progress.add_task(label, total=epochs, info="")

    def end_trial(self, summary: str) -> None:
        if self.trials is not None:
            self.progress.update(self.trials, advance=1, info=summary)
        console.print(summary, highlight=False) if not self.enabled else self.progress.log(summary)

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.log(text)

    def running(self, labels: list[str]) -> None:
        """Packed workers: the trials in flight, shown on the trials bar."""
        if self.trials is not None and self.enabled:
            self.progress.update(self.trials, info=("running: " + "; ".join(labels)) if labels else "")

    def __call__(self, event: dict) -> None:
        """The trainer's progress callback."""
        if self.epochs is None:
            return
        if event["event"] == "epoch":
            self.progress.update(self.epochs, completed=event["epoch"],
                                 info=f"loss {event['train_loss']:.3f} err {event['test_err']:.1f} "
                                      f"ema {event['ema_err']:.1f} {event['images_per_s']:.0f} img/s")
        elif event["event"] == "step":
            frac = event["step"] / event["steps"]
            self.progress.update(self.epochs, completed=event["epoch"] + frac)
