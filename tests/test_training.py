import subprocess
import sys

import numpy as np
import pytest

import keras

import models
import train_utils as tu
from config import make_config
from conftest import ENV, ROOT, read_tensorboard


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


def test_learning_rate_constant_then_linear_decay_to_zero():
    cfg = make_config("paper")
    assert cfg.total_epochs == 200
    rates = {e: tu.learning_rate(e, cfg) for e in (0, 99, 100, 150, 199)}
    assert rates[0] == rates[99] == pytest.approx(2e-4)
    assert rates[100] == pytest.approx(2e-4 * 100 / 101)
    assert rates[150] == pytest.approx(2e-4 * 50 / 101)
    assert rates[199] == pytest.approx(2e-4 / 101)
    assert tu.learning_rate(5, make_config("book", epochs=10)) == pytest.approx(2e-4)


@pytest.fixture(scope="module")
def small_gan():
    keras.utils.set_random_seed(0)
    return models.build_cyclegan(make_config(image_size=32, precision="float32"))


def test_sample_grid_is_written(small_gan, tmp_path):
    batch = np.zeros((2, 32, 32, 3), np.float32)
    path = tmp_path / "epoch_0001.png"
    tu.save_sample_grid(small_gan, batch, batch, path, "test")
    from PIL import Image
    assert Image.open(path).size[0] > 100
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_saved_generator_loads_in_plain_keras_with_identical_output(small_gan, tmp_path):
    tu.save_models(small_gan, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(tu.MODEL_FILES.values())
    x = np.random.default_rng(0).uniform(-1, 1, (1, 200, 300, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = np.asarray(small_gan.g_ab(x, training=False))
    code = ("import numpy as np, keras;"
            f"m = keras.models.load_model(r'{tmp_path / 'generatorAToB.h5'}');"
            f"np.save(r'{tmp_path / 'y.npy'}', np.asarray(m(np.load(r'{tmp_path / 'x.npy'}'))))")
    # A bare interpreter in another folder: nothing of this project is importable.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)


def test_saved_discriminator_reloads_trainable(small_gan, tmp_path):
    small_gan.set_discriminators_trainable(False)
    tu.save_models(small_gan, tmp_path)
    assert keras.models.load_model(tmp_path / "discriminatorA.h5", compile=False).trainable


def test_loss_history_and_curves(tmp_path):
    history = tu.LossHistory(tmp_path / "losses.csv")
    for epoch in (1, 2, 3):
        history.append(epoch, {k: float(epoch) for k in tu.LOSS_NAMES})
    data = history.read()
    assert list(data["epoch"]) == [1, 2, 3] and list(data["D_A"]) == [1, 2, 3]
    tu.save_loss_curves(history, tmp_path / "loss_curves.png")
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_tensorboard_scalars_images_and_graphs(small_gan, tmp_path):
    logger = tu.TensorBoardLogger(tmp_path, "run")
    logger.scalars({"D_A": 0.5, "G_total": 3.0}, step=1)
    logger.scalars({"D_A": 0.25, "G_total": 2.0}, step=2)
    grid = tmp_path / "grid.png"
    tu.save_sample_grid(small_gan, np.zeros((1, 32, 32, 3), np.float32),
                        np.zeros((1, 32, 32, 3), np.float32), grid, "t")
    logger.image_file("samples", grid, step=2)
    logger.graph(small_gan.g_ab)
    logger.graph(small_gan.d_a)
    logger.flush()
    events = read_tensorboard(tmp_path / "run")
    d_a = events.Tensors("D_A")
    assert [e.step for e in d_a] == [1, 2]
    import tensorflow as tf
    assert [float(tf.make_ndarray(e.tensor_proto)) for e in d_a] == [0.5, 0.25]
    assert "samples" in events.Tags()["tensors"]
    for run in ("graph_generator_AtoB", "graph_discriminator_A"):
        assert read_tensorboard(tmp_path / "run" / run).Tags()["graph"]


def test_non_finite_loss_stops_training_with_its_name_and_step():
    tu.check_finite({"D_A": 0.5, "G_total": 3.0}, step=7)
    with pytest.raises(tu.TrainingDiverged, match="loss adv_B became nan at step 7"):
        tu.check_finite({"D_A": 0.5, "adv_B": float("nan")}, step=7)
    with pytest.raises(tu.TrainingDiverged, match="inf"):
        tu.check_finite({"G_total": float("inf")}, step=1)


def test_checkpoint_restores_weights_optimizer_moments_step_pools_and_data_position(tmp_path):
    import data
    from conftest import write_images
    cfg = make_config(image_size=32, pool_size=4)
    files_a = [str(p) for p in write_images(tmp_path / "A", 5, seed=1)]
    files_b = [str(p) for p in write_images(tmp_path / "B", 3, seed=2)]

    def fresh(seed):
        keras.utils.set_random_seed(seed)
        gan = models.build_cyclegan(cfg)
        pools = (tu.ImagePool(4, 0), tu.ImagePool(4, 1))
        batches = iter(data.train_dataset(files_a, files_b, cfg))
        return gan, pools, batches, tu.RunCheckpoint(gan, pools, batches, tmp_path / "ckpt", 32)

    gan, pools, batches, checkpoint = fresh(0)
    for _ in range(3):
        tu.train_step(gan, *next(batches), pools, cfg)
    checkpoint.save(3)
    expected_next = [b.numpy() for b in next(batches)]

    gan2, pools2, batches2, checkpoint2 = fresh(1)
    assert checkpoint2.restore() == 3
    for a, b in ((gan.g_ab, gan2.g_ab), (gan.d_b, gan2.d_b)):
        for x, y in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(x, y)
    for model, model2 in ((gan.adversarial, gan2.adversarial), (gan.d_a, gan2.d_a)):
        assert len(model.optimizer.variables) == len(model2.optimizer.variables) > 2
        for x, y in zip(model.optimizer.variables, model2.optimizer.variables):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for pool, pool2 in zip(pools, pools2):
        assert len(pool2.images) == len(pool.images) == 3
        np.testing.assert_array_equal(np.stack(pool.images), np.stack(pool2.images))
    for x, y in zip(expected_next, next(batches2)):
        np.testing.assert_array_equal(x, y.numpy())


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


def small_gan_and_checkpoint(tmp_path):
    import data
    from conftest import write_images
    cfg = make_config(image_size=32)
    files = [str(p) for p in write_images(tmp_path / "A", 2)]
    keras.utils.set_random_seed(0)
    gan = models.build_cyclegan(cfg)
    pools = (tu.ImagePool(0), tu.ImagePool(0))
    batches = iter(data.train_dataset(files, files, cfg))
    return gan, tu.RunCheckpoint(gan, pools, batches, tmp_path / "ckpt", 32)


def test_a_failed_checkpoint_write_cleans_up_and_a_damaged_one_falls_back(tmp_path):
    import resource
    gan, checkpoint = small_gan_and_checkpoint(tmp_path)
    checkpoint.save(1)
    checkpoint.save(2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))  # writes fail as on a full disk
    try:
        with pytest.raises(tu.UserError) as error:
            checkpoint.save(3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(error.value)
    assert "\n" not in message and "step 3" in message and "disk full" in message
    assert "ckpt-2 is kept" in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if "ckpt-3" in p.name) == []
    assert checkpoint.manager.latest_checkpoint.endswith("ckpt-2")

    checkpoint.save(3)
    damaged = next((tmp_path / "ckpt").glob("ckpt-3.data-*"))
    damaged.write_bytes(damaged.read_bytes()[:1000])  # truncated, as by a crash mid-copy
    with pytest.warns(tu.DamagedCheckpointWarning, match="ckpt-3"):
        assert checkpoint.restore() == 2
    for path in (tmp_path / "ckpt").glob("ckpt-[12].data-*"):
        path.write_bytes(b"")
    with pytest.warns(tu.DamagedCheckpointWarning), pytest.raises(tu.UserError, match="no checkpoint"):
        checkpoint.restore()


def test_a_checkpoint_of_the_pipeline_that_dropped_images_resumes_in_a_new_order(tmp_path,
                                                                                  monkeypatch):
    """Runs saved while the input pipeline still dropped what it could not read resume."""
    import tensorflow as tf
    batch = tf.data.Dataset.batch
    monkeypatch.setattr(tf.data.Dataset, "batch", lambda ds, *a, **k: batch(ds.ignore_errors(), *a, **k))
    gan, checkpoint = small_gan_and_checkpoint(tmp_path)
    for weight in gan.g_ab.weights:
        weight.assign(weight + 1.0)
    checkpoint.save(5)
    monkeypatch.undo()
    gan2, checkpoint2 = small_gan_and_checkpoint(tmp_path)
    with pytest.warns(tu.InputOrderWarning, match="ckpt-5"):
        assert checkpoint2.restore() == 5
    for x, y in zip(gan.g_ab.get_weights(), gan2.g_ab.get_weights()):
        np.testing.assert_array_equal(x, y)


def test_sample_grid_takes_domains_with_different_sample_counts(tmp_path):
    from PIL import Image
    cfg = make_config(image_size=32)
    gan = models.build_cyclegan(cfg)
    rng = np.random.default_rng(0)
    three, two = (rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32) for n in (3, 2))
    tu.save_sample_grid(gan, three, two, tmp_path / "grid.png", "3 A, 2 B")
    tu.save_sample_grid(gan, two, three, tmp_path / "grid2.png", "2 A, 3 B")
    for name in ("grid.png", "grid2.png"):
        Image.open(tmp_path / name).verify()


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
    tu.save_models(gan, tmp_path)
    for name in tu.MODEL_FILES.values():
        reloaded = keras.models.load_model(tmp_path / name, compile=False)
        assert {layer.dtype_policy.name for layer in reloaded.layers} == {"float32"}
        assert {w.dtype for w in reloaded.weights} == {"float32"}
    g = keras.models.load_model(tmp_path / "generatorAToB.h5", compile=False)
    np.testing.assert_allclose(g(a), gan.g_ab(a, training=False), atol=0.05)  # bfloat16's rounding
    assert gan.g_ab.compute_dtype == "bfloat16"  # the live networks keep training in bfloat16


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_saved_discriminators_reload_compiled_in_float32_and_train(tmp_path, precision):
    """Whatever the run's precision, a saved .h5 is float32 and a discriminator reloads compiled."""
    gan = models.build_cyclegan(make_config(image_size=32, filters=8, precision=precision))
    tu.save_models(gan, tmp_path)
    d = keras.models.load_model(tmp_path / tu.MODEL_FILES["d_a"])
    assert d.compiled and d.compute_dtype == "float32"
    assert isinstance(d.loss, keras.losses.MeanSquaredError)


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
