"""tf.distribute on two logical CPU devices or two worker processes, each test in fresh processes.

Logical devices must be set before TensorFlow touches a device, which the
rest of the suite has long done by the time these run.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import ROOT, write_images
from train_utils import StopOnSignal

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


@pytest.mark.slow
def test_mirrored_steps_match_one_device_with_the_same_global_batch(tmp_path):
    out = run_python("""
        import numpy as np, keras
        from config import make_config
        import cyclegan
        rng = np.random.default_rng(0)
        batches = [[rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32") for _ in "AB"] for _ in range(3)]

        def weights(gan):
            return [w for m in (gan.g_ab, gan.g_ba, gan.d_a, gan.d_b) for w in m.get_weights()]

        def weights_after(strategy, batch_size, images):
            # The four networks' weights before and after training from one seed.
            cfg = make_config(image_size=32, res_norm="instance", filters=8, batch_size=batch_size,
                              precision="float32")
            keras.utils.set_random_seed(0)
            gan = cyclegan.CycleGAN(cfg, strategy)
            before = weights(gan)
            for a, b in images:
                gan.train_step(tf.constant(a), tf.constant(b))
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


@pytest.mark.slow
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


WORKER = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
import cyclegan, main
built = []
fresh = cyclegan.CycleGAN.fresh
cyclegan.CycleGAN.fresh = lambda *args: built.append(fresh(*args)) or built[-1]
code = main.main(sys.argv[2:])
g = built[0].g_ab
np.savez(sys.argv[1], *g.get_weights())
sys.exit(code)
"""


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_env(ports, index):
    """The environment of worker `index` of a cluster on loopback `ports`."""
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}


def start_workers(tmp_path, ports, flags):
    """Two training processes, each with its own TF_CONFIG and folder, as on two machines."""
    return [subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / f"weights{index}.npz")] + flags[index],
        cwd=tmp_path / f"machine{index}", env=worker_env(ports, index), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for index in range(2)]


def training_flags(tmp_path, name, epochs):
    """Tiny data on a path both machines share, a folder for each; their common flags."""
    for i, sub in enumerate(("trainA", "trainB")):
        write_images(tmp_path / "data" / sub, 4, size=40, seed=i)
    for index in range(2):
        (tmp_path / f"machine{index}").mkdir()
    return ["--data", str(tmp_path / "data"), "--image-size", "32", "--filters", "4",
            "--res-blocks", "1", "--epochs", str(epochs), "--strategy", "multiworker", "--name", name]


def read_until(process, text):
    """The process's output up to the line that holds `text`."""
    seen = ""
    while text not in seen:
        line = process.stdout.readline()
        assert line, seen
        seen += line
    return seen


def finish(workers):
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for worker, out in zip(workers, outputs):
        assert worker.returncode == 0, out
    return outputs


@pytest.mark.slow
def test_two_workers_train_in_step_stop_together_and_resume(tmp_path):
    flags = training_flags(tmp_path, "mw", 3)
    # A stop (SIGTERM to both, as a cluster manager sends it) during the second epoch.
    workers = start_workers(tmp_path, free_ports(2), [flags, flags])
    read_until(workers[0], "Epoch 2/3")
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    outputs = finish(workers)
    stops = [out.split(": checkpoint saved at step ")[1].split(";")[0] for out in outputs]
    assert stops[0] == stops[1] and int(stops[0]) >= 2, outputs  # the same step on both
    assert list((tmp_path / "machine1").iterdir()) == []  # the second worker wrote nothing

    # The resume: the second machine reads the chief's run folder (a shared file system).
    chief_results = str(tmp_path / "machine0" / "results")
    workers = start_workers(tmp_path, free_ports(2),
                            [flags + ["--resume"], flags + ["--resume", "--results-dir", chief_results]])
    outputs = finish(workers)
    assert all(f"Resuming run mw at step {stops[0]}." in out for out in outputs), outputs
    assert "Done: samples, loss curves and models in results/mw" in outputs[0]
    assert list((tmp_path / "machine1").iterdir()) == []
    saved = keras_weights(tmp_path / "machine0" / "results" / "mw" / "models" / "generatorAToB.h5")
    for weights in (np.load(tmp_path / f"weights{i}.npz") for i in range(2)):
        assert len(weights.files) == len(saved)
        for i, w in enumerate(saved):  # synchronous all-reduce: one set of weights everywhere
            np.testing.assert_allclose(weights[f"arr_{i}"], w, atol=1e-6)


def keras_weights(path):
    import keras
    return keras.models.load_model(path, compile=False).get_weights()


def lone_worker(tmp_path, timeout=None):
    """Worker 0 of two whose peer never starts, started as the command line is."""
    for i, sub in enumerate(("trainA", "trainB")):
        write_images(tmp_path / "data" / sub, 2, size=40, seed=i)
    ports = free_ports(2)
    env = worker_env(ports, 0)
    if timeout:
        env["CYCLEGAN_TIMEOUT"] = timeout
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--data", "data",
                                "--image-size", "32", "--strategy", "multiworker"],
                               cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    waiting = process.stdout.readline()
    assert waiting.startswith(f"Waiting for worker 1 at localhost:{ports[1]} (this is worker 0 at "
                              f"localhost:{ports[0]}), at most"), waiting + process.communicate()[1]
    return process, ports


@pytest.mark.slow
def test_a_worker_whose_peer_never_starts_says_which_and_gives_up_in_one_line(tmp_path):
    process, ports = lone_worker(tmp_path, timeout="5")
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert err.strip() == (f"error: worker 1 at localhost:{ports[1]} did not start within 5 s "
                           "(CYCLEGAN_TIMEOUT sets how long)"), err
    assert not (tmp_path / "results").exists()


def test_ctrl_c_ends_a_worker_waiting_for_its_peer(tmp_path):
    process, _ = lone_worker(tmp_path)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGINT and "Traceback" not in err, err


COLLECTIVE = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import machine, train_utils
strategy = machine.make_strategy("multiworker")
if sys.argv[1] == "1":
    print("ready", flush=True)
    time.sleep(600)  # alive, so no heartbeat is missed, but never in the all-reduce
with train_utils.StopOnSignal() as stop, stop.waiting_for_workers(strategy):
    print("ready", flush=True)
    train_utils.agreed_stop(strategy, None)
"""


@pytest.mark.slow
def test_ctrl_c_ends_a_worker_blocked_in_an_all_reduce_its_peer_never_joins(tmp_path):
    ports = free_ports(2)
    workers = [subprocess.Popen([sys.executable, "-c", COLLECTIVE, str(index)], cwd=tmp_path,
                                env=worker_env(ports, index), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for index in range(2)]
    try:
        for worker in workers:
            read_until(worker, "ready")
        time.sleep(1)  # worker 0 is in the all-reduce, inside TensorFlow
        workers[0].send_signal(signal.SIGINT)
        _, err = workers[0].communicate(timeout=StopOnSignal.GRACE_S + 30)
    finally:
        for worker in workers:
            worker.kill()
    assert workers[0].returncode == 128 + signal.SIGINT, err
    assert err.strip().splitlines()[-1].startswith(
        "SIGINT: still waiting for the other workers; stopped without a new checkpoint"), err


@pytest.mark.slow
def test_a_worker_that_dies_mid_run_is_named_in_one_line(tmp_path):
    flags = training_flags(tmp_path, "d", 50)
    ports = free_ports(2)
    workers = start_workers(tmp_path, ports, [flags, flags])
    try:
        read_until(workers[0], "Epoch 2/50")
        workers[1].kill()
        out = workers[0].communicate(timeout=180)[0]
    finally:
        for worker in workers:
            worker.kill()
    assert workers[0].returncode == 2, out
    assert out.strip().splitlines()[-1] == (
        f"error: worker 1 at localhost:{ports[1]} stopped answering; training stopped without a "
        "new checkpoint, the last one is kept: start every worker again with --resume"), out
    assert "Traceback" not in out
