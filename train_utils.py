"""The chapter's training-loop pieces: the step, discriminator updates, image pool, schedule,
replicas, and the stop a signal asks for."""
import contextlib
import os
import select
import signal
import sys
import threading
import time
import weakref

import keras
import numpy as np
import tensorflow as tf

import data
import machine
import models
from config import UserError
from models import OUTPUT_NAMES

D_LOSS_NAMES = ("D_A", "D_B")
G_TOTAL = "G_total"
G_LOSS_NAMES = OUTPUT_NAMES + (G_TOTAL,)
LOSS_NAMES = D_LOSS_NAMES + G_LOSS_NAMES  # what train_step returns


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
    """The learning rate of the 0-based `epoch`: constant for cfg.epochs, then a linear decay
    to zero over cfg.decay_epochs.

    --lr-schedule official runs it one epoch ahead, as the official train.py
    does: it calls update_learning_rate() at the start of each epoch, so
    epoch e (1-based) trains at the rate get_scheduler's rule gives e, not
    e - 1, and the last epoch trains at 0.
    """
    decayed = epoch + 1 - cfg.epochs + (cfg.lr_schedule == "official")
    return cfg.lr * max(0.0, 1.0 - max(0, decayed) / (cfg.decay_epochs + 1))


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
