"""Pieces of the training loop: step, image pool, schedule, logging, samples, saving."""
import contextlib
import csv
import fcntl
import logging
import os
import select
import shutil
import signal
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import data  # noqa: E402
import machine  # noqa: E402
import models  # noqa: E402
from config import UserError  # noqa: E402
from fileio import atomic_write  # noqa: E402
from models import OUTPUT_NAMES  # noqa: E402

D_LOSS_NAMES = ("D_A", "D_B")
G_TOTAL = "G_total"
G_LOSS_NAMES = OUTPUT_NAMES + (G_TOTAL,)
LOSS_NAMES = D_LOSS_NAMES + G_LOSS_NAMES
PROGRESS_NAMES = D_LOSS_NAMES + (G_TOTAL,)  # shown on the progress bar
MODEL_FILES = {"g_ab": "generatorAToB.h5", "g_ba": "generatorBToA.h5",
               "d_a": "discriminatorA.h5", "d_b": "discriminatorB.h5"}


class ImagePool:
    """History of generated images (Shrivastava et al.), as in the paper.

    Until full, returns each new fake and stores it; then, with probability
    0.5, returns a stored fake and keeps the new one in its place.
    """

    def __init__(self, size, seed=0):
        self.size = size
        self.images = []
        self.rng = np.random.default_rng(seed)

    def query(self, batch):
        if self.size == 0:
            return batch
        out = []
        for image in np.asarray(batch):
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif self.rng.random() < 0.5:
                i = self.rng.integers(self.size)
                out.append(self.images[i])
                self.images[i] = image
            else:
                out.append(image)
        return np.stack(out)


def start_run(cfg, files_a, files_b, strategy=None):
    """A freshly seeded CycleGAN (in the strategy's scope), its two image pools
    and its endless batches, global ones under several replicas."""
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        gan = models.build_cyclegan(cfg)
    return (gan,) + start_data(cfg, files_a, files_b, strategy.num_replicas_in_sync)


def start_data(cfg, files_a, files_b, replicas=1):
    """Two empty image pools and endless batches, from the start of cfg.seed's order."""
    pools = (ImagePool(cfg.pool_size, cfg.seed), ImagePool(cfg.pool_size, cfg.seed + 1))
    return pools, iter(data.train_dataset(files_a, files_b, cfg, replicas))


def learning_rate(epoch, cfg):
    """Constant for cfg.epochs, then linear decay to zero over cfg.decay_epochs."""
    if epoch < cfg.epochs:
        return cfg.lr
    return cfg.lr * max(0.0, 1.0 - (epoch - cfg.epochs + 1) / (cfg.decay_epochs + 1))


def set_learning_rate(gan, value):
    for model in (gan.d_a, gan.d_b, gan.adversarial):
        model.optimizer.learning_rate.assign(value)


def build_optimizers(gan):
    """Create every optimizer slot now, so a checkpoint restores into them at once."""
    gan.set_discriminators_trainable(True)
    for d in (gan.d_a, gan.d_b):
        d.optimizer.build(d.trainable_variables)
    gan.set_discriminators_trainable(False)
    gan.adversarial.optimizer.build(gan.adversarial.trainable_variables)


def agreed_stop(strategy, requested):
    """The stop request of this process or, across several workers, of any of them.

    Every worker must stop after the same step, or the others would wait
    for it in the next step's all-reduce forever: one tiny all-reduce a step.
    """
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        votes = strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(float(requested is not None)))
        if strategy.reduce("SUM", votes, axis=None) > 0:
            return requested or "stop requested on another worker"
    return requested


def fit_batch(model, x, y):
    """One optimizer step of a compiled model; returns its losses as floats.

    With one replica this is plain `train_on_batch`. With several, Keras 3's
    `train_on_batch` would hand every replica the whole batch, so the model's
    own `train_step` runs on each replica's share of the batch (gradients are
    then all-reduced, as in `fit`).
    """
    strategy = model.distribute_strategy
    if model.train_function is None and model not in _REPLICATED_STEPS:
        # Create loss trackers and optimizer slots before the step is traced.
        # Keras would create them while tracing, which makes TensorFlow trace
        # the step a second time (half of a run's start-up, measured); under
        # several replicas they cannot be created in the replicated step at all.
        # Private Keras API: tests/test_training.py and test_distribute.py pin what it buys.
        with strategy.scope():
            model._symbolic_build(data_batch=(x, y, None))
    if strategy.num_replicas_in_sync == 1:
        logs = model.train_on_batch(x, y, return_dict=True)
    else:
        model.reset_metrics()  # as train_on_batch: losses of this batch only
        shards = tf.nest.map_structure(lambda t: split_across_replicas(strategy, t), (x, y))
        logs = replicated_train_function(model)(shards + (None,))
    return {k: float(v) for k, v in logs.items()}


