"""A run's folders, results/NAME and logs/NAME: the only code that knows what is in them.

Every file of a run is a named attribute of `RunFolder`; training, evaluate,
the results page, benchmark and study ask it for paths. `RunFolder.open`
is the one place a run is started in: it refuses folders that are, hold or
lie inside a folder the run reads, never follows a link found inside the
run folder, and takes the locks of both folders. Where a run is comes from
this invocation's flags, never from its config.json.

Both folders carry RUN_MARK from the moment a run is made there: `--overwrite`
empties only a marked folder, and in it only what a run writes
(`made_by_a_run`); anything else is left where it is.
"""
import contextlib
import csv
import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

import config
from config import UserError
from fileio import FileLock, atomic_path, atomic_write, cannot_write, remove, write_cause

MODEL_FILES = {"g_ab": "generatorAToB.h5", "g_ba": "generatorBToA.h5",
               "d_a": "discriminatorA.h5", "d_b": "discriminatorB.h5", "f": "patchHeadF.h5"}
# In results/NAME and logs/NAME of every run this program made: only such folders are emptied.
RUN_MARK = ".cyclegan-run"
# What TensorBoard's writer puts in logs/NAME: event files, and the plugins/ folder of some summaries.
LOG_ENTRIES = re.compile(r"events\.out\.tfevents\..+|plugins")
# What tf.train.CheckpointManager leaves of the checkpoint of step {step} whose writing was cut short.
PARTIAL_CHECKPOINT = r"ckpt-{step}_temp"


