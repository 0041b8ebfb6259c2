"""What a user sees while work runs: trials done and left, elapsed time, an ETA from the
measured throughput (training images done so far, the running trials' epochs included),
and the trials in flight with their epoch, in any terminal width; piped, one plain line
per finished trial with the same counters. Rich is used on a terminal only."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False)


def trial_label(c: dict) -> str:
    """How logs and progress name a trial (from its config or its recorded row)."""
    size = c.get("n_train") or "all"
    ref = c.get("lr_batch_size") or 2048  # the lr is given at this batch (the papers' convention), not the peak
    label = (f"{c['model']} n={size} {c['optimizer']} lr@{ref}={c['lr']:.2g} wd={c['wd']:.2g} {c['epochs']}ep "
             f"s{c['seed']}")
    # a distilled or fine-tuned trial shares every field above with its plain twin: name its source
    for field, word in (("teacher", "teacher"), ("init_from", "from")):
        source = c.get(field)
        if isinstance(source, dict) and source.get("model"):
            label += f" ({word} {source['model']} n={source.get('n_train') or 'all'})"
    return label


def trial_summary(label: str, row: dict) -> str:
    """A finished trial's one line: its error and flags, or why it failed."""
    if row.get("status", "ok") != "ok":
        return f"{label}: FAILED ({row.get('error')}); a rerun retries it"
    flags = " DIVERGED" if row["diverged"] else "" if row.get("converged", True) else " (not converged)"
    return f"{label}: {error_phrase(row)}{flags}"


def error_phrase(row: dict) -> str:
    """A trial's reported error: its final model's test error, and its held-out error where it
    has one ("err 23.60%, held-out 22.10%")."""
    held = row.get("val_err")
    return f"err {row['last_err']:.2f}%" + (f", held-out {held:.2f}%" if held is not None and held == held else "")


def trial_images(cfg) -> float:
    """Training images a trial (a TrainConfig) sees, less its held-out share: the unit of
    progress and ETA."""
    from vitexp.data import dataset_info

    return float((cfg.n_train or dataset_info(cfg.dataset).n_train or 1) * (1 - (cfg.holdout or 0)) * cfg.epochs)


def clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Eta:
    """Time left of a run, from each pending trial's cost: its training images at its model's
    measured speed (images/s of the finished trials of that model; for a model not measured
    yet, the finished trials' FLOP rate over its FLOPs per image), shared by the workers.
    Before any trial finishes: the elapsed time scaled by the share of images done."""

    def __init__(self, trials: list[tuple[str, float, float]], workers: int = 1):
        self.left = list(trials)  # (model, images, forward GF per image) of each trial still to finish
        self.total = sum(i for _, i, _ in trials)
        self.workers = max(1, workers)
        self.done: list[tuple[str, float, float, float]] = []  # (model, images, gf, seconds)

    def finished(self, model: str | None, images: float, seconds: float) -> None:
        match = (next((t for t in self.left if t[0] == model and t[1] == images), None)
                 or next((t for t in self.left if t[0] == model), None) or next(iter(self.left), None))
        if match is not None:
            self.left.remove(match)
            self.done.append((*match, float(seconds)))

    def seconds(self, running: float, elapsed: float) -> float | None:
        """Seconds left, with RUNNING training images done by the trials in flight."""
        timed = [d for d in self.done if d[3] > 0]
        left = sum(i for _, i, _ in self.left)
        if not timed:
            done = self.total - left + running
            return elapsed * (self.total - done) / done if done > 0 else None
        speed = {m: sum(d[1] for d in timed if d[0] == m) / sum(d[3] for d in timed if d[0] == m)
                 for m in {d[0] for d in timed}}
        flop_rate = sum(d[1] * d[2] for d in timed) / sum(d[3] for d in timed)
        cost = sum(i / speed[m] if m in speed else i * g / flop_rate for m, i, g in self.left)
        share = 1.0 - min(running / left, 1.0) if left else 0.0
        return cost * share / min(self.workers, max(len(self.left), 1))


