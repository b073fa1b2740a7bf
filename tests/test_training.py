import subprocess
import sys

import numpy as np
import pytest

import keras

import models
import train_utils as tu
from config import make_config
from run_folder import MODEL_FILES, RunFolder
from conftest import ENV, ROOT


def test_image_pool_off_returns_the_new_fakes():
    batch = np.ones((2, 4, 4, 3), np.float32)
    assert tu.ImagePool(0).query(batch) is batch


def test_image_pool_fills_then_swaps_about_half_the_time():
    pool = tu.ImagePool(5, seed=0)
    fills = [pool.query(np.full((1, 2, 2, 3), i, np.float32))[0, 0, 0, 0] for i in range(5)]
    assert fills == [0, 1, 2, 3, 4]  # new fakes go straight through until full
    returned = [pool.query(np.full((1, 2, 2, 3), 100 + i, np.float32))[0, 0, 0, 0] for i in range(400)]
    old = sum(r < 100 + i for i, r in enumerate(returned))
    assert 150 < old < 250  # a stored fake in about half the queries
    assert len(pool.images) == 5
    stored = {float(im[0, 0, 0]) for im in pool.images}
    assert all(s >= 100 for s in stored)  # the history has been refreshed


def test_image_pool_once_full_returns_a_stored_fake_half_the_time_and_keeps_the_new_one_instead():
    """The official pool's statistics (the sequence is random in both implementations)."""
    size, queries = 50, 4000
    pool = tu.ImagePool(size, seed=1)
    for i in range(size):
        pool.query(np.full((1, 1, 1, 1), i, np.float32))
    swaps, replaced = 0, set()
    for i in range(size, size + queries):
        before = [float(im[0, 0, 0]) for im in pool.images]
        returned = float(pool.query(np.full((1, 1, 1, 1), i, np.float32))[0, 0, 0, 0])
        after = [float(im[0, 0, 0]) for im in pool.images]
        changed = [k for k in range(size) if before[k] != after[k]]
        if returned == i:  # the new fake, the pool as it was
            assert not changed
        else:  # a stored fake, the new one in its slot
            swaps += 1
            assert changed == [before.index(returned)] and after[changed[0]] == i
            replaced.add(changed[0])
    # Five standard deviations of a binomial(4000, 0.5) share: 0.04.
    assert abs(swaps / queries - 0.5) < 5 * np.sqrt(0.25 / queries)
    assert len(replaced) == size  # every slot is drawn: (49/50)^2000 of missing one


def test_learning_rate_constant_then_linear_decay_to_zero():
    cfg = make_config("paper", lr_schedule="documented")
    assert cfg.total_epochs == 200
    rates = {e: tu.learning_rate(e, cfg) for e in (0, 99, 100, 150, 199)}
    assert rates[0] == rates[99] == pytest.approx(2e-4)
    assert rates[100] == pytest.approx(2e-4 * 100 / 101)
    assert rates[150] == pytest.approx(2e-4 * 50 / 101)
    assert rates[199] == pytest.approx(2e-4 / 101)
    assert tu.learning_rate(5, make_config("book", epochs=10)) == pytest.approx(2e-4)
    # Without decay epochs, the documented schedule never trains an epoch at 0.
    assert tu.learning_rate(199, make_config("book")) == pytest.approx(2e-4)


def test_official_learning_rate_schedule_runs_one_epoch_ahead():
    """The paper preset's schedule: the official train.py's (tests/test_parity.py checks
    every epoch against it); its last epoch trains at 0."""
    cfg = make_config("paper")
    assert cfg.lr_schedule == "official"
    documented = make_config("paper", lr_schedule="documented")
    for epoch in range(cfg.total_epochs - 1):
        assert tu.learning_rate(epoch, cfg) == pytest.approx(tu.learning_rate(epoch + 1, documented))
    assert tu.learning_rate(98, cfg) == 2e-4 > tu.learning_rate(99, cfg)
    assert tu.learning_rate(cfg.total_epochs - 1, cfg) == 0


def test_non_finite_loss_stops_training_with_its_name_and_step():
    tu.check_finite({"D_A": 0.5, "G_total": 3.0}, step=7)
    with pytest.raises(tu.TrainingDiverged, match="loss adv_B became nan at step 7"):
        tu.check_finite({"D_A": 0.5, "adv_B": float("nan")}, step=7)
    with pytest.raises(tu.TrainingDiverged, match="inf"):
        tu.check_finite({"G_total": float("inf")}, step=1)


