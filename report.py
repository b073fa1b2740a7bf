"""What users look at: the progress of a run, TensorBoard, loss curves, sample grids, the results page.

Everything here only shows what the loop and the scores computed; the
paths come from a `run_folder.RunFolder`.
"""
import datetime
import html
import json
import sys
import time
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import image_files  # noqa: E402
from fileio import atomic_write, writing  # noqa: E402

# TensorBoard sections: one per group, so the dashboard opens on a handful of them.
LOSS_TAG = "loss/{}"
LEARNING_RATE_TAG = "train/learning_rate"
METRIC_TAG = "metrics/{}"
SAMPLES_TAG = "samples"

LABELS = {
    "cycle_L1_A": "cycle A->B->A, L1",
    "cycle_PSNR_A": "cycle A->B->A, PSNR dB",
    "cycle_L1_B": "cycle B->A->B, L1",
    "cycle_PSNR_B": "cycle B->A->B, PSNR dB",
    "identity_L1_A": "identity, A through G_BA, L1",
    "identity_L1_B": "identity, B through G_AB, L1",
    "truth_PSNR": "G_AB(A) vs truth, PSNR dB",
    "baseline_PSNR": "A vs truth (do nothing), PSNR dB",
    "truth_SSIM": "G_AB(A) vs truth, SSIM",
    "baseline_SSIM": "A vs truth (do nothing), SSIM",
    "FID_B": "FID, G_AB(A) vs B",
    "KID_B": "KID, G_AB(A) vs B",
    "FID_A": "FID, G_BA(B) vs A",
    "KID_A": "KID, G_BA(B) vs A",
}


# --- Progress on the terminal, or in a log file ---------------------------