class RunFolder:
    """results_dir/NAME and log_dir/NAME, and every file a run writes in them."""

    def __init__(self, results_dir, log_dir, name):
        config.check_run_name(name)
        self.name = name
        self.root = Path(results_dir) / name
        self.logs = Path(log_dir) / name
        self.config = self.root / "config.json"
        self.losses = self.root / "losses.csv"
        self.curves = self.root / "loss_curves.png"
        self.metrics = self.root / "metrics.json"
        self.page = self.root / "index.html"
        self.lock = self.root / ".lock"
        self.samples = self.root / "samples"
        self.models = self.root / "models"
        self.checkpoints = self.root / "checkpoints"

    @classmethod
    def of(cls, cfg):
        return cls(cfg.results_dir, cfg.log_dir, cfg.name)

    def model(self, network):
        """The .h5 of one network: g_ab, g_ba, d_a, d_b or (CUT's head) f."""
        return self.models / MODEL_FILES[network]

    def sample(self, epoch):
        return self.samples / f"epoch_{epoch:04d}.png"

    def sample_grids(self):
        """The sample grids written so far, oldest first."""
        return sorted(self.samples.glob("epoch_*.png")) if self.samples.is_dir() else []

    def relative(self, path):
        """`path` relative to results/NAME, for links on the results page."""
        return Path(path).relative_to(self.root).as_posix()

    # --- Opening ------------------------------------------------------------

    def check_apart_from(self, reads):
        """Refuse a run or log folder that is, holds or lies inside a folder the run reads."""
        for folder, flag in ((self.root, "--results-dir"), (self.logs, "--log-dir")):
            mine = folder.resolve()
            for read in map(lambda p: Path(p).resolve(), reads):
                if mine == read or read in mine.parents or mine in read.parents:
                    raise UserError(f"{folder} would {'be' if mine == read else 'overlap'} "
                                    f"{read}, which this run reads; choose another {flag} or --name")

    def check_no_links(self, entries=None):
        """Refuse results/NAME and logs/NAME that are, or hold, a link (or only `entries` of
        theirs that are or hold one): a write must never go through one to a file outside the run."""
        for folder in (self.root, self.logs):
            if folder.is_symlink():
                raise UserError(f"{folder} is a link; a run folder must be a real folder: "
                                "remove the link or choose another --name")
        for top in (self.root, self.logs) if entries is None else entries:
            found = [top] if os.path.islink(top) else []
            for parent, dirs, files in os.walk(top):
                found += [os.path.join(parent, e) for e in dirs + files
                          if os.path.islink(os.path.join(parent, e))]
            if found:
                raise UserError(f"{found[0]} is a link; a run folder holds none: remove it")

    def check_is_a_run(self):
        """Refuse results/NAME or logs/NAME that holds anything but lacks RUN_MARK: not a run of
        this program, so never written into, nor emptied by --overwrite."""
        for folder, flag in ((self.root, "--results-dir"), (self.logs, "--log-dir")):
            if folder.is_dir() and self.entries(folder) and not (folder / RUN_MARK).is_file():
                raise UserError(f"{folder} holds files but no run of this program (it lacks "
                                f"{RUN_MARK}); it is never written into or emptied: choose another "
                                f"--name or {flag}")

    def entries(self, folder):
        """What results/NAME or logs/NAME holds but for the locks and marks."""
        return [p for p in folder.iterdir() if p.name not in (self.lock.name, RUN_MARK)]

    def open(self, reads, resume=False, overwrite=False):
        """Lock this run's two folders for this process and make them; returns the locks (an
        ExitStack: closing it releases them).

        Refuses in one line: folders overlapping `reads` (the dataset), links,
        a folder that holds files but no run of this program, an unwritable
        place, a folder another run holds, an earlier run unless `resume` or
        `overwrite` (which empties both folders of what a run writes).
        Nothing but the locks is written before every check has passed;
        then both folders are marked as a run's, and what a checkpoint cut
        short left behind is removed.
        """
        self.check_apart_from(reads)
        if self.root.is_symlink() or self.logs.is_symlink():
            self.check_no_links()  # names the link
        if not resume:
            self.check_is_a_run()  # before the locks: another's folder gets no file of ours
        # One folder where --log-dir and --results-dir are the same.
        folders = (self.root,) if self.logs.resolve() == self.root.resolve() else (self.root, self.logs)
        locks = contextlib.ExitStack()
        try:
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
                busy = (f"run {self.name!r} is in use by another process (pid {{pid}}); wait for "
                        "it to finish or stop it first" if folder == self.root else
                        f"{folder} is in use by another run (pid {{pid}}), which logs there; wait "
                        "for it to finish, or choose another --log-dir or --name")
                locks.enter_context(FileLock(folder / self.lock.name, busy))
            earlier = [entry for folder in folders for entry in self.entries(folder)]
            if earlier and not resume:
                if not overwrite:
                    raise UserError(f"{earlier[0].parent} already holds a run; pass --resume to "
                                    "continue it, --overwrite to replace it or --name to start "
                                    "another")
                self.clear(earlier)
            self.check_no_links()
            for folder in folders:
                (folder / RUN_MARK).write_text("A run of cyclegan-keras: --overwrite empties "
                                               "only folders marked so.\n")
            for folder in (self.samples, self.models, self.checkpoints):
                folder.mkdir(exist_ok=True)
                if not os.access(folder, os.W_OK):
                    raise UserError(f"cannot write {folder} (not writable)")
            remove_partial_checkpoints(self.checkpoints)
        except OSError as error:
            locks.close()
            raise cannot_write(error.filename or self.root, error) from None
        except BaseException:
            locks.close()
            raise
        return locks

    @contextlib.contextmanager
    def made_root(self):
        """results/NAME for a block that writes only scores and the page there (evaluate); one
        made for a block that fails, and left empty, is removed again."""
        self.check_no_links()
        existed = self.root.is_dir()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise cannot_write(self.root, error) from None
        try:
            yield
        except BaseException:
            if not existed:
                with contextlib.suppress(OSError):  # not empty: something was written after all
                    self.root.rmdir()
            raise

    def made_by_a_run(self, entry):
        """Whether `entry`, at the top of results/NAME or logs/NAME, is one a run writes there."""
        files = (self.config, self.losses, self.curves, self.metrics, self.page)
        names = {p.name for p in (*files, *map(atomic_path, files), self.samples, self.models,
                                  self.checkpoints)}
        return entry.name in names or bool(LOG_ENTRIES.fullmatch(entry.name))

    def clear(self, entries):
        """--overwrite: remove those of `entries` a run writes, links never followed; the rest is
        kept, said in one line."""
        kept = [entry for entry in entries if not self.made_by_a_run(entry)]
        self.check_no_links(kept)  # refused before anything is removed
        for entry in entries:
            if entry not in kept:
                remove(entry)
        if kept:
            print(f"--overwrite kept what no run writes: {', '.join(map(str, kept))}")

    # --- config.json ----------------------------------------------------------

    def write_config(self, cfg):
        with atomic_write(self.config) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    def saved_settings(self):
        """config.json's settings, checked against Config's fields, types and ranges; where the
        run is (name, folders) left out.

        A damaged file is one line naming it and the way out.
        """
        if not self.config.is_file() or self.config.is_symlink():
            raise UserError(f"no run {self.name!r}: {self.config} is missing")
        try:
            saved = json.loads(self.config.read_text(encoding="utf-8"))
            settings = config.checked_settings(saved)
        except (ValueError, UnicodeDecodeError, OSError, UserError) as error:
            raise UserError(f"{self.config} is damaged ({config.one_line(error)}); restore it, or "
                            "start the run again with --overwrite") from None
        return settings

    # --- losses.csv -------------------------------------------------------

    def losses_history(self, names):
        return LossHistory(self.losses, names)

    # --- Models -----------------------------------------------------------

    def save_models(self, gan):
        """The model's networks as .h5 files in models/ (gan.save_networks)."""
        gan.save_networks(self.model)

    def has_models(self, networks):
        """Whether the .h5 of each of `networks` (the model's NETWORKS) is there."""
        return all(self.model(network).is_file() for network in networks)