@pytest.mark.parametrize("mode", ["joint", "split"])
def test_discriminator_loss_is_the_mean_of_real_and_fake(mode):
    cfg = make_config(image_size=32, d_update=mode)
    keras.utils.set_random_seed(0)
    d = models.build_discriminator(cfg)
    d.compile(optimizer=models.make_optimizer(cfg), loss="mse")
    rng = np.random.default_rng(0)
    real, fake = (rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32) for _ in range(2))
    expected = 0.5 * (np.mean((np.asarray(d(real)) - 1) ** 2) + np.mean(np.asarray(d(fake)) ** 2))
    loss = tu.update_discriminator(d, real, fake, cfg)
    if mode == "joint":  # one update, both halves judged by the same weights
        assert loss == pytest.approx(expected, rel=1e-4)
    else:  # the fake half is judged after the real update
        assert loss != pytest.approx(expected, rel=1e-6)


def test_fit_batch_traces_a_models_train_step_once():
    """What fit_batch's private `_symbolic_build` call buys: one trace of the step, not two."""
    def counted_model():
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        model.compile(optimizer="adam", loss="mse")
        traces, step = [], model.train_step
        model.train_step = lambda batch: (traces.append(1), step(batch))[1]
        return model, traces

    x, y = np.ones((2, 4), np.float32), np.ones((2, 2), np.float32)
    plain, plain_traces = counted_model()
    ours, our_traces = counted_model()
    for _ in range(2):
        plain.train_on_batch(x, y)
        tu.fit_batch(ours, x, y)
    assert len(our_traces) == 1
    assert len(plain_traces) == 2, "Keras now traces once by itself: fit_batch's _symbolic_build can go"


def cycle_losses(precision, steps=16):
    """Cycle losses over `steps` steps on one fixed pair (lr 1e-3, to learn fast), and the GAN."""
    import tensorflow as tf
    cfg = make_config(image_size=32, filters=8, precision=precision, lr=1e-3)
    keras.utils.set_random_seed(0)
    gan = models.build_cyclegan(cfg)
    rng = np.random.default_rng(0)
    a, b = (tf.constant(rng.uniform(-1, 1, (1, 32, 32, 3)), tf.float32) for _ in "AB")
    pools = (tu.ImagePool(0), tu.ImagePool(0))
    losses = [tu.train_step(gan, a, b, pools, cfg) for _ in range(steps)]
    return [l["cycle_A"] + l["cycle_B"] for l in losses], gan, a


def test_bfloat16_learns_as_float32_and_saves_float32_models_that_load_in_plain_keras(tmp_path):
    bf16, gan, a = cycle_losses("bfloat16")
    f32, _, _ = cycle_losses("float32")
    assert bf16[-1] < 0.8 * bf16[0]
    assert bf16[-1] == pytest.approx(f32[-1], rel=0.1)  # measured: 0.895 and 0.890
    folder = RunFolder(tmp_path, tmp_path, "run")
    folder.save_models(gan)
    for name in MODEL_FILES:
        reloaded = keras.models.load_model(folder.model(name), compile=False)
        assert {layer.dtype_policy.name for layer in reloaded.layers} == {"float32"}
        assert {w.dtype for w in reloaded.weights} == {"float32"}
    g = keras.models.load_model(folder.model("g_ab"), compile=False)
    np.testing.assert_allclose(g(a), gan.g_ab(a, training=False), atol=0.05)  # bfloat16's rounding
    assert gan.g_ab.compute_dtype == "bfloat16"  # the live networks keep training in bfloat16


BLOCKED = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import tensorflow as tf
import train_utils as tu
os.mkfifo("fifo")  # nothing ever writes to it: reading it blocks inside TensorFlow
batches = iter(tf.data.Dataset.from_tensors("fifo").map(tf.io.read_file))
with tu.StopOnSignal() as stop, stop.waiting("a file that never comes"):
    print("waiting", flush=True)
    next(batches)
"""


@pytest.mark.parametrize("signals, timeout, code, words", [
    (["SIGTERM"], None, 143, "SIGTERM: still waiting for a file that never comes; stopped"),
    (["SIGINT", "SIGINT"], None, 130, "SIGINT again: stopped at once"),
    ([], "2", 2, "error: waited 2 s for a file that never comes (CYCLEGAN_TIMEOUT sets how long)"),
])
def test_a_wait_blocked_inside_tensorflow_still_ends_on_a_signal_or_its_deadline(
        tmp_path, signals, timeout, code, words):
    """A Python signal handler cannot run while the main thread blocks in TensorFlow."""
    import signal
    import time
    env = {**ENV, "CYCLEGAN_TIMEOUT": timeout} if timeout else ENV
    process = subprocess.Popen([sys.executable, "-c", BLOCKED], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == "waiting\n", process.communicate()
    for name in signals:
        time.sleep(0.5)
        process.send_signal(getattr(signal, name))
    _, err = process.communicate(timeout=tu.StopOnSignal.GRACE_S + 30)
    last = err.strip().splitlines()[-1]  # after TensorFlow's own start-up notes
    assert process.returncode == code, err
    assert last.startswith(words) and "without a new checkpoint; the last one is kept" in last, err