class StudyProgress:
    """Progress of a run of TOTAL_TRIALS trials worth TOTAL_IMAGES training images (TRIALS:
    (model, images, GF) of each, for the ETA; WORKERS: processes training side by side)."""

    FIXED = 50  # columns of the counter, bar, times and ETA: the trials in flight get the rest

    def __init__(self, total_trials: int = 1, total_images: float = 1.0, enabled: bool | None = None,
                 trials: list[tuple[str, float, float]] | None = None, workers: int = 1, epoch_lines: bool = False):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.epoch_lines = epoch_lines  # one line per epoch (a single trial's run), on a terminal and piped
        self.quiet = False  # worker processes: the parent reports
        self.total_trials, self.total_images = total_trials, max(float(total_images), 1.0)
        self.done_trials, self.done_images = 0, 0.0
        self.running_images = 0.0  # the in-flight trials' finished share
        self.resumed_from = 0  # the epoch the trial in flight resumed from (0: it started afresh)
        self.current: tuple[str, float, int] | None = None  # in-process: (label, images, epochs) in flight
        if trials is None:  # no costs given: every trial alike
            trials = [(None, self.total_images / max(total_trials, 1), 1.0)] * total_trials
        self.eta_model = Eta(trials, workers)
        self.t0 = time.monotonic()
        # counters first, the trials in flight last and cut to the width left: the bar and the ETA stay
        self.progress = Progress(TextColumn("trials {task.fields[trials]}"), BarColumn(bar_width=16),
                                 TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                                 TextColumn("{task.description}"), console=console, disable=not self.enabled,
                                 transient=False, expand=False)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("", total=self.total_images, trials=self._trials(), eta=clock(None))
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and self.enabled:
            self.progress.live.transient = True  # interrupted: the CLI's one line replaces the live one
        self.progress.__exit__(*exc)

    def _trials(self) -> str:
        return f"{self.done_trials}/{self.total_trials}"

    def eta(self) -> float | None:
        return self.eta_model.seconds(self.running_images, time.monotonic() - self.t0)

    def _fit(self, text: str) -> str:
        room = max(self.progress.console.width - self.FIXED, 0)
        return text if len(text) <= room else text[:max(room - 1, 0)] + ("…" if room else "")

    def _update(self, description: str | None = None) -> None:
        if self.task is not None:
            fields = {"description": self._fit(description)} if description is not None else {}
            self.progress.update(self.task, completed=self.done_images + self.running_images,
                                 trials=self._trials(), eta=clock(self.eta()), **fields)

    def start_trial(self, label: str, images: float, epochs: int) -> None:
        self.current, self.running_images, self.resumed_from = (label, float(images), epochs), 0.0, 0
        self._update(label)

    def end_trial(self, summary: str, images: float = 0.0, row: dict | None = None) -> None:
        """A trial ended (ROW: its record, whose model and wall time correct the ETA)."""
        self.done_trials += 1
        self.done_images += float(images)
        if row is not None:
            self.eta_model.finished(row.get("model"), float(images), float(row.get("wall_s") or 0))
        self.running_images, self.current = 0.0, None
        self._update("")
        line = f"[{self._trials()} {clock(time.monotonic() - self.t0)} eta {clock(self.eta())}] {summary}"
        if not self.quiet:
            (self.progress.console if self.enabled else console).print(line, soft_wrap=True)

    def say(self, text: str) -> None:
        """A line for every reader, on a terminal and piped alike."""
        if not self.quiet:
            (self.progress.console if self.enabled else console).print(text, soft_wrap=True)

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
        if event["event"] == "resumed":
            self.resumed_from = event["epoch"]
            self.say(f"{label}: resumed from epoch {event['epoch']} of {epochs}")
        # a step event names the epoch under way (from 0), an epoch event the epochs done
        epoch = event["epoch"] + (event["step"] / event["steps"] if event["event"] == "step" else 0)
        self.running_images = images * min(epoch / epochs, 1.0)
        info = f"ep {epoch:.1f}/{epochs}" + (f" (resumed at {self.resumed_from})" if self.resumed_from else "")
        if event["event"] == "epoch":
            info += f" loss {event['train_loss']:.3f}"
            if self.epoch_lines:
                self.say(epoch_line(event, epochs))
        self._update(f"{label} {info}")


def epoch_line(event: dict, epochs: int) -> str:
    """A finished epoch's numbers: its training loss, the lr it ended at (its peak scale, the
    scheduled value), and the test errors where it was evaluated."""
    line = f"epoch {event['epoch']}/{epochs}: loss {event['train_loss']:.4f}, lr {event['lr']:.3g}"
    errs = [f"{name} {event[col]:.2f}%" for name, col in (("test err", "test_err"), ("EMA", "ema_err"))
            if event.get(col) == event.get(col) and event.get(col) is not None]
    return line + (", " + ", ".join(errs) if errs else "") + f", {event['images_per_s']:.0f} img/s"


