import dataclasses

import numpy as np
import pytest

import keras

import config
from config import make_config
import models


def build(preset="book", **overrides):
    return make_config(preset, **overrides)


@pytest.mark.parametrize("size, patch", [(128, 7), (64, 3)])
def test_book_shapes(size, patch):
    cfg = build(image_size=size)
    g, d = models.build_generator(cfg), models.build_discriminator(cfg)
    x = np.zeros((2, size, size, 3), np.float32)
    assert g(x).shape == (2, size, size, 3)
    assert d(x).shape == (2, patch, patch, 1)


def test_generator_takes_any_size_divisible_by_4():
    g = models.build_generator(build(image_size=32))
    assert g.input.shape[1:] == (None, None, 3)
    assert g(np.zeros((1, 200, 300, 3), np.float32)).shape == (1, 200, 300, 3)


def test_global_skip_generator_starts_as_the_identity_and_reloads_in_plain_keras(tmp_path):
    g = models.build_generator(build(image_size=32, global_skip=True, precision="float32"))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(g(x, training=False), x, atol=1e-6)
    g.save(tmp_path / "g.h5")
    reloaded = keras.models.load_model(tmp_path / "g.h5", compile=False)
    assert reloaded(2 * x, training=False).numpy().max() <= 1.0  # clipped to the image range


def test_book_parameter_counts():
    cfg = build(image_size=128)
    # Generator, from the chapter's tables (IN = scale + offset per channel):
    #   7x7 conv 3->32: 7*7*3*32+32 = 4,736; IN 64
    #   3x3 conv 32->64: 9*32*64+64 = 18,496; IN 128
    #   3x3 conv 64->128: 9*64*128+128 = 73,856; IN 256
    #   6 residual blocks, each 2 x (9*128*128+128) convs + 2 x 4*128 BN = 296,192 -> 1,777,152
    #   transposed 3x3 128->64, no bias: 73,728; IN 128
    #   transposed 3x3 64->32, no bias: 18,432; IN 64
    #   7x7 conv 32->3: 7*7*32*3+3 = 4,707
    #   total 1,971,747
    assert models.build_generator(cfg).count_params() == 1_971_747
    # Discriminator: 4x4 convs 3->64 (3,136), 64->128 (131,200) + IN 256,
    #   128->256 (524,544) + IN 512, 256->512 (2,097,664) + IN 1,024, 512->1 (8,193)
    #   total 2,766,529
    assert models.build_discriminator(cfg).count_params() == 2_766_529


def test_paper_parameter_counts_match_official_implementation():
    cfg = build("paper", image_size=256)
    assert cfg.n_res_blocks == 9
    assert models.build_generator(cfg).count_params() == 11_378_179
    d = models.build_discriminator(cfg)
    assert d.count_params() == 2_764_737
    assert d.output.shape[1:] == (30, 30, 1)
    assert models.receptive_field(d) == 70
    small = build("paper", image_size=128)
    assert small.n_res_blocks == 6
    assert models.build_generator(small).count_params() == 7_837_699


def test_instance_norm_normalises_each_channel_over_height_and_width():
    cfg = build(image_size=32)
    layer = models.norm_layer("instance", cfg)
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 5.0, (2, 8, 6, 4)).astype(np.float32) * np.arange(1, 5)
    y = np.asarray(layer(x))
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(axis=(1, 2)), 1, atol=1e-2)
    assert layer.epsilon == 1e-5


def test_every_architecture_choice_has_a_builder():
    assert config.CHOICES["gen"] == tuple(models.GENERATORS)
    assert config.CHOICES["disc"] == tuple(models.DISCRIMINATORS)
    cfg = build(image_size=32)
    assert models.build_generator(cfg).name == "generator"
    book = models.build_discriminator(cfg).output.shape[1]
    patch70 = models.build_discriminator(dataclasses.replace(cfg, disc="patch70")).output.shape[1]
    assert patch70 > book  # its last block keeps the resolution


def test_a_saved_generator_that_holds_code_is_refused(tmp_path):
    """A downloaded .h5 with a Lambda layer (arbitrary Python) is never run: Keras's safe mode."""
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Lambda(lambda x: x * 1.0)(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "lambda.h5")
    with pytest.raises(config.UserError, match="not a loadable Keras model"):
        models.load_generator(tmp_path / "lambda.h5")


