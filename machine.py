"""What machine this is: the precision and the tf.distribute strategy a run computes with,
and the process-wide settings held for a while.

The one place that looks at the hardware (CPU flags, GPUs) and at TF_CONFIG;
the builders, the loop and the benchmark ask it.
"""
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys

import keras
import tensorflow as tf

import config
from config import UserError

# Keras policies: float32 weights, optimizer and losses under each; norms compute in float32.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
NATIVE_BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Seconds to wait for the other workers, or for input, before giving up.
TIMEOUT_VARIABLE = "CYCLEGAN_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


def native_bfloat16(cpuinfo="/proc/cpuinfo"):
    """Why this machine computes bfloat16 natively, or None where it would emulate it (slowly)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:  # bfloat16 tensor cores from Ampere (compute capability 8.0) on
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        return f"GPU compute capability {capability}" if capability and capability >= (8, 0) else None
    flags = set()
    with contextlib.suppress(OSError), open(cpuinfo) as lines:
        for line in lines:
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
    found = [flag for flag in NATIVE_BFLOAT16_CPU_FLAGS if flag in flags]
    return "CPU with " + ", ".join(found) if found else None


def on_cpu():
    """Whether this process computes on the CPU, where running out of memory ends it (the
    kernel's kill) instead of raising an error: work that would not fit is refused beforehand."""
    return not tf.config.list_logical_devices("GPU")


def available_memory(meminfo="/proc/meminfo"):
    """Bytes the kernel can still hand out without swapping; None where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(meminfo) as lines:
        for line in lines:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def layer_output_bytes(model, shape):
    """Bytes of each layer's output for an input of `shape` (batch first), as computed."""
    every_layer = keras.Model(model.input, [layer.output for layer in model.layers[1:]])
    specs = every_layer.compute_output_spec(keras.KerasTensor(shape))
    return [math.prod(spec.shape) * tf.as_dtype(spec.dtype).size for spec in specs]


def choose_precision(requested):
    """(precision, why) for --precision: auto is bfloat16 where it is native, else float32."""
    if requested != "auto":
        return requested, "as asked"
    native = native_bfloat16()
    if native:
        return "bfloat16", f"auto: native bfloat16 ({native})"
    return "float32", "auto: no native bfloat16 on this device"


def onednn_ops():
    """Whether TensorFlow runs oneDNN's CPU ops (its choice: by default only on CPUs with
    AVX-512 VNNI, bfloat16 or AMX; TF_ENABLE_ONEDNN_OPTS overrides it)."""
    from tensorflow.python.util import _pywrap_util_port  # private: TensorFlow's own answer
    return _pywrap_util_port.IsMklEnabled()


def choose_conv_gradients(requested):
    """(choice, why) for --conv-gradients: auto is convolution on a CPU without oneDNN's ops,
    whose own gradient kernels are slow there (conv_gradients.py), else tensorflow."""
    if requested != "auto":
        return requested, "as asked"
    if not on_cpu():
        return "tensorflow", "auto: a GPU's own kernels"
    if onednn_ops():
        return "tensorflow", "auto: oneDNN's CPU kernels"
    return "convolution", "auto: a CPU without oneDNN's ops, whose gradient kernels are slow"


@contextlib.contextmanager
def temporarily(get, set, value):
    """A process-wide setting at `value` for the block, then back at what it was."""
    previous = get()
    set(value)
    try:
        yield
    finally:
        set(previous)


def dtype_policy(precision):
    """Layers built inside compute in `precision` (auto resolved for this device)."""
    return temporarily(keras.config.dtype_policy, keras.config.set_dtype_policy,
                       POLICIES[choose_precision(precision)[0]])


def make_strategy(name):
    """The tf.distribute strategy for --strategy; build models inside its scope."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return join_workers()
    return tf.distribute.get_strategy()


def wait_timeout():
    """$CYCLEGAN_TIMEOUT, or DEFAULT_TIMEOUT_S: how long any wait may last."""
    value = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise UserError(f"{TIMEOUT_VARIABLE} must be a number of seconds above 0, got {value!r}")
    return seconds


def tf_config():
    """TF_CONFIG as {task name: address} of its workers and the name of this one; None if unset.

    Checked here so that a mistake is one line, not a traceback from inside TensorFlow.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise UserError(f"TF_CONFIG is not JSON ({error})") from None
    try:
        cluster, kind, index = config["cluster"], config["task"]["type"], config["task"]["index"]
        workers = {f"{job} {i}": address for job in ("chief", "worker")
                   for i, address in enumerate(cluster.get(job, ()))}
        valid = isinstance(index, int) and all(isinstance(a, str) and ":" in a
                                               for a in workers.values())
    except (KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise UserError('TF_CONFIG must look like {"cluster": {"worker": ["HOST:PORT", ...]}, '
                        f'"task": {{"type": "worker", "index": 0}}}}, got {raw!a}')
    if f"{kind} {index}" not in workers:
        raise UserError(f"TF_CONFIG's task is {kind} {index}, which its cluster does not list "
                        f"({', '.join(workers) or 'no chief or worker'})")
    return workers, f"{kind} {index}"


def join_workers():
    """MultiWorkerMirroredStrategy, once every worker of TF_CONFIG has joined, or a one-line error."""
    config = tf_config()
    if config is None:
        return tf.distribute.MultiWorkerMirroredStrategy()  # one worker: this process
    workers, me = config
    others = {name: address for name, address in workers.items() if name != me}
    seconds = wait_timeout()
    try:
        with watchdog(seconds, others):
            print(f"Waiting for {', '.join(f'{n} at {a}' for n, a in others.items()) or 'no one'} "
                  f"(this is {me} at {workers[me]}), at most {seconds:g} s ({TIMEOUT_VARIABLE})",
                  flush=True)
            return tf.distribute.MultiWorkerMirroredStrategy()
    except tf.errors.OpError as error:
        raise UserError(f"could not join the workers of TF_CONFIG ({config.op_error_text(error)})") from None


# The watchdog's own process: it waits for its stdin to close; if that takes longer than
# its time, it names the workers nothing answers for and ends the process it watches.
WATCHDOG = """
import os, select, signal, socket, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches it too: the parent's
parent, seconds, variable, workers = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]
if select.select([sys.stdin], [], [], seconds)[0]:
    sys.exit()
silent = []
for name, address in zip(workers[::2], workers[1::2]):
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except (OSError, ValueError):
        silent.append(f"{name} at {address}")
who = ", ".join(silent) + " did not start" if silent else "the workers did not all join"
print(f"error: {who} within {seconds:g} s ({variable} sets how long)", file=sys.stderr, flush=True)
os.kill(parent, signal.SIGKILL)  # SIGTERM is TensorFlow's meanwhile
"""


@contextlib.contextmanager
def watchdog(seconds, workers):
    """Ends this process with one line if the block lasts over `seconds`; Ctrl-C ends it at once.

    Creating the strategy waits, inside TensorFlow and holding the GIL, for
    every worker to join: meanwhile no Python code of this process runs, no
    thread and no signal handler. So a process of its own watches the time,
    and SIGINT and SIGTERM keep their default effect, ending the process;
    but TensorFlow takes SIGTERM for its own preemption notices as it sets
    up, until the handlers are put back here.
    """
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGINT, signal.SIGTERM)}
    names = [part for name, address in workers.items() for part in (name, address)]
    child = subprocess.Popen([sys.executable, "-I", "-c", WATCHDOG, str(os.getpid()), str(seconds),
                              TIMEOUT_VARIABLE, *names], stdin=subprocess.PIPE)
    try:
        yield
    finally:
        child.stdin.close()
        child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def lost_workers_as_user_error():
    """A worker that stops answering aborts every collective op: say which, in one line."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as error:
        workers, me = tf_config() or ({}, None)
        # The tasks the message names, but for this one's devices and this one.
        named = re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)\b(?!/device)", str(error))
        tasks = [t for t in dict.fromkeys(f"{job} {task}" for job, task in named) if t != me]
        who = ", ".join(f"{t} at {workers[t]}" if t in workers else t for t in tasks)
        raise UserError(f"{who or f'another worker ({config.op_error_text(error)})'} stopped answering; "
                        "training stopped without a new checkpoint, the last one is kept: start "
                        "every worker again with --resume") from None
