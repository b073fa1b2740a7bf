"""`python main.py benchmark`: how fast the real training step and input pipeline run.

Every figure comes from one run on one device, so ratios between them
(utilization, speedups, headroom) stay comparable across noisy machines.
"""
import dataclasses
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

import config
import cut
import data
import image_files
import machine

WARMUP_STEPS = 2       # the first step traces five functions; the second settles caches
MATMUL_SIZES = (512, 1024, 2048)
PIPELINE_BATCHES = 100


def conv_gflop(model, batch, size):
    """GFLOP of one forward pass, counted from the conv ops of its traced graph.

    Convolutions are nearly all of the arithmetic; norms and activations
    are left out.
    """
    spec = tf.TensorSpec((batch, size, size, 3))
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    flops = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":  # 2 * outputs * kernel taps * input channels
            kh, kw, cin, _ = op.inputs[1].shape
            flops += 2 * np.prod(op.outputs[0].shape) * kh * kw * cin
        elif op.type == "Conv2DBackpropInput":  # transposed conv: 2 * inputs * taps * outputs
            kh, kw, cout, _ = op.inputs[1].shape
            flops += 2 * np.prod(op.inputs[2].shape) * kh * kw * cout
    return flops / 1e9


def iteration_gflop(gan, cfg):
    """GFLOP of one train_step, from the forward passes the model says it makes (gan.passes)."""
    return sum(count * conv_gflop(network, cfg.batch_size, cfg.image_size)
               for network, count in gan.passes())


def machine_gflop_s(dtype="float32"):
    """Best dense matmul rate over MATMUL_SIZES in `dtype` on the default device.

    The yardstick for utilization, in the precision the run computes in: one
    size can be far from the best (210 against 420 GFLOP/s seen), which
    made utilization exceed 1.
    """
    return max(matmul_gflop_s(n, dtype) for n in MATMUL_SIZES)


