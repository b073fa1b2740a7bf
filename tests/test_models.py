import dataclasses

import numpy as np
import pytest

import keras

import config
import cyclegan_layers
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


def pytorch_adam(gradients, lr, beta_1, beta_2, eps):
    """torch.optim.Adam's documented algorithm in float64, from a weight of 0."""
    m = v = theta = np.zeros_like(gradients[0], np.float64)
    for t, g in enumerate(gradients, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g ** 2
        theta = theta - lr * (m / (1 - beta_1 ** t)) / (np.sqrt(v / (1 - beta_2 ** t)) + eps)
    return theta


def test_adam_torch_steps_as_pytorchs_adam_and_keras_adam_does_not():
    # Gradients from 1 down to far below epsilon, each a different sign and size at each step.
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 1e-3, 1e-6, 3e-8, 1e-8, 3e-9, 1e-12, 0.0])
    gradients = [(scale * rng.uniform(-1, 1, scale.size)).astype(np.float32) for _ in range(5)]
    cfg = make_config("paper")
    expected = pytorch_adam([g.astype(np.float64) for g in gradients], cfg.lr, cfg.beta1, 0.999, cfg.adam_epsilon)
    results = {}
    for adam in ("torch", "keras"):
        optimizer = models.make_optimizer(dataclasses.replace(cfg, adam=adam))
        weight = keras.Variable(np.zeros(scale.size, np.float32))
        for g in gradients:
            optimizer.apply_gradients([(g, weight)])
        results[adam] = np.asarray(weight)
    # Float32 steps: a momentum of gradients of alternating sign cancels, so 1e-4 relative.
    np.testing.assert_allclose(results["torch"], expected.astype(np.float64), rtol=1e-4, atol=1e-12)
    # Keras adds epsilon to sqrt(v), not to sqrt(v_hat): in PyTorch's terms an epsilon
    # 1 / sqrt(1 - beta_2^t) times larger, 32 at the first step, so gradients near epsilon
    # take far smaller steps.
    near_epsilon = slice(3, 6)
    assert np.all(1.5 * np.abs(results["keras"][near_epsilon]) < np.abs(expected[near_epsilon]))
    assert isinstance(models.make_optimizer(cfg), cyclegan_layers.TorchAdam)
    assert type(models.make_optimizer(make_config("book"))) is keras.optimizers.Adam


def test_normal_init_draws_weights_from_n_0_0_02_and_zero_biases():
    """The paper's initialisation on the generator's widest conv (3x3x256x256, 590k weights)."""
    keras.utils.set_random_seed(0)
    generator = models.build_generator(make_config("paper"))
    widest = max((layer for layer in generator.layers if layer.weights),
                 key=lambda layer: layer.kernel.shape.num_elements())
    kernel = np.asarray(widest.kernel).ravel()
    n = kernel.size
    assert n == 3 * 3 * 256 * 256
    # Five standard errors: of the mean 0.02 / sqrt(n), of the standard deviation 0.02 / sqrt(2n).
    assert abs(kernel.mean()) < 5 * 0.02 / np.sqrt(n)
    assert abs(kernel.std() - 0.02) < 5 * 0.02 / np.sqrt(2 * n)
    # Normal, not uniform or truncated: 68.27 % within one sigma, 99.73 % within three.
    for sigmas, share in ((1, 0.6827), (3, 0.9973)):
        within = np.mean(np.abs(kernel) < sigmas * 0.02)
        assert abs(within - share) < 5 * np.sqrt(share * (1 - share) / n)
    for layer in generator.layers:
        if getattr(layer, "bias", None) is not None:
            assert not np.any(np.asarray(layer.bias)), layer.name


def test_the_generator_owns_the_multiple_its_sides_need():
    """config checks only the range; the generator's own strides say the multiple (4 for resnet)."""
    cfg = make_config(image_size=32, filters=4, res_blocks=1)
    assert models.size_multiple(models.build_generator(cfg)) == 4
    with pytest.raises(config.UserError, match="--image-size must be a multiple of 4 for this "
                                               "generator, got 34"):
        models.build_generator(dataclasses.replace(cfg, image_size=34))
