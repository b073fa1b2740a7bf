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


def test_adversarial_model_outputs_losses_and_weights():
    cfg = build(image_size=32)
    gan = models.build_cyclegan(cfg)
    adv = gan.adversarial
    assert adv.output_names == ["adv_A", "adv_B", "cycle_A", "cycle_B", "identity_A", "identity_B"]
    assert list(adv.loss) == ["mse", "mse", "mae", "mae", "mae", "mae"]
    assert adv.get_compile_config()["loss_weights"] == [1, 1, 10, 10, 1, 1]
    assert [tuple(t.shape[1:]) for t in adv.outputs] == [gan.patch_shape] * 2 + [(32, 32, 3)] * 4
    real_a, real_b = np.full((2, 32, 32, 3), -0.5, np.float32), np.full((2, 32, 32, 3), 0.5, np.float32)
    targets = gan.targets(real_a, real_b)
    assert [tuple(t.shape[1:]) for t in targets] == [tuple(t.shape[1:]) for t in adv.outputs]
    assert [float(np.mean(t)) for t in targets] == pytest.approx([1.0, 1.0, -0.5, 0.5, -0.5, 0.5])
    # Each compiled model has an optimizer of its own, Adam(2e-4, beta_1=0.5).
    optimizers = [gan.d_a.optimizer, gan.d_b.optimizer, adv.optimizer]
    assert len({id(o) for o in optimizers}) == 3
    for opt in optimizers:
        assert isinstance(opt, keras.optimizers.Adam)
        assert float(opt.learning_rate) == pytest.approx(2e-4)
        assert opt.beta_1 == 0.5


def weights(model):
    return [w.copy() for w in model.get_weights()]


def changed(before, model):
    return any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_discriminators_train_only_in_their_own_step_and_generators_in_the_adversarial_step():
    """Keras 3 reads `trainable` at each train_on_batch: the loop must toggle it."""
    from train_utils import train_step, ImagePool
    cfg = build(image_size=32)
    keras.utils.set_random_seed(0)
    gan = models.build_cyclegan(cfg)
    rng = np.random.default_rng(0)
    a, b = (rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32) for _ in range(2))
    ones = np.ones((1,) + gan.patch_shape, np.float32)

    d_a, d_b, g_ab, g_ba = (weights(m) for m in (gan.d_a, gan.d_b, gan.g_ab, gan.g_ba))
    gan.set_discriminators_trainable(True)
    gan.d_a.train_on_batch(a, ones)
    gan.d_b.train_on_batch(b, ones)
    assert changed(d_a, gan.d_a) and changed(d_b, gan.d_b)
    assert not changed(g_ab, gan.g_ab) and not changed(g_ba, gan.g_ba)

    d_a, d_b, g_ab, g_ba = (weights(m) for m in (gan.d_a, gan.d_b, gan.g_ab, gan.g_ba))
    gan.set_discriminators_trainable(False)
    gan.adversarial.train_on_batch([a, b], [ones, ones, a, b, a, b])
    assert not changed(d_a, gan.d_a) and not changed(d_b, gan.d_b)
    assert changed(g_ab, gan.g_ab) and changed(g_ba, gan.g_ba)

    # The loop's step does the toggling: D and G both change over one step,
    # and G_total is the weighted sum of the six generator losses.
    before = [weights(m) for m in (gan.d_a, gan.d_b, gan.g_ab, gan.g_ba)]
    losses = train_step(gan, a, b, (ImagePool(0), ImagePool(0)), cfg)
    assert all(changed(w, m) for w, m in zip(before, (gan.d_a, gan.d_b, gan.g_ab, gan.g_ba)))
    assert set(losses) == {"D_A", "D_B", "adv_A", "adv_B", "cycle_A", "cycle_B",
                           "identity_A", "identity_B", "G_total"}
    assert all(np.isfinite(v) for v in losses.values())
    weighted = sum(w * losses[n] for w, n in zip(models.loss_weights(cfg), models.OUTPUT_NAMES))
    assert losses["G_total"] == pytest.approx(weighted, rel=1e-4)


def test_keras3_trap_a_discriminator_frozen_at_its_first_update_never_learns():
    """Why the loop toggles: Keras 3 fixes what train_on_batch trains at its first call."""
    cfg = build(image_size=32)
    d = models.build_discriminator(cfg)
    d.compile(optimizer=models.make_optimizer(cfg), loss="mse")
    d.trainable = False
    x = np.ones((1, 32, 32, 3), np.float32)
    before = weights(d)
    d.train_on_batch(x, np.ones((1,) + tuple(d.output.shape[1:]), np.float32))
    assert not changed(before, d)


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


@pytest.mark.parametrize("precision, compute", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                                ("float32", "float32")])
def test_precision_sets_compute_dtype_and_keeps_weights_outputs_and_losses_float32(precision, compute):
    gan = models.build_cyclegan(build(image_size=32, precision=precision))
    convs = [layer for layer in gan.g_ab.layers if isinstance(layer, keras.layers.Conv2D)]
    assert {layer.compute_dtype for layer in convs[:-1]} == {compute}
    networks = (gan.g_ab, gan.g_ba, gan.d_a, gan.d_b)
    assert {w.dtype for m in networks for w in m.weights} == {"float32"}
    assert {m.output.dtype for m in networks} == {"float32"}
    # Loss scaling only where float16's range needs it.
    scaled = isinstance(gan.adversarial.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "float16")


def test_adversarial_update_keeps_the_fakes_it_computed_before_changing_the_generators():
    """The discriminators train on these: no second generator pass per step, as in the official code."""
    cfg = build(image_size=32, filters=8, precision="float32")
    keras.utils.set_random_seed(0)
    gan = models.build_cyclegan(cfg)
    rng = np.random.default_rng(0)
    a, b = (rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32) for _ in range(2))
    expected = [np.asarray(gan.g_ab(a, training=True)), np.asarray(gan.g_ba(b, training=True))]
    ones = np.ones((1,) + gan.patch_shape, np.float32)
    g_ab = weights(gan.g_ab)
    gan.set_discriminators_trainable(False)
    gan.adversarial.train_on_batch([a, b], [ones, ones, a, b, a, b])
    assert changed(g_ab, gan.g_ab)
    for kept, fake in zip(gan.fakes_of_last_update(), expected):
        np.testing.assert_allclose(kept, fake, atol=1e-4)
    # Keeping them adds no trainable weight: the adversarial model trains both generators only.
    assert len(gan.adversarial.trainable_weights) == 2 * len(gan.g_ab.trainable_weights)


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
