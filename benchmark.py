"""`python main.py benchmark`: how fast the real training step and input pipeline run.

Every figure comes from one run on one device, so ratios between them
(utilization, speedups, headroom) stay comparable across noisy machines.
"""
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

import data
import models
import train_utils as tu

WARMUP_STEPS = 2       # the first step traces five functions; the second settles caches
MATMUL_N = 2048
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
    """One train_step: 2 G forwards for the fakes, 4 D updates' worth of
    D passes (forward + backward = 3 forwards), and in the adversarial
    update 6 G passes with weight gradients (3x) and 2 D passes with input
    gradients only (2x)."""
    g = conv_gflop(gan.g_ab, cfg.batch_size, cfg.image_size)
    d = conv_gflop(gan.d_a, cfg.batch_size, cfg.image_size)
    return 20 * g + 16 * d


def machine_gflop_s(seconds=2.0):
    """Dense float32 matmul rate on the default device: the yardstick for utilization."""
    a = tf.random.normal((MATMUL_N, MATMUL_N))
    matmul = tf.function(lambda x: tf.reduce_sum(tf.matmul(x, x)))
    matmul(a).numpy()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        matmul(a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * MATMUL_N ** 3 / best / 1e9


def timed(fn, repeats):
    """Seconds of each of `repeats` calls of fn."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def step_times(gan, cfg, steps, replicas):
    """Seconds per real train_step on synthetic batches, after a warm-up."""
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.batch_size * replicas, cfg.image_size, cfg.image_size, 3)
    real_a, real_b = (tf.constant(rng.uniform(-1, 1, shape), tf.float32) for _ in "AB")
    pools = (tu.ImagePool(cfg.pool_size, 0), tu.ImagePool(cfg.pool_size, 1))
    run = lambda: tu.train_step(gan, real_a, real_b, pools, cfg)
    timed(run, WARMUP_STEPS)
    return timed(run, steps), real_a, real_b


def step_breakdown(gan, cfg, real_a, real_b, repeats=3):
    """Median seconds of each part of train_step, timed one part at a time."""
    fake_b, fake_a = gan.translate(real_a, real_b)

    def discriminators():
        gan.set_discriminators_trainable(True)
        tu.update_discriminator(gan.d_a, real_a, fake_a, cfg)
        tu.update_discriminator(gan.d_b, real_b, fake_b, cfg)

    def adversarial():
        gan.set_discriminators_trainable(False)
        tu.fit_batch(gan.adversarial, [real_a, real_b], gan.targets(real_a, real_b))

    parts = {"fakes_s": lambda: [t.numpy() for t in gan.translate(real_a, real_b)],
             "discriminator_updates_s": discriminators, "adversarial_update_s": adversarial}
    return {name: statistics.median(timed(fn, repeats)) for name, fn in parts.items()}


def fake_generation_speedup(gan, real_a, real_b, repeats=10):
    """The compiled translate call against the chapter's two `predict` calls."""
    compiled = lambda: [t.numpy() for t in gan.translate(real_a, real_b)]
    predict = lambda: (gan.g_ab.predict(real_a, verbose=0), gan.g_ba.predict(real_b, verbose=0))
    timed(compiled, 2)
    timed(predict, 2)
    return statistics.median(timed(predict, repeats)) / statistics.median(timed(compiled, repeats))


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
        files[domain] = data.list_images(sub)
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
    strategy = tu.make_strategy(cfg.strategy)
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        gan = models.build_cyclegan(cfg)
    times, real_a, real_b = step_times(gan, cfg, steps, replicas)
    seconds = statistics.median(times)
    gflop = iteration_gflop(gan, cfg) * replicas
    breakdown = step_breakdown(gan, cfg, real_a, real_b)
    machine = machine_gflop_s()
    images_per_s = 2 * cfg.batch_size * replicas / seconds
    pipeline = pipeline_images_per_s(cfg, pipeline_images, replicas)
    return {
        "device": tf.config.list_logical_devices()[-1].device_type,
        "preset": cfg.preset, "image_size": cfg.image_size,
        "batch_size": cfg.batch_size * replicas, "replicas": replicas,
        "mixed_precision": cfg.mixed_precision, "jit_compile": cfg.jit_compile,
        "seconds_per_iteration": seconds, "seconds_per_iteration_min": min(times),
        "seconds_per_iteration_max": max(times), "iterations_per_s": 1 / seconds,
        "images_per_s": images_per_s, "gflop_per_iteration": gflop,
        "achieved_gflop_s": gflop / seconds, "machine_gflop_s": machine,
        "utilization": gflop / seconds / machine,
        **breakdown,
        "other_s": seconds - sum(breakdown.values()),
        "fake_generation_speedup": fake_generation_speedup(gan, real_a, real_b),
        "pipeline_images": pipeline_images, "pipeline_images_per_s": pipeline,
        "pipeline_headroom": pipeline / images_per_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def format_figures(figures):
    """One `name: value` line per figure."""
    show = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(f"{name}: {show(value)}" for name, value in figures.items())
