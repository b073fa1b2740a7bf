"""A run's folders, results/NAME and logs/NAME: the only code that knows what is in them.

Every file of a run is a named attribute of `RunFolder`; training, evaluate,
the results page, benchmark and study ask it for paths. `RunFolder.open`
is the one place a run is started in: it refuses folders that are, hold or
lie inside a folder the run reads, never follows a link found inside the
run folder, and takes the run's lock. Where a run is comes from this
invocation's flags, never from its config.json.
"""
import csv
import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

import config
import models
import train_utils as tu
from config import UserError
from fileio import FileLock, atomic_write, cannot_write, remove, write_cause

MODEL_FILES = {"g_ab": "generatorAToB.h5", "g_ba": "generatorBToA.h5",
               "d_a": "discriminatorA.h5", "d_b": "discriminatorB.h5"}


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
        """The .h5 of one network: g_ab, g_ba, d_a or d_b."""
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

    def check_no_links(self):
        """Refuse results/NAME and logs/NAME that are, or hold, a link: a write must never
        go through one to a file outside the run."""
        for folder in (self.root, self.logs):
            if folder.is_symlink():
                raise UserError(f"{folder} is a link; a run folder must be a real folder: "
                                "remove the link or choose another --name")
            for parent, dirs, files in os.walk(folder):
                for entry in dirs + files:
                    if os.path.islink(os.path.join(parent, entry)):
                        raise UserError(f"{os.path.join(parent, entry)} is a link; a run folder "
                                        "holds none: remove it (or start again with --overwrite)")

    def open(self, reads, resume=False, overwrite=False):
        """Lock this run for this process and make its folders; returns the lock.

        Refuses in one line: folders overlapping `reads` (the dataset), links,
        an unwritable place, an earlier run unless `resume` or `overwrite`
        (which empties both folders). Nothing but the lock is written before
        every check has passed.
        """
        self.check_apart_from(reads)
        if self.root.is_symlink() or self.logs.is_symlink():
            self.check_no_links()  # names the link
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise cannot_write(self.root, error) from None
        lock = FileLock(self.lock, f"run {self.name!r} is in use by another process (pid {{pid}}); "
                                   "wait for it to finish or stop it first")
        try:
            earlier = [p for p in self.root.iterdir() if p != self.lock]
            if earlier and not resume:
                if not overwrite:
                    raise UserError(f"{self.root} already holds a run; pass --resume to continue "
                                    "it, --overwrite to replace it or --name to start another")
                self.clear(earlier)
            self.check_no_links()
            for folder in (self.logs, self.samples, self.models, self.checkpoints):
                folder.mkdir(parents=True, exist_ok=True)
                if not os.access(folder, os.W_OK):
                    raise UserError(f"cannot write {folder} (not writable)")
        except OSError as error:
            lock.release()
            raise cannot_write(error.filename or self.root, error) from None
        except BaseException:
            lock.release()
            raise
        return lock

    def make_root(self):
        """results/NAME, for a command that writes only scores and the page there (evaluate)."""
        self.check_no_links()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise cannot_write(self.root, error) from None

    def clear(self, entries):
        """--overwrite: remove `entries` of results/NAME and all of logs/NAME, links never followed."""
        for entry in entries:
            remove(entry)
        remove(self.logs)

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
        """The four networks as float32 .h5, each written whole before it replaces the last."""
        gan.set_discriminators_trainable(True)  # a reloaded discriminator should train
        for network in MODEL_FILES:
            models.save_h5(models.float32_twin(getattr(gan, network)), self.model(network))

    def has_models(self):
        return all(self.model(network).is_file() for network in MODEL_FILES)


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
    """Everything a resume needs: networks, optimizer states, step, image pools, data position.

    Pools live in NumPy while training and are copied into variables only
    when a checkpoint is written or read.
    """

    def __init__(self, gan, pools, data_iterator, folder, image_size, keep=3):
        tu.build_optimizers(gan)
        self.pools = pools
        self.step = tf.Variable(0, dtype=tf.int64)
        self.pool_images = [tf.Variable(tf.zeros((p.size, image_size, image_size, 3))) for p in pools]
        self.pool_counts = [tf.Variable(0, dtype=tf.int64) for _ in pools]
        state = dict(g_ab=gan.g_ab, g_ba=gan.g_ba, d_a=gan.d_a, d_b=gan.d_b,
                     d_a_optimizer=gan.d_a.optimizer, d_b_optimizer=gan.d_b.optimizer,
                     adversarial_optimizer=gan.adversarial.optimizer, step=self.step,
                     pool_images=self.pool_images, pool_counts=self.pool_counts)
        self.without_data = tf.train.Checkpoint(**state)
        checkpoint = tf.train.Checkpoint(**state, data=data_iterator)
        self.manager = tf.train.CheckpointManager(checkpoint, str(folder), max_to_keep=keep)

    def save(self, step):
        """Write the checkpoint of `step`; on failure (a full disk) keep the earlier ones."""
        self.step.assign(step)
        for pool, images, count in zip(self.pools, self.pool_images, self.pool_counts):
            if pool.images:
                images[:len(pool.images)].assign(np.stack(pool.images))
            count.assign(len(pool.images))
        try:
            self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as error:
            # Asked before the clean-up frees the space the partial checkpoint took.
            said = str(getattr(error, "message", error)).rsplit("; ", 1)[-1].split(" [Op:")[0]
            reason = write_cause(self.manager.directory, error) or f"{said}; is the disk full?"
            for partial in Path(self.manager.directory).glob(f"ckpt-{step}_temp*"):
                shutil.rmtree(partial, ignore_errors=True)
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
                if not self.restored_without_data(path, error):
                    warnings.warn(f"skipping damaged checkpoint {path} ({config.one_line(error)})",
                                  DamagedCheckpointWarning)
                    continue
            for pool, images, count in zip(self.pools, self.pool_images, self.pool_counts):
                pool.images = list(images.numpy()[:int(count.numpy())])
            return int(self.step.numpy())  # .numpy(): a MirroredVariable under a strategy
        if candidates:
            raise UserError(f"no checkpoint in {self.manager.directory} can be restored")
        return 0


    def restored_without_data(self, path, error):
        """Whether `path`, whose input position only an older pipeline could take (one that
        dropped unreadable images, data.domain_dataset), restores without it."""
        if "dataset iterator" not in str(error):
            return False
        try:
            self.without_data.restore(path).expect_partial().assert_existing_objects_matched()
        except Exception:  # damaged as well
            return False
        warnings.warn(f"{path} holds the input position of an older version of this program; "
                      "resumed with the images in a new order", InputOrderWarning)
        return True


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint could not be read; an older one is used."""


class InputOrderWarning(UserWarning):
    """A checkpoint's input position is of an older pipeline; the images start a new order."""
