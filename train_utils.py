"""The training loop's pieces: one optimizer step of a compiled model on every replica, timing,
the loss check, and the stop a signal or another worker asks for."""
import contextlib
import os
import select
import signal
import sys
import threading
import time
import weakref

import numpy as np
import tensorflow as tf

import fileio
import machine
import config
from config import UserError


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


class TrainingDiverged(UserError):
    """A loss became NaN or infinite: stop before anything is saved."""
    exit_code = 3


def check_finite(losses, step, kept=None):
    """Raise TrainingDiverged if a loss is not finite; `kept()`, if given, says what the run keeps."""
    for name, value in losses.items():
        if not np.isfinite(value):
            raise TrainingDiverged(f"loss {name} became {value} at step {step}; training stopped"
                                   + (f", {kept()}" if kept else "") + " (try a lower --lr)")


def check_training_memory(cfg, needed):
    """On a CPU, where running out of memory kills the process with no word, a run whose
    step would take `needed` bytes, more than free memory, is refused beforehand, in one line."""
    free = machine.available_memory() if machine.on_cpu() else None
    if free is None:
        return
    if needed > free:
        raise UserError(f"a training step with --image-size {cfg.image_size} and --batch-size "
                        f"{cfg.batch_size} needs about {needed / 2 ** 30:.1f} GiB, more than the "
                        f"{free / 2 ** 30:.1f} GiB of free memory; try a smaller --image-size "
                        "or --batch-size")


@contextlib.contextmanager
def out_of_memory_as_user_error(cfg):
    """Running out of memory is the settings' fault: say which settings, in one line.

    TensorFlow raises the same error for a full disk, where smaller settings would not help.
    """
    try:
        yield
    except (tf.errors.ResourceExhaustedError, MemoryError) as error:
        if fileio.stated_cause(error):
            raise UserError(f"a write failed ({fileio.stated_cause(error)}): "
                            f"{config.op_error_text(error)}") from None
        raise UserError(f"out of memory with --image-size {cfg.image_size} and --batch-size "
                        f"{cfg.batch_size}; try a smaller --image-size or --batch-size") from None


# SIGHUP: the terminal or SSH session the run started in was closed.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopOnSignal:
    """SIGINT/SIGTERM/SIGHUP: a request the loop honours after its current step, saving a
    checkpoint.

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
        self.terminals = [fd for fd in (1, 2) if os.isatty(fd)]  # asked now: not after a hang-up
        self.previous = {sig: signal.signal(sig, self.request) for sig in STOP_SIGNALS}
        self.reader, self.writer = os.pipe()
        os.set_blocking(self.writer, False)
        self.previous_fd = signal.set_wakeup_fd(self.writer, warn_on_full_buffer=False)
        self.watcher = threading.Thread(target=self.watch, daemon=True)
        self.watcher.start()
        return self

    def request(self, signum, frame):
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            detach_from_terminal(self.terminals)

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
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) takes no line: end anyway
            sys.stdout.flush()
            print(f"\n{message} without a new checkpoint; the last one is kept (--resume "
                  "continues from it)", file=sys.stderr, flush=True)
        os._exit(code)


def detach_from_terminal(fds):
    """Point the file descriptors `fds` (stdout, stderr), a terminal, at /dev/null: after a
    hang-up, writing to the closed terminal fails (EIO), and the step's progress line would end
    the run before it saves. Nothing is flushed first: that would be such a write."""
    with open(os.devnull, "w") as devnull:
        for fd in fds:
            os.dup2(devnull.fileno(), fd)
