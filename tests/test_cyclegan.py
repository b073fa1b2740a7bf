import numpy as np
import pytest

import keras

import cyclegan
import models
from config import make_config
from run_folder import RunFolder


def weights(model):
    return [w.copy() for w in model.get_weights()]


def changed(before, model):
    return any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_image_pool_off_returns_the_new_fakes():
    batch = np.ones((2, 4, 4, 3), np.float32)
    assert cyclegan.ImagePool(0).query(batch) is batch


def test_image_pool_fills_then_swaps_about_half_the_time():
    pool = cyclegan.ImagePool(5, seed=0)
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
    pool = cyclegan.ImagePool(size, seed=1)
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
    rates = {e: cyclegan.learning_rate(e, cfg) for e in (0, 99, 100, 150, 199)}
    assert rates[0] == rates[99] == pytest.approx(2e-4)
    assert rates[100] == pytest.approx(2e-4 * 100 / 101)
    assert rates[150] == pytest.approx(2e-4 * 50 / 101)
    assert rates[199] == pytest.approx(2e-4 / 101)
    assert cyclegan.learning_rate(5, make_config("book", epochs=10)) == pytest.approx(2e-4)
    # Without decay epochs, the documented schedule never trains an epoch at 0.
    assert cyclegan.learning_rate(199, make_config("book")) == pytest.approx(2e-4)


def test_official_learning_rate_schedule_runs_one_epoch_ahead():
    """The paper preset's schedule: the official train.py's (tests/test_parity.py checks
    every epoch against it); its last epoch trains at 0."""
    cfg = make_config("paper")
    assert cfg.lr_schedule == "official"
    documented = make_config("paper", lr_schedule="documented")
    for epoch in range(cfg.total_epochs - 1):
        assert cyclegan.learning_rate(epoch, cfg) == pytest.approx(
            cyclegan.learning_rate(epoch + 1, documented))
    assert cyclegan.learning_rate(98, cfg) == 2e-4 > cyclegan.learning_rate(99, cfg)
    assert cyclegan.learning_rate(cfg.total_epochs - 1, cfg) == 0


@pytest.mark.parametrize("mode", ["joint", "split"])
def test_discriminator_loss_is_the_mean_of_real_and_fake(mode):
    cfg = make_config(image_size=32, d_update=mode)
    keras.utils.set_random_seed(0)
    d = models.build_discriminator(cfg)
    d.compile(optimizer=models.make_optimizer(cfg), loss="mse")
    rng = np.random.default_rng(0)
    real, fake = (rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32) for _ in range(2))
    expected = 0.5 * (np.mean((np.asarray(d(real)) - 1) ** 2) + np.mean(np.asarray(d(fake)) ** 2))
    loss = cyclegan.update_discriminator(d, real, fake, cfg)
    if mode == "joint":  # one update, both halves judged by the same weights
        assert loss == pytest.approx(expected, rel=1e-4)
    else:  # the fake half is judged after the real update
        assert loss != pytest.approx(expected, rel=1e-6)


def cycle_losses(precision, steps=16):
    """Cycle losses over `steps` steps on one fixed pair (lr 1e-3, to learn fast), and the GAN."""
    import tensorflow as tf
    cfg = make_config(image_size=32, filters=8, precision=precision, lr=1e-3)
    keras.utils.set_random_seed(0)
    gan = cyclegan.CycleGAN(cfg)
    rng = np.random.default_rng(0)
    a, b = (tf.constant(rng.uniform(-1, 1, (1, 32, 32, 3)), tf.float32) for _ in "AB")
    losses = [gan.train_step(a, b) for _ in range(steps)]
    return [l["cycle_A"] + l["cycle_B"] for l in losses], gan, a


@pytest.mark.slow
def test_bfloat16_learns_as_float32_and_saves_float32_models_that_load_in_plain_keras(tmp_path):
    bf16, gan, a = cycle_losses("bfloat16")
    f32, _, _ = cycle_losses("float32")
    assert bf16[-1] < 0.8 * bf16[0]
    assert bf16[-1] == pytest.approx(f32[-1], rel=0.1)  # measured: 0.895 and 0.890
    folder = RunFolder(tmp_path, tmp_path, "run")
    folder.save_models(gan)
    for name in gan.NETWORKS:
        reloaded = keras.models.load_model(folder.model(name), compile=False)
        assert {layer.dtype_policy.name for layer in reloaded.layers} == {"float32"}
        assert {w.dtype for w in reloaded.weights} == {"float32"}
    g = keras.models.load_model(folder.model("g_ab"), compile=False)
    np.testing.assert_allclose(g(a), gan.g_ab(a, training=False), atol=0.05)  # bfloat16's rounding
    assert gan.g_ab.compute_dtype == "bfloat16"  # the live networks keep training in bfloat16


def test_adversarial_model_outputs_losses_and_weights():
    cfg = make_config(image_size=32)
    gan = cyclegan.CycleGAN(cfg)
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


@pytest.mark.slow
def test_discriminators_train_only_in_their_own_step_and_generators_in_the_adversarial_step():
    """Keras 3 reads `trainable` at each train_on_batch: the loop must toggle it."""
    cfg = make_config(image_size=32)
    keras.utils.set_random_seed(0)
    gan = cyclegan.CycleGAN(cfg)
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
    losses = gan.train_step(a, b)
    assert all(changed(w, m) for w, m in zip(before, (gan.d_a, gan.d_b, gan.g_ab, gan.g_ba)))
    assert set(losses) == {"D_A", "D_B", "adv_A", "adv_B", "cycle_A", "cycle_B",
                           "identity_A", "identity_B", "G_total"}
    assert all(np.isfinite(v) for v in losses.values())
    weighted = sum(w * losses[n] for w, n in zip(cyclegan.loss_weights(cfg), cyclegan.OUTPUT_NAMES))
    assert losses["G_total"] == pytest.approx(weighted, rel=1e-4)


@pytest.mark.parametrize("precision, compute", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                                ("float32", "float32")])
def test_precision_sets_compute_dtype_and_keeps_weights_outputs_and_losses_float32(precision, compute):
    gan = cyclegan.CycleGAN(make_config(image_size=32, precision=precision))
    convs = [layer for layer in gan.g_ab.layers if isinstance(layer, keras.layers.Conv2D)]
    assert {layer.compute_dtype for layer in convs[:-1]} == {compute}
    networks = (gan.g_ab, gan.g_ba, gan.d_a, gan.d_b)
    assert {w.dtype for m in networks for w in m.weights} == {"float32"}
    assert {m.output.dtype for m in networks} == {"float32"}
    # Loss scaling only where float16's range needs it.
    scaled = isinstance(gan.adversarial.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "float16")


@pytest.mark.slow
def test_adversarial_update_keeps_the_fakes_it_computed_before_changing_the_generators():
    """The discriminators train on these: no second generator pass per step, as in the official code."""
    cfg = make_config(image_size=32, filters=8, precision="float32")
    keras.utils.set_random_seed(0)
    gan = cyclegan.CycleGAN(cfg)
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


def test_keras3_trap_a_discriminator_frozen_at_its_first_update_never_learns():
    """Why the loop toggles: Keras 3 fixes what train_on_batch trains at its first call."""
    cfg = make_config(image_size=32)
    d = models.build_discriminator(cfg)
    d.compile(optimizer=models.make_optimizer(cfg), loss="mse")
    d.trainable = False
    x = np.ones((1, 32, 32, 3), np.float32)
    before = weights(d)
    d.train_on_batch(x, np.ones((1,) + tuple(d.output.shape[1:]), np.float32))
    assert not changed(before, d)
