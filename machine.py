"""What machine this is: the precision and the tf.distribute strategy a run computes with,
and the process-wide settings held for a while.

The one place that looks at the hardware (CPU flags, GPUs) and at TF_CONFIG;
the builders, the loop and the benchmark ask it.
"""
import contextlib

import keras
import tensorflow as tf

# Keras policies: float32 weights, optimizer and losses under each; norms compute in float32.
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
NATIVE_BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


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


def choose_precision(requested):
    """(precision, why) for --precision: auto is bfloat16 where it is native, else float32."""
    if requested != "auto":
        return requested, "as asked"
    native = native_bfloat16()
    if native:
        return "bfloat16", f"auto: native bfloat16 ({native})"
    return "float32", "auto: no native bfloat16 on this device"


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
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()
