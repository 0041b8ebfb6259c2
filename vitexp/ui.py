"""What a user sees while work runs: trials done and left, elapsed time, an ETA from the
measured throughput (training images done so far, the running trials' epochs included),
and the trials in flight with their epoch, in any terminal width; piped, one plain line
per finished trial with the same counters. Rich is used on a terminal only."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


def clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StudyProgress:
    """Progress of a run of TOTAL_TRIALS trials worth TOTAL_IMAGES training images."""

    def __init__(self, total_trials: int = 1, total_images: float = 1.0, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.quiet = False  # worker processes: the parent reports
        self.total_trials, self.total_images = total_trials, max(float(total_images), 1.0)
        self.done_trials, self.done_images = 0, 0.0
        self.running_images = 0.0  # the in-flight trials' finished share
        self.current: tuple[str, float, int] | None = None  # in-process: (label, images, epochs) in flight
        self.t0 = time.monotonic()
        # counters first, the trials in flight last: a narrow terminal cuts only their names
        self.progress = Progress(TextColumn("trials {task.fields[trials]}"), BarColumn(bar_width=16),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(compact=True),
                                 TextColumn("{task.description}"), console=console, disable=not self.enabled,
                                 transient=False, expand=False)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("", total=self.total_images, trials=self._trials())
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def _trials(self) -> str:
        return f"{self.done_trials}/{self.total_trials}"

    def eta(self) -> float | None:
        done = self.done_images + self.running_images
        return (time.monotonic() - self.t0) * (self.total_images - done) / done if done > 0 else None

    def _update(self, description: str | None = None) -> None:
        if self.task is not None:
            fields = {"description": description} if description is not None else {}
            self.progress.update(self.task, completed=self.done_images + self.running_images,
                                 trials=self._trials(), **fields)

    def start_trial(self, label: str, images: float, epochs: int) -> None:
        self.current, self.running_images = (label, float(images), epochs), 0.0
        self._update(label)

    def end_trial(self, summary: str, images: float = 0.0) -> None:
        self.done_trials += 1
        self.done_images += float(images)
        self.running_images, self.current = 0.0, None
        self._update("")
        line = f"[{self._trials()} {clock(time.monotonic() - self.t0)} eta {clock(self.eta())}] {summary}"
        if not self.quiet:
            (self.progress.console if self.enabled else console).print(line, soft_wrap=True)

    def note(self, text: str) -> None:
        """A line for the live display only (piped output keeps one line per trial)."""
        if self.enabled and not self.quiet:
            self.progress.console.print(text, soft_wrap=True)

    def running(self, trials: list[tuple[str, str, float]]) -> None:
        """Worker processes' trials in flight: (label, progress text, images done so far)."""
        self.running_images = sum(images for _, _, images in trials)
        self._update("; ".join(f"{label} {text}".strip() for label, text, _ in trials))

    def __call__(self, event: dict) -> None:
        """The trainer's progress callback (the trial started by start_trial)."""
        if self.current is None:
            return
        label, images, epochs = self.current
        # a step event names the epoch under way (from 0), an epoch event the epochs done
        epoch = event["epoch"] + (event["step"] / event["steps"] if event["event"] == "step" else 0)
        self.running_images = images * min(epoch / epochs, 1.0)
        info = f"ep {epoch:.1f}/{epochs}"
        if event["event"] == "epoch":
            info += f" loss {event['train_loss']:.3f}"
        self._update(f"{label} {info}")