class LossHistory:
    """Per-epoch mean losses in a CSV, so curves survive restarts.

    Rewritten whole at each epoch (atomically); an epoch replayed after a
    resume replaces its earlier row. Read tolerantly: a file re-saved by a
    spreadsheet (a byte-order mark, other columns) or a damaged row never
    stops an epoch.
    """

    def __init__(self, path, names):
        self.path = Path(path)
        self.names = tuple(names)

    def append(self, epoch, means):
        rows = self.read_rows()
        rows[epoch] = {k: means[k] for k in self.names}
        with atomic_write(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("epoch",) + self.names)
            writer.writerows([e] + [f"{values[k]:.6g}" for k in self.names]
                             for e, values in sorted(rows.items()))

    def read_rows(self):
        """{epoch: {name: value}} of every row that parses whole; nothing if the file is unreadable."""
        rows = {}
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                for row in csv.DictReader(f):
                    try:
                        rows[int(float(row["epoch"]))] = {k: float(row[k]) for k in self.names}
                    except (KeyError, TypeError, ValueError):
                        continue
        except (OSError, UnicodeDecodeError, csv.Error):
            return rows
        return rows

    def read(self):
        """{"epoch": array, name: array, ...} in epoch order."""
        rows = sorted(self.read_rows().items())
        columns = {"epoch": np.array([e for e, _ in rows], float)}
        for name in self.names:
            columns[name] = np.array([values[name] for _, values in rows], float)
        return columns


class RunCheckpoint:
    """Everything a resume needs: the model's state (gan.state()), the step, the data position."""

    def __init__(self, gan, data_iterator, folder, keep=3):
        self.gan = gan
        self.step = tf.Variable(0, dtype=tf.int64)
        checkpoint = tf.train.Checkpoint(**gan.state(), step=self.step, data=data_iterator)
        self.manager = tf.train.CheckpointManager(checkpoint, str(folder), max_to_keep=keep)

    def save(self, step):
        """Write the checkpoint of `step`; on failure (a full disk) keep the earlier ones."""
        self.step.assign(step)
        self.gan.store_pools()
        try:
            self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as error:
            # Asked before the clean-up frees the space the partial checkpoint took.
            said = str(getattr(error, "message", error)).rsplit("; ", 1)[-1].split(" [Op:")[0]
            reason = write_cause(self.manager.directory, error) or f"{said}; is the disk full?"
            with contextlib.suppress(OSError):  # the clean-up never hides the first error
                remove_partial_checkpoints(self.manager.directory, step)
            kept = self.manager.latest_checkpoint
            raise UserError(f"could not write the checkpoint of step {step} in "
                            f"{self.manager.directory} ({reason}); "
                            + (f"{Path(kept).name} is kept, resume from it with --resume" if kept
                               else "no checkpoint was written")) from None

    def restore(self):
        """Load the newest checkpoint that restores whole; returns its step (0 if none exist).

        A damaged one (a truncated file, say) is skipped with a warning naming it.
        """
        candidates = list(reversed(self.manager.checkpoints))
        for path in candidates:
            try:
                self.manager.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as error:  # what a damaged file raises varies with the damage
                warnings.warn(f"skipping damaged checkpoint {path} ({config.one_line(error)})",
                              DamagedCheckpointWarning)
                continue
            self.gan.load_pools()
            return int(self.step.numpy())  # .numpy(): a MirroredVariable under a strategy
        if candidates:
            raise UserError(f"no checkpoint in {self.manager.directory} can be restored")
        return 0


def remove_partial_checkpoints(folder, step=r"\d+"):
    """Remove what a checkpoint cut short (by a full disk, a kill) left in `folder`: of `step`,
    or of any step."""
    pattern = re.compile(PARTIAL_CHECKPOINT.format(step=step))
    for entry in Path(folder).iterdir():
        if pattern.fullmatch(entry.name):
            remove(entry)


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint could not be read; an older one is used."""