def duration(seconds):
    """'2d 3h', '3h 20m', '4m 05s', '12s': a span as people read it."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


# The whole run's estimate comes after this many timed steps, or seconds, whichever is first.
ESTIMATE_AFTER_STEPS = 10
ESTIMATE_AFTER_S = 30


# Off a terminal, a counting progress says where it is this often (and at its end).
PLAIN_EVERY_S = 10


class CountProgress:
    """Counts `units` ("images", "MiB") done and their rate: a live bar on a terminal, plain
    lines anywhere else (a file, a pipe), without carriage returns or escape codes."""

    def __init__(self, total, units, out=None):
        self.out = out or sys.stdout
        self.live = hasattr(self.out, "isatty") and self.out.isatty()
        self.total, self.units, self.rate = total or None, units, f"{units}/s"
        if self.live:
            self.bar = keras.utils.Progbar(self.total, unit_name=units, stateful_metrics=[self.rate])
        self.start = self.told = time.perf_counter()
        self.done = 0

    def add(self, count):
        self.done += count
        now = time.perf_counter()
        if self.live:
            self.bar.update(self.done, [(self.rate, self.done / (now - self.start))])
        elif now - self.told >= PLAIN_EVERY_S:
            self.say(now)

    def say(self, now):
        self.told = now
        of = f"/{self.total:g}" if self.total else ""
        print(f"{self.done:g}{of} {self.units}, {self.done / max(now - self.start, 1e-9):.3g} "
              f"{self.rate}", file=self.out, flush=True)

    def finish(self):
        """End the bar where it did not reach its total (skipped files, an uncounted clip)."""
        if not self.live:
            self.say(time.perf_counter())
        elif self.done != self.bar.target:
            self.bar.update(self.done, finalize=True)


class RunProgress:
    """A run's progress: a live bar on a terminal, one plain line per epoch anywhere else
    (a file, a cluster's log), and at start and at each epoch how long the whole run takes.

    `names`: the losses shown. The speed is measured from the second step
    on: the first one traces the step.
    """

    def __init__(self, steps_per_epoch, epochs, step, names, out=None):
        self.names = tuple(names)
        self.out = out or sys.stdout
        self.live = hasattr(self.out, "isatty") and self.out.isatty()
        self.steps, self.epochs, self.total = steps_per_epoch, epochs, steps_per_epoch * epochs
        self.first_step = step
        self.clock = None      # (time, step) once the first step is done
        self.told_estimate = False
        self.say(f"Run: {self.total} steps in all ({epochs} epochs of {steps_per_epoch}); "
                 + (f"{step} done, " if step else "") + "how long it takes is told after its first steps.")

    def say(self, line):
        print(line, file=self.out, flush=True)

    def seconds_per_step(self, step):
        if self.clock is None or step <= self.clock[1]:
            return None
        return (time.monotonic() - self.clock[0]) / (step - self.clock[1])

    def estimate(self, step):
        """'about 3h 20m left (done around 2026-12-01 04:30)' at the measured speed, or ''."""
        speed = self.seconds_per_step(step)
        if speed is None:
            return ""
        left = speed * (self.total - step)
        done = datetime.datetime.now() + datetime.timedelta(seconds=left)
        return (f"{speed:.3g} s/step; the run has {self.total - step} steps left, "
                f"about {duration(left)} (done around {done:%Y-%m-%d %H:%M})")

    def start_epoch(self, epoch, learning_rate, step):
        self.epoch, self.epoch_start = epoch, step
        if self.live:
            self.say(f"Epoch {epoch}/{self.epochs} (learning rate {learning_rate:.3g})")
            self.bar = keras.utils.Progbar(self.steps, stateful_metrics=self.names)

    def step_done(self, step, losses):
        if self.clock is None:
            self.clock = (time.monotonic(), step)
        elif not self.told_estimate and (step - self.clock[1] >= ESTIMATE_AFTER_STEPS or
                                         time.monotonic() - self.clock[0] >= ESTIMATE_AFTER_S):
            self.told_estimate = True
            self.say(("\n" if self.live else "") + "Whole run: " + self.estimate(step))
        if self.live:
            self.bar.update(step - (self.epoch - 1) * self.steps, [(k, losses[k]) for k in self.names])

    def end_epoch(self, step, mean_losses):
        losses = " ".join(f"{k} {mean_losses[k]:.4g}" for k in self.names if k in mean_losses)
        estimate = self.estimate(step) if step < self.total else "the run is complete"
        if self.live:
            self.say(f"Whole run: {estimate}" if estimate else "")
        else:
            self.say(f"Epoch {self.epoch}/{self.epochs}: step {step}/{self.total}, {losses}"
                     + (f"; {estimate}" if estimate else ""))


# --- TensorBoard ------------------------------------------------------------

class TensorBoardLogger:
    """Scalars, images and the networks' graph in one TensorBoard run: logs/NAME.

    A failed write of its event file (a full disk) is one line naming the folder.
    """

    def __init__(self, folder):
        self.folder = folder
        with writing(folder):
            self.writer = tf.summary.create_file_writer(str(folder))

    def losses(self, values, learning_rate, step):
        self.scalars({**{LOSS_TAG.format(k): v for k, v in values.items()},
                      LEARNING_RATE_TAG: learning_rate}, step)

    def metrics(self, scores, step):
        self.scalars({METRIC_TAG.format(k): v for k, v in scores.items()}, step)

    def scalars(self, values, step):
        with writing(self.folder), self.writer.as_default(step=step):
            for key, value in values.items():
                tf.summary.scalar(key, value)

    def image_file(self, tag, png_path, step):
        image = tf.io.decode_png(tf.io.read_file(str(png_path)), channels=3)
        with writing(self.folder), self.writer.as_default(step=step):
            tf.summary.image(tag, image[None])

    def graph(self, generator, discriminator):
        """A generator and a discriminator as one graph in the run's Graphs tab (a run holds one)."""
        spec = tf.TensorSpec((1,) + tuple(discriminator.input.shape[1:]), discriminator.input.dtype)
        both = tf.function(lambda x: (generator(x, training=False), discriminator(x, training=False)))
        with writing(self.folder), self.writer.as_default():
            tf.summary.graph(both.get_concrete_function(spec).graph)

    def flush(self):
        with writing(self.folder):
            self.writer.flush()


class NoLogger:
    """TensorBoardLogger's interface for workers that write nothing (not the chief)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# --- Pictures -------------------------------------------------------------

def save_figure(fig, path):
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix[1:], bbox_inches="tight")
    plt.close(fig)


def save_loss_curves(history, path, panels):
    """Per-epoch mean losses, one panel per (title, loss names) of `panels` (the model's
    LOSS_PANELS)."""
    columns = history.read()
    fig, axes = plt.subplots(1, len(panels), figsize=(16 / 3 * len(panels), 4),
                             squeeze=False, layout="constrained")
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            ax.plot(columns["epoch"], columns[name], label=name)
        ax.set(title=title, xlabel="epoch", ylabel="mean loss")
        ax.legend(fontsize="small")
    save_figure(fig, path)


def save_sample_grid(gan, batch_a, batch_b, path, title):
    """The rows of (image, label) that the model draws for the sample batches (gan.sample_rows)."""
    save_image_grid(gan.sample_rows(batch_a, batch_b), path, title)


def save_image_grid(rows, path, title):
    """Rows of (image in [-1, 1], label) as one figure."""
    columns = len(rows[0])
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.5 * columns, 2.6 * len(rows)),
                             squeeze=False, layout="constrained")
    for ax_row, row in zip(axes, rows):
        for ax, (image, label) in zip(ax_row, row):
            ax.imshow(image_files.to_unit(image))
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, path)


# --- Score tables and the results page --------------------------------------

def table_rows(scores):
    """(label, value) pairs: the LABELS scores present in their order, then any others by name."""
    names = [n for n in LABELS if n in scores] + [n for n in scores if n not in LABELS]
    return [(LABELS.get(name, name), f"{scores[name]:.4g}") for name in names]


def format_table(scores):
    rows = table_rows(scores)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def html_table(rows):
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    return f"<table>{cells}</table>"


def link(run, path):
    """An <a> to a file of the run folder, relative so the page opens from anywhere."""
    name = run.relative(path)
    return f'<a href="{quote(name)}">{html.escape(name)}</a>' if Path(path).is_file() else ""


def read_json(path):
    """A JSON file the page shows, or None where it is missing or damaged (the page still builds)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_results_page(run):
    """The run's index.html: settings, latest metrics, loss curves, sample grids newest first."""
    parts = [f"<h1>{html.escape(run.name)}</h1>",
             f"<p>Updated {datetime.datetime.now():%Y-%m-%d %H:%M}. "
             + " ".join(link(run, p) for p in (run.config, run.metrics, run.losses)) + "</p>"]
    settings = read_json(run.config)
    if isinstance(settings, dict):
        parts.append(f"<details><summary>Settings</summary>{html_table(settings.items())}</details>")
    saved = read_json(run.metrics)
    if isinstance(saved, dict) and isinstance(saved.get("metrics"), dict):
        parts += [f"<h2>Metrics ({html.escape(str(saved.get('source', '')))})</h2>",
                  html_table(table_rows(saved["metrics"]))]
    if run.curves.is_file():
        parts += ["<h2>Loss curves</h2>",
                  f'<img src="{quote(run.relative(run.curves))}" alt="loss curves">']
    grids = run.sample_grids()[::-1]
    if grids:
        parts.append("<h2>Samples, newest first</h2>")
        parts += [f'<figure><img src="{quote(run.relative(g))}" alt="{html.escape(g.stem)}">'
                  f"<figcaption>{html.escape(g.stem)}</figcaption></figure>" for g in grids]
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(run.name)}</title><style>{PAGE_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    with atomic_write(run.page) as tmp:
        tmp.write_text(page, encoding="utf-8")


PAGE_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:60em}"
              "th{text-align:left;padding-right:2em;font-weight:normal}td{font-family:monospace}"
              "img{max-width:100%}figure{margin:1em 0}")