def trial_costs(cfgs: list) -> list[tuple[str, float, float]]:
    """(model, training images, forward GF per image) of each trial: what an `Eta` counts."""
    from vitexp import models as vmodels

    gf = {}
    for c in cfgs:
        if c.model not in gf:
            try:
                gf[c.model] = vmodels.complexity(c.model_spec(), resolution=c.image_size)["gmacs"]
            except Exception:  # noqa: BLE001 - a cost it cannot count: the ETA takes it as average
                gf[c.model] = 1.0
    return [(c.model, trial_images(c), gf[c.model]) for c in cfgs]


def study_progress(cfgs: list, workers: int, enabled: bool | None) -> StudyProgress:
    """The progress of a run of CFGS, its ETA from each trial's images and its model's FLOPs per
    image; a line per epoch when it is one trial."""
    trials = trial_costs(cfgs)
    return StudyProgress(len(cfgs), sum(i for _, i, _ in trials), enabled, trials=trials, workers=workers,
                         epoch_lines=len(cfgs) == 1)


def hparams_line(cfg, source: str | None) -> str:
    """Which lr and wd a trial (a resolved TrainConfig) trains with and where they come from
    (SOURCE: "given", a preset's; None: the model zoo's); the lr both at the reference batch
    (the papers' convention, as every table shows it) and at its peak."""
    from vitexp.optim import peak_lr

    spec = cfg.model_spec()
    line = (f"lr {cfg.lr:.3g} at the reference batch {cfg.lr_batch_size} (peak {peak_lr(cfg):.3g} at batch "
            f"{cfg.batch_size}), wd {cfg.wd:.3g}: {source or tuned_source(cfg)}")
    if source is None and spec.builtin and spec.resolution < 224 and cfg.dataset != "shapes":
        line += f"; for {cfg.dataset} give --lr and --wd, or a --preset with [tuned] values (e.g. its *_cpu presets)"
    return line


def tuned_source(cfg) -> str:
    """Where the model zoo's lr/wd of CFG's model come from."""
    spec = cfg.model_spec()
    if not spec.builtin:
        return "the model's own tuned values"
    if spec.resolution >= 224:
        return f"[EC] Table 4's {cfg.optimizer} values (tuned on ImageNet)"
    return f"the model zoo's {cfg.optimizer} values for {cfg.model}, tuned on shapes (results/tune_shapes)"


def print_table(out: Console, df, title: str | None = None) -> None:
    """A table printed whole to OUT: rich on a terminal wide enough, else plain aligned text."""
    from rich.table import Table

    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    widths = [max([len(str(c))] + [len(r[i]) for r in cells]) for i, c in enumerate(df.columns)]
    if out.is_terminal and sum(widths) + 3 * len(widths) + 1 <= out.width:
        table = Table(title=title)
        for c in df.columns:
            table.add_column(str(c), no_wrap=True, overflow="fold")
        for r in cells:
            table.add_row(*r)
        out.print(table)
        return
    if title:
        out.print(title)
    for r in [list(map(str, df.columns))] + cells:
        out.print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def summarised(df, head: int = 20, tail: int = 5):
    """A long table cut to its first and last rows, with a row saying how many are left out."""
    if len(df) <= head + tail + 1:
        return df
    import pandas as pd

    gap = pd.DataFrame([{c: ("..." if i else f"({len(df) - head - tail} more)") for i, c in enumerate(df.columns)}])
    return pd.concat([df.head(head).astype(object), gap, df.tail(tail).astype(object)], ignore_index=True)


def settings_lines(cfg, fields: dict, source: str | None) -> list[str]:
    """Before a single trial: which lr/wd it takes and from where, and what an out-of-range
    --precise-bn becomes."""
    from vitexp.data import dataset_info

    lines = [hparams_line(cfg, source)]
    n = cfg.n_train or dataset_info(cfg.dataset).n_train
    if fields.get("precise_bn") and n and fields["precise_bn"] >= n:
        lines.append(f"--precise-bn {fields['precise_bn']:,}: at least the {n:,} training images, so all of them "
                     f"(keyed as all)")
    return lines


def done_line(row: dict, out) -> str:
    """A single trial's last line: how it ended, its settings, error and convergence, where it is."""
    status = "DIVERGED" if row["diverged"] else "done"
    return (f"{status}: {row['model']} {row['dataset']} n={row['n_train']} {row['optimizer']} lr={row['lr']:.3g} "
            f"(peak {row['peak_lr']:.3g}) wd={row['wd']:.3g} {error_phrase(row)} "
            f"({'converged' if row['converged'] else 'NOT converged'}) in {row['wall_s']:.1f}s -> {out}/runs.csv")