_REPLICATED_STEPS = weakref.WeakKeyDictionary()


def replicated_train_function(model):
    """`model.train_step` on every replica, losses averaged over replicas; traced once per model.

    Keras 3's own train function cannot average scalar losses across
    several workers (it reduces them along an axis they do not have).
    """
    if model not in _REPLICATED_STEPS:
        strategy = model.distribute_strategy

        @tf.function(jit_compile=model.jit_compile)
        def train(data):
            logs = strategy.run(model.train_step, args=(data,))
            return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}
        _REPLICATED_STEPS[model] = train
    return _REPLICATED_STEPS[model]


def split_across_replicas(strategy, tensor):
    parts = tf.split(tensor, strategy.num_replicas_in_sync)
    return strategy.experimental_distribute_values_from_function(
        lambda context: parts[context.replica_id_in_sync_group])


def update_discriminator(d, real, fake, cfg):
    """One D update (joint) or two (split, the chapter's); returns the D loss."""
    ones = tf.ones((real.shape[0],) + tuple(d.output.shape[1:]))
    if cfg.d_update == "joint":
        # mse over real and fake together is half their sum: the paper's halved loss.
        return fit_batch(d, tf.concat([real, fake], 0), tf.concat([ones, 0 * ones], 0))["loss"]
    return 0.5 * (fit_batch(d, real, ones)["loss"] + fit_batch(d, fake, 0 * ones)["loss"])


@contextlib.contextmanager
def timed_part(times, part):
    """Adds the seconds of the block to times[part] (no-op when times is None).

    The losses fit_batch returns are host floats, so each update is done when
    its block ends; a block that only hands on tensors is counted where they are used.
    """
    start = time.perf_counter()
    yield
    if times is not None:
        times[part] = times.get(part, 0.0) + time.perf_counter() - start


def train_step(gan, real_a, real_b, pools, cfg, times=None):
    """One CycleGAN iteration in the official implementation's order: both generators,
    then both discriminators on the fakes the generators' update computed.

    The adversarial model keeps those fakes, so they cost no second pass;
    under several replicas, where each replica holds only its share, they
    are made by a separate inference pass before the generators change.
    With a dict as `times`, adds the seconds of each part of the step to it.
    """
    replicated = gan.adversarial.distribute_strategy.num_replicas_in_sync > 1
    if replicated:
        with timed_part(times, "fakes_s"):
            fakes = gan.translate(real_a, real_b)
    gan.set_discriminators_trainable(False)
    with timed_part(times, "adversarial_update_s"):
        g = fit_batch(gan.adversarial, [real_a, real_b], gan.targets(real_a, real_b))
    with timed_part(times, "fakes_s"):
        fake_b, fake_a = fakes if replicated else gan.fakes_of_last_update()
        fake_a = pools[0].query(fake_a)
        fake_b = pools[1].query(fake_b)
    gan.set_discriminators_trainable(True)
    with timed_part(times, "discriminator_updates_s"):
        losses = {"D_A": update_discriminator(gan.d_a, real_a, fake_a, cfg),
                  "D_B": update_discriminator(gan.d_b, real_b, fake_b, cfg)}
    losses.update({name: g[f"{name}_loss"] for name in OUTPUT_NAMES})
    losses[G_TOTAL] = g["loss"]
    return losses


class TrainingDiverged(UserError):
    """A loss became NaN or infinite: stop before anything is saved."""
    exit_code = 3


def check_finite(losses, step):
    for name, value in losses.items():
        if not np.isfinite(value):
            raise TrainingDiverged(f"loss {name} became {value} at step {step}; training stopped, "
                                   "the last checkpoint and saved models are kept (try a lower --lr)")


