"""Convolution gradients as forward convolutions: the same gradients as TensorFlow's, the same
training, and plain saved files."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import keras

import conv_gradients
import cyclegan
import machine
import models
from config import make_config


def gradients(conv, x, kernel, upstream):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = conv(x, kernel)
    return (y,) + tuple(tape.gradient(y, [x, kernel], output_gradients=upstream))


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("kernel_size", [1, 3, 4, 7])
@pytest.mark.parametrize("channels_in, channels_out", [(3, 5), (20, 17)])
def test_gradients_equal_tensorflows(padding, kernel_size, channels_in, channels_out):
    rng = np.random.default_rng(kernel_size)
    x = tf.constant(rng.normal(size=(2, 11, 9, channels_in)), tf.float32)  # batch 2, not square
    kernel = tf.constant(rng.normal(size=(kernel_size, kernel_size, channels_in, channels_out)),
                         tf.float32)
    out_shape = tf.nn.conv2d(x, kernel, 1, padding).shape
    upstream = tf.constant(rng.normal(size=out_shape), tf.float32)
    ours = gradients(lambda a, b: conv_gradients.conv2d(a, b, padding), x, kernel, upstream)
    theirs = gradients(lambda a, b: tf.nn.conv2d(a, b, 1, padding), x, kernel, upstream)
    for mine, reference in zip(ours, theirs):
        assert mine.shape == reference.shape
        scale = np.abs(reference).max()
        np.testing.assert_allclose(mine / scale, reference / scale, atol=1e-5)


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("kernel_size", [1, 3, 4])
@pytest.mark.parametrize("channels_in, channels_out", [(3, 5), (20, 17)])
def test_strided_gradients_equal_tensorflows(stride, kernel_size, channels_in, channels_out):
    rng = np.random.default_rng(kernel_size * stride)
    # Batch 2, not square; at every stride and kernel here some last rows or columns are never
    # read (their gradient is zero) and some phases have fewer taps than others.
    x = tf.constant(rng.normal(size=(2, 11, 10, channels_in)), tf.float32)
    kernel = tf.constant(rng.normal(size=(kernel_size, kernel_size, channels_in, channels_out)),
                         tf.float32)
    out_shape = tf.nn.conv2d(x, kernel, stride, "VALID").shape
    upstream = tf.constant(rng.normal(size=out_shape), tf.float32)
    ours = gradients(lambda a, b: conv_gradients.conv2d(a, b, "VALID", stride), x, kernel,
                     upstream)
    theirs = gradients(lambda a, b: tf.nn.conv2d(a, b, stride, "VALID"), x, kernel, upstream)
    for mine, reference in zip(ours, theirs):
        assert mine.shape == reference.shape
        scale = np.abs(reference).max()
        np.testing.assert_allclose(mine / scale, reference / scale, atol=1e-5)


def test_bfloat16_gradients_stay_close_to_float32s():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(1, 16, 16, 32)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 3, 32, 32)), tf.float32)
    upstream = tf.constant(rng.normal(size=(1, 14, 14, 32)), tf.float32)
    ours = gradients(lambda a, b: conv_gradients.conv2d(a, b, "VALID"), tf.cast(x, tf.bfloat16),
                     tf.cast(kernel, tf.bfloat16), tf.cast(upstream, tf.bfloat16))
    theirs = gradients(lambda a, b: tf.nn.conv2d(a, b, 1, "VALID"), x, kernel, upstream)
    for mine, reference in zip(ours, theirs):
        assert mine.dtype == tf.bfloat16
        scale = np.abs(reference).max()
        np.testing.assert_allclose(tf.cast(mine, tf.float32) / scale, reference / scale, atol=3e-2)


def paper_generator():
    # 16 filters: the stride-2 convs' inputs (16 and 32 channels) take the polyphase gradient.
    cfg = make_config("paper", image_size=32, filters=16, res_blocks=2, precision="float32")
    return cfg, models.build_generator(cfg)


def weight_gradients(model, x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True) ** 2)
    return tape.gradient(loss, model.trainable_variables)


def test_a_network_trains_on_the_same_gradients_and_saves_as_plain_keras(tmp_path):
    cfg, generator = paper_generator()
    plain = keras.models.clone_model(generator)
    plain.set_weights(generator.get_weights())
    settings = generator.get_config()
    assert conv_gradients.use("convolution", [generator]) == "convolution"
    covered = [layer for layer in generator.layers if conv_gradients.applies_to(layer)]
    # Both 7x7 convs, both stride-2 convs (zero-padded, then "valid") and every residual conv.
    assert len(covered) == 2 + 2 + 2 * cfg.res_blocks
    assert all("convolution_op" in vars(layer) for layer in covered)
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), tf.float32)
    ours, theirs = weight_gradients(generator, x), weight_gradients(plain, x)
    # One scale for all: the biases before an instance norm get only rounding noise.
    scale = max(np.abs(reference).max() for reference in theirs)
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine / scale, reference / scale, atol=1e-5)
    assert generator.get_config() == settings
    models.save_h5(generator, tmp_path / "g.h5")
    reloaded = keras.models.load_model(tmp_path / "g.h5", compile=False)
    assert all("convolution_op" not in vars(layer) for layer in reloaded.layers)
    np.testing.assert_allclose(reloaded(x), generator(x), atol=1e-6)


def test_a_discriminator_trains_on_the_same_gradients():
    cfg = make_config("paper", image_size=32, disc_filters=16, precision="float32")
    discriminator = models.build_discriminator(cfg)
    plain = keras.models.clone_model(discriminator)
    plain.set_weights(discriminator.get_weights())
    conv_gradients.use("convolution", [discriminator])
    covered = [layer for layer in discriminator.layers if "convolution_op" in vars(layer)]
    assert len(covered) == 5  # every 4x4 conv: three of stride 2, two of stride 1
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), tf.float32)
    ours, theirs = weight_gradients(discriminator, x), weight_gradients(plain, x)
    scale = max(np.abs(reference).max() for reference in theirs)
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine / scale, reference / scale, atol=1e-5)


def test_tensorflow_leaves_the_layers_alone():
    _, generator = paper_generator()
    assert conv_gradients.use("tensorflow", [generator]) == "tensorflow"
    assert not any("convolution_op" in vars(layer) for layer in generator.layers)


@pytest.mark.parametrize("cpu, onednn, choice", [
    (True, False, "convolution"), (True, True, "tensorflow"), (False, False, "tensorflow")])
def test_auto_chooses_convolution_only_on_a_cpu_without_onednn(monkeypatch, cpu, onednn, choice):
    monkeypatch.setattr(machine, "on_cpu", lambda: cpu)
    monkeypatch.setattr(machine, "onednn_ops", lambda: onednn)
    assert machine.choose_conv_gradients("auto")[0] == choice
    for asked in ("tensorflow", "convolution"):
        assert machine.choose_conv_gradients(asked) == (asked, "as asked")


@pytest.mark.slow
def test_a_cyclegan_trains_alike_with_either_gradient():
    cfg = make_config("paper", image_size=32, filters=4, disc_filters=4, res_blocks=2,
                      precision="float32", pool_size=0)
    rng = np.random.default_rng(0)
    batches = [tuple(tf.constant(rng.uniform(-1, 1, (1, 32, 32, 3)), tf.float32) for _ in "AB")
               for _ in range(3)]
    losses = {}
    for choice in ("tensorflow", "convolution"):
        gan = cyclegan.CycleGAN.fresh(dataclasses.replace(cfg, conv_gradients=choice))
        losses[choice] = [gan.train_step(a, b) for a, b in batches]
    for theirs, ours in zip(losses["tensorflow"], losses["convolution"]):
        for name, value in theirs.items():
            assert ours[name] == pytest.approx(value, rel=1e-3, abs=1e-6), name

