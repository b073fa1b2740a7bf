"""tf.distribute on two logical CPU devices, each test in a fresh process.

Logical devices must be set before TensorFlow touches a device, which the
rest of the suite has long done by the time these run.
"""
import subprocess
import sys
import textwrap

from conftest import ROOT, write_images

TWO_CPUS = f"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, {str(ROOT)!r})
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""


def run_python(code, cwd):
    result = subprocess.run([sys.executable, "-c", TWO_CPUS + textwrap.dedent(code)], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_mirrored_steps_match_one_device_with_the_same_global_batch(tmp_path):
    out = run_python("""
        import numpy as np, keras
        from config import make_config
        import models, train_utils as tu
        rng = np.random.default_rng(0)
        batches = [[rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32") for _ in "AB"] for _ in range(3)]

        def weights(gan):
            return [w for m in (gan.g_ab, gan.g_ba, gan.d_a, gan.d_b) for w in m.get_weights()]

        def weights_after(strategy, batch_size, images):
            # The four networks' weights before and after training from one seed.
            cfg = make_config(image_size=32, res_norm="instance", filters=8, batch_size=batch_size)
            keras.utils.set_random_seed(0)
            with strategy.scope():
                gan = models.build_cyclegan(cfg)
            before = weights(gan)
            for a, b in images:
                tu.train_step(gan, tf.constant(a), tf.constant(b), (tu.ImagePool(0), tu.ImagePool(0)), cfg)
            return before, weights(gan)

        mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert mirrored.num_replicas_in_sync == 2
        start, one = weights_after(tf.distribute.get_strategy(), 2, batches)
        _, two = weights_after(mirrored, 1, batches)  # 1 per replica: global batch 2
        gap = lambda x, y: np.mean([np.abs(p - q).mean() for p, q in zip(x, y)])
        print("mirrored", gap(one, two), "moved", gap(start, one))
    """, tmp_path)
    mirrored, moved = (float(out.split(word)[1].split()[0]) for word in ("mirrored", "moved"))
    # Split batches whose gradients are all-reduced land where one device lands,
    # a tiny fraction of the distance that training moved the weights.
    assert mirrored < 2e-5, out
    assert moved > 20 * mirrored, out


def test_a_short_mirrored_run_trains_saves_and_reloads(tmp_path):
    for i, sub in enumerate(("trainA", "trainB")):
        write_images(tmp_path / "data" / sub, 4, size=40, seed=i)
    out = run_python("""
        import main
        code = main.main(["--data", "data", "--image-size", "32", "--epochs", "1", "--filters", "8",
                          "--strategy", "mirrored", "--name", "m"])
        import keras
        g = keras.models.load_model("results/m/models/generatorAToB.h5")
        print("exit", code, "shape", tuple(g(keras.ops.zeros((1, 36, 44, 3))).shape))
    """, tmp_path)
    assert "2 replicas: global batch 2 per domain" in out
    assert "4 A and 4 B images, 2 steps per epoch" in out
    assert "exit 0 shape (1, 36, 44, 3)" in out