class RunCheckpoint:
    """Everything a resume needs: networks, optimizer states, step, image pools, data position.

    Pools live in NumPy while training and are copied into variables only
    when a checkpoint is written or read.
    """

    def __init__(self, gan, pools, data_iterator, folder, image_size, keep=3):
        build_optimizers(gan)
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
            for partial in Path(self.manager.directory).glob(f"ckpt-{step}_temp*"):
                shutil.rmtree(partial, ignore_errors=True)
            reason = str(getattr(error, "message", error)).rsplit("; ", 1)[-1].split(" [Op:")[0]
            kept = self.manager.latest_checkpoint
            raise UserError(f"could not write the checkpoint of step {step} in "
                            f"{self.manager.directory} ({reason}; is the disk full?); "
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
                    warnings.warn(f"skipping damaged checkpoint {path} ({data.one_line(error)})",
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


class RunLock:
    """An exclusive lock on a run folder while this process works in it.

    The kernel drops the lock when the process ends, however it ends, so a
    killed run never leaves a stale lock behind.
    """
    FILE = ".lock"

    def __init__(self, folder):
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(folder / self.FILE, "a+")
        except OSError as error:
            raise UserError(f"cannot write the run folder {folder} ({error.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise UserError(f"run {folder.name!r} is in use by another process (pid {holder}); "
                            "wait for it to finish or stop it first") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def out_of_memory_as_user_error(cfg):
    """Running out of memory is the settings' fault: say which settings, in one line."""
    try:
        yield
    except (tf.errors.ResourceExhaustedError, MemoryError):
        raise UserError(f"out of memory with --image-size {cfg.image_size} and --batch-size "
                        f"{cfg.batch_size}; try a smaller --image-size or --batch-size") from None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """SIGINT/SIGTERM: a request the loop honours after its current step, saving a checkpoint.

    The loop marks the waits it may block in (`waiting`). A second signal,
    or the first while a wait lasts GRACE_S beyond it (plus twice the
    longest such wait so far), ends the process at once, saying so; a wait
    past machine.wait_timeout() ends it as an error. A thread of our own
    does this because Python runs a signal handler only when the main
    thread runs Python code, which it does not while blocked in TensorFlow
    (an iterator's next, a collective op); the C-level handler still writes
    each signal to the wakeup fd that thread reads.
    """
    GRACE_S = 10

    def __enter__(self):
        self.requested = None
        self.timeout_s = machine.wait_timeout()
        self.signals = []   # (signal, when) as the watcher received them
        self.wait = None    # (what, since) of the wait the main thread is in
        self.longest = {}   # what: the longest wait for it but the first, which includes tracing
        self.previous = {sig: signal.signal(sig, self.request) for sig in STOP_SIGNALS}
        self.reader, self.writer = os.pipe()
        os.set_blocking(self.writer, False)
        self.previous_fd = signal.set_wakeup_fd(self.writer, warn_on_full_buffer=False)
        self.watcher = threading.Thread(target=self.watch, daemon=True)
        self.watcher.start()
        return self

    def request(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self.previous_fd)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.close(self.writer)  # the watcher reads the end of the pipe and returns
        self.watcher.join()
        os.close(self.reader)

    @contextlib.contextmanager
    def waiting(self, what):
        """Marks a wait for `what` ("the next batch of training images") that may never end."""
        since = time.monotonic()
        self.wait = (what, since)
        try:
            yield
        finally:
            self.wait = None
            took = time.monotonic() - since
            self.longest[what] = max(self.longest[what], took) if what in self.longest else 0.0

    def waiting_for_workers(self, strategy):
        """`waiting` for the other workers, whose collective ops a step or a stop waits on."""
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return self.waiting("the other workers")
        return contextlib.nullcontext()

    def watch(self):
        while True:
            if select.select([self.reader], [], [], 1.0)[0]:
                received = os.read(self.reader, 64)
                if not received:
                    return
                self.signals += [(signal.Signals(n), time.monotonic()) for n in received
                                 if n in STOP_SIGNALS]
            self.check(time.monotonic())

    def check(self, now):
        if len(self.signals) > 1:
            sig = self.signals[1][0]
            self.end(f"{sig.name} again: stopped at once", 128 + sig)
        wait = self.wait  # read once: the main thread may end it meanwhile
        if wait is None:
            return
        what, since = wait
        if now - since > self.timeout_s:
            self.end(f"error: waited {self.timeout_s:g} s for {what} ({machine.TIMEOUT_VARIABLE} "
                     "sets how long); stopped", 2)
        if self.signals:
            sig, when = self.signals[0]
            if now - max(since, when) > self.GRACE_S + 2 * self.longest.get(what, 0.0):
                self.end(f"{sig.name}: still waiting for {what}; stopped", 128 + sig)

    @staticmethod
    def end(message, code):
        """Print one line and end the process now, whatever the main thread is doing."""
        sys.stdout.flush()
        print(f"\n{message} without a new checkpoint; the last one is kept (--resume continues "
              "from it)", file=sys.stderr, flush=True)
        os._exit(code)


# --- Logging -------------------------------------------------------------

class TensorBoardLogger:
    """Scalars, images and model graphs under log_dir/NAME for TensorBoard."""

    def __init__(self, log_dir, name):
        self.root = Path(log_dir) / name
        self.writer = tf.summary.create_file_writer(str(self.root))

    def scalars(self, values, step):
        with self.writer.as_default(step=step):
            for key, value in values.items():
                tf.summary.scalar(key, value)

    def image_file(self, tag, png_path, step):
        image = tf.io.decode_png(tf.io.read_file(str(png_path)), channels=3)
        with self.writer.as_default(step=step):
            tf.summary.image(tag, image[None])

    def graph(self, model):
        """The model's graph in the Graphs tab, as a run of its own."""
        spec = tf.TensorSpec((1,) + tuple(model.input.shape[1:]), model.input.dtype)
        graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
        writer = tf.summary.create_file_writer(str(self.root / f"graph_{model.name}"))
        with writer.as_default():
            tf.summary.graph(graph)
        writer.close()

    def flush(self):
        self.writer.flush()


class NoLogger:
    """TensorBoardLogger's interface for workers that write nothing (not the chief)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class LossHistory:
    """Per-epoch mean losses in a CSV, so curves survive restarts.

    Rewritten whole at each epoch (atomically); an epoch replayed after a
    resume replaces its earlier row.
    """

    def __init__(self, path):
        self.path = Path(path)

    def append(self, epoch, means):
        rows = self.read_rows() if self.path.exists() else {}
        rows[epoch] = [f"{means[k]:.6g}" for k in LOSS_NAMES]
        with atomic_write(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("epoch",) + LOSS_NAMES)
            writer.writerows([e] + values for e, values in sorted(rows.items()))

    def read_rows(self):
        with open(self.path, newline="") as f:
            return {int(r["epoch"]): [r[k] for k in LOSS_NAMES] for r in csv.DictReader(f)}

    def read(self):
        rows = sorted(self.read_rows().items())
        columns = {"epoch": np.array([e for e, _ in rows], float)}
        for i, name in enumerate(LOSS_NAMES):
            columns[name] = np.array([float(values[i]) for _, values in rows])
        return columns


def save_loss_curves(history, path):
    """Discriminator and generator loss curves per epoch, one picture."""
    columns = history.read()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name in D_LOSS_NAMES:
        axes[0].plot(columns["epoch"], columns[name], label=name)
    for name in G_LOSS_NAMES:
        axes[1].plot(columns["epoch"], columns[name], label=name)
    for ax, title in zip(axes, ("Discriminators", "Generators")):
        ax.set(title=title, xlabel="epoch", ylabel="mean loss")
        ax.legend(fontsize="small")
    save_figure(fig, path)


def save_figure(fig, path):
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix[1:], bbox_inches="tight")
    plt.close(fig)


def save_sample_grid(gan, batch_a, batch_b, path, title):
    """Rows: A, G_AB(A), G_BA(G_AB(A)) and B, G_BA(B), G_AB(G_BA(B)) per sample."""
    fake_b, fake_a = gan.translate(batch_a, batch_b)
    rec_a, rec_b = gan.translate(fake_a, fake_b)[::-1]
    rows = []
    # The two domains may offer different numbers of sample images.
    for i in range(max(len(batch_a), len(batch_b))):
        if i < len(batch_a):
            rows.append(((batch_a[i], "original A"), (fake_b[i], "generated B"),
                         (rec_a[i], "reconstructed A")))
        if i < len(batch_b):
            rows.append(((batch_b[i], "original B"), (fake_a[i], "generated A"),
                         (rec_b[i], "reconstructed B")))
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False,
                             layout="constrained")
    for ax_row, row in zip(axes, rows):
        for ax, (image, label) in zip(ax_row, row):
            ax.imshow(data.to_unit(image))
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, path)


def save_models(gan, folder):
    """The four networks as float32 .h5, each written whole before it replaces the last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gan.set_discriminators_trainable(True)  # a reloaded discriminator should train
    for attr, filename in MODEL_FILES.items():
        save_h5(models.float32_twin(getattr(gan, attr)), folder / filename)


def save_h5(model, path):
    """A model as .h5, written whole before it replaces an earlier file."""
    # .h5 on purpose (the chapter's format); Keras's "legacy format" note is noise here.
    with atomic_write(path) as tmp, silence_absl_warnings():
        model.save(tmp)


@contextlib.contextmanager
def silence_absl_warnings():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