def matmul_gflop_s(n, dtype, seconds=0.7):
    """The best rate of an n x n matmul in `dtype` over `seconds` of repeats."""
    a = tf.cast(tf.random.normal((n, n)), dtype)
    matmul = tf.function(lambda x: tf.reduce_sum(tf.cast(tf.matmul(x, x), tf.float32)))
    matmul(a).numpy()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        matmul(a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def timed(fn, repeats):
    """Seconds of each of `repeats` calls of fn."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class StepRun:
    """A fresh model for cfg (cut.model_class) and its real train_step on synthetic batches,
    warmed up.

    `parts` sums the seconds of each part of the step as measured inside it
    (train_step's `times`), over the timed steps only.
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.strategy = machine.make_strategy(cfg.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        self.gan = cut.model_class(cfg)(cfg, self.strategy)
        rng = np.random.default_rng(cfg.seed)
        shape = (cfg.batch_size * self.replicas, cfg.image_size, cfg.image_size, 3)
        self.real_a, self.real_b = (tf.constant(rng.uniform(-1, 1, shape), tf.float32) for _ in "AB")
        self.parts, self.times = {}, []
        timed(self.step, WARMUP_STEPS)
        self.parts.clear()

    def step(self):
        self.gan.train_step(self.real_a, self.real_b, self.parts)

    def time_steps(self, steps):
        self.times += timed(self.step, steps)

    def figures(self):
        """The step's figures: seconds, GFLOP, utilization, and where the time goes."""
        cfg, replicas, times = self.cfg, self.replicas, self.times
        seconds = statistics.median(times)
        gflop = iteration_gflop(self.gan, cfg) * replicas
        precision = machine.choose_precision(cfg.precision)[0]
        rate = machine_gflop_s(machine.POLICIES[precision].removeprefix("mixed_"))
        mean = statistics.fmean(times)
        parts = {name: total / len(times) for name, total in self.parts.items()}
        return {
            "device": tf.config.list_logical_devices()[-1].device_type,
            "model": cfg.model, "preset": cfg.preset, "image_size": cfg.image_size,
            "batch_size": cfg.batch_size * replicas, "replicas": replicas,
            "precision": precision, "jit_compile": cfg.jit_compile,
            "conv_gradients": machine.choose_conv_gradients(cfg.conv_gradients)[0],
            "seconds_per_iteration": seconds, "seconds_per_iteration_min": min(times),
            "seconds_per_iteration_max": max(times), "iterations_per_s": 1 / seconds,
            "images_per_s": 2 * cfg.batch_size * replicas / seconds, "gflop_per_iteration": gflop,
            "achieved_gflop_s": gflop / seconds, "machine_gflop_s": rate,
            "utilization": gflop / seconds / rate,
            # Means over the same steps, timed inside them: they add up to the mean step.
            "seconds_per_iteration_mean": mean, **parts, "other_s": mean - sum(parts.values()),
        }


def write_fake_dataset(folder, count, size=256):
    """`count` JPEGs per domain, like the official datasets' 256 px photos."""
    rng = np.random.default_rng(0)
    files = {}
    for domain in "AB":
        sub = Path(folder) / f"train{domain}"
        sub.mkdir(parents=True)
        base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        for i in range(count):
            image = np.roll(base, i, axis=1)  # distinct files, no generation cost
            tf.io.write_file(str(sub / f"{i:05d}.jpg"), tf.io.encode_jpeg(image))
        files[domain] = image_files.list_images(sub)
    return files


def pipeline_images_per_s(cfg, count, replicas):
    """Images per second out of the real training pipeline, reading real files."""
    with tempfile.TemporaryDirectory() as folder:
        files = write_fake_dataset(folder, count)
        batches = iter(data.train_dataset(files["A"], files["B"], cfg, replicas))
        for _ in range(5):
            next(batches)
        start = time.perf_counter()
        for _ in range(PIPELINE_BATCHES):
            next(batches)
        seconds = time.perf_counter() - start
    return 2 * cfg.batch_size * replicas * PIPELINE_BATCHES / seconds


def run_benchmark(cfg, steps, pipeline_images):
    """All figures of `main.py benchmark`, as an ordered dict."""
    run = StepRun(cfg)
    run.time_steps(steps)
    figures = run.figures()
    pipeline = pipeline_images_per_s(cfg, pipeline_images, run.replicas)
    return {
        **figures,
        "pipeline_images": pipeline_images, "pipeline_images_per_s": pipeline,
        "pipeline_headroom": pipeline / figures["images_per_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **({"peak_gpu_mb": tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20}
           if tf.config.list_logical_devices("GPU") else {}),
    }


def compare_precisions(cfg, steps):
    """float32 against --precision auto's choice, their steps interleaved one by one
    so that load from other programs falls on both alike."""
    runs = {"float32": StepRun(dataclasses.replace(cfg, precision="float32")),
            "auto": StepRun(dataclasses.replace(cfg, precision="auto"))}
    for _ in range(steps):
        for run in runs.values():
            run.time_steps(1)
    figures = {name: run.figures() for name, run in runs.items()}
    return {"float32": figures["float32"], "auto": figures["auto"],
            "auto_precision": figures["auto"]["precision"],
            "speedup_auto_vs_float32": (figures["float32"]["seconds_per_iteration"]
                                        / figures["auto"]["seconds_per_iteration"])}


def format_figures(figures, prefix=""):
    """One `name: value` line per figure (`group.name: value` inside a group)."""
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(format_figures(value, f"{prefix}{name}.") if isinstance(value, dict)
                     else f"{prefix}{name}: {show(value)}" for name, value in figures.items())


def command(args):
    """`main.py benchmark`: the figures of the step and pipeline, or float32 against auto."""
    cfg = config.from_flags(args)
    if args.steps < 1 or args.pipeline_images < 1:
        raise config.UserError("--steps and --pipeline-images must be at least 1")
    if args.compare:
        figures = compare_precisions(cfg, args.steps)
    else:
        figures = run_benchmark(cfg, args.steps, args.pipeline_images)
    print(json.dumps(figures, indent=2) if args.json else format_figures(figures))
