import subprocess
import sys

import numpy as np
import pytest

import keras

import models
import train_utils as tu
from config import make_config


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
    return models.build_cyclegan(make_config(image_size=32))


def test_sample_grid_is_written(small_gan, tmp_path):
    batch = np.zeros((2, 32, 32, 3), np.float32)
    path = tmp_path / "epoch_0001.png"
    tu.save_sample_grid(small_gan, batch, batch, path, "test")
    from PIL import Image
    assert Image.open(path).size[0] > 100
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_to_unit_maps_network_range_to_display_range():
    np.testing.assert_allclose(tu.to_unit(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 0.5, 1, 1])


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


def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return events


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
