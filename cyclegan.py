"""The CycleGAN being trained: its networks, compiled models, image pools, optimizers, step and state.

The chapter's design: two generators, two discriminators compiled for
`train_on_batch`, and the adversarial model, which trains both generators
against the six generator losses with the discriminators frozen. No
`keras.Model` holds that step, so this class does; the loop, the
checkpoints, the study, the benchmark and the report ask it, never its
networks. Another kind of model is a class of its own beside this one,
with the same verbs.
"""
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import conv_gradients
import machine
import models
import train_utils


class Output(NamedTuple):
    """One output of the adversarial model and the generator loss taken on it.

    `compute` builds the output from `t`, which holds the networks g_ab, g_ba,
    d_a, d_b and the tensors real_a, real_b, fake_a = g_ba(real_b), fake_b = g_ab(real_a).
    """
    name: str
    loss: str
    weight: Optional[str]  # the Config field that weights the loss; None: 1
    target: str            # "ones" (the discriminator's "real"), "real_A" or "real_B"
    compute: Callable


# The generator's losses, declared once: a new loss term is a new row.
OUTPUTS = (
    Output("adv_A", "mse", None, "ones", lambda t: t.d_a(t.fake_a)),
    Output("adv_B", "mse", None, "ones", lambda t: t.d_b(t.fake_b)),
    Output("cycle_A", "mae", "lambda_cycle", "real_A", lambda t: t.g_ba(t.fake_b)),
    Output("cycle_B", "mae", "lambda_cycle", "real_B", lambda t: t.g_ab(t.fake_a)),
    Output("identity_A", "mae", "lambda_identity", "real_A", lambda t: t.g_ba(t.real_a)),
    Output("identity_B", "mae", "lambda_identity", "real_B", lambda t: t.g_ab(t.real_b)),
)
OUTPUT_NAMES = tuple(o.name for o in OUTPUTS)
OUTPUT_LOSSES = tuple(o.loss for o in OUTPUTS)

D_LOSS_NAMES = ("D_A", "D_B")
G_TOTAL = "G_total"
G_LOSS_NAMES = OUTPUT_NAMES + (G_TOTAL,)
LOSS_NAMES = D_LOSS_NAMES + G_LOSS_NAMES  # what train_step returns


def loss_weights(cfg):
    """The weight of each output's loss, in OUTPUTS order."""
    return [float(getattr(cfg, o.weight)) if o.weight else 1.0 for o in OUTPUTS]


def learning_rate(epoch, cfg):
    """The learning rate of the 0-based `epoch`: constant for cfg.epochs, then a linear decay
    to zero over cfg.decay_epochs.

    --lr-schedule official runs it one epoch ahead, as the official train.py
    does: it calls update_learning_rate() at the start of each epoch, so
    epoch e (1-based) trains at the rate get_scheduler's rule gives e, not
    e - 1, and the last epoch trains at 0.
    """
    decayed = epoch + 1 - cfg.epochs + (cfg.lr_schedule == "official")
    return cfg.lr * max(0.0, 1.0 - max(0, decayed) / (cfg.decay_epochs + 1))


# Copies of a step's activations held at its peak (kept for the backward pass, and
# gradients), and what a run holds besides its tensors (compiled steps, the input pipeline,
# thread pools): fitted to measured peaks (docs/benchmarks.md#training-memory-on-a-cpu).
STEP_COPIES = 1.5
RUNTIME_BYTES = 400 * 2 ** 20
# A float32 weight in training: itself, its gradient and Adam's two moments.
BYTES_PER_WEIGHT = 16


def training_memory(cfg, generators, discriminators, generator_passes, discriminator_passes):
    """Bytes a training run of `cfg` adds at its peak step, about: the activations of the passes
    per image pair a generator update makes, the weights of its networks with their optimizer
    states, the image pools and the runtime."""
    with machine.dtype_policy(cfg.precision):
        g, d = models.build_generator(cfg, "g"), models.build_discriminator(cfg, "d")
    shape = (cfg.batch_size, cfg.image_size, cfg.image_size, 3)
    activations = (generator_passes * sum(machine.layer_output_bytes(g, shape))
                   + discriminator_passes * sum(machine.layer_output_bytes(d, shape)))
    weights = (generators * g.count_params() + discriminators * d.count_params()) * BYTES_PER_WEIGHT
    pools = 2 * cfg.pool_size * cfg.image_size ** 2 * 3 * 4
    return RUNTIME_BYTES + STEP_COPIES * activations + weights + pools


class ImagePool:
    """History of generated images (Shrivastava et al.), as in the paper.

    Until full, returns each new fake and stores it; then, with probability
    0.5, returns a stored fake and keeps the new one in its place.
    """

    def __init__(self, size, seed=0):
        self.size = size
        self.images = []
        self.rng = np.random.default_rng(seed)

    def query(self, batch):
        if self.size == 0:
            return batch
        out = []
        for image in np.asarray(batch):
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif self.rng.random() < 0.5:
                i = self.rng.integers(self.size)
                out.append(self.images[i])
                self.images[i] = image
            else:
                out.append(image)
        return np.stack(out)


class KeepLatest(layers.Layer):
    """Passes its input on and, when training, keeps a float32 copy of it.

    In the adversarial model it keeps the fakes that the generators' update
    computes, so the discriminator updates need no second pass to make them.
    """

    def __init__(self, shape, **kwargs):
        super().__init__(**kwargs)
        # Under several replicas the loop makes the fakes itself; the first replica's write is harmless.
        self.latest = self.add_weight(shape=shape, initializer="zeros", trainable=False,
                                      dtype="float32", aggregation="only_first_replica", name="latest")

    def call(self, inputs, training=False):
        if training:
            self.latest.assign(keras.ops.cast(inputs, "float32"))
        return inputs


def build_adversarial_model(g_ab, g_ba, d_a, d_b, cfg):
    """[real_A, real_B] -> the six generator-loss outputs, discriminators frozen."""
    shape = (cfg.image_size, cfg.image_size, 3)
    real_a = keras.Input(shape, name="real_A")
    real_b = keras.Input(shape, name="real_B")
    fake_b = KeepLatest((cfg.batch_size,) + shape, name="fake_B")(g_ab(real_a))
    fake_a = KeepLatest((cfg.batch_size,) + shape, name="fake_A")(g_ba(real_b))
    t = SimpleNamespace(g_ab=g_ab, g_ba=g_ba, d_a=d_a, d_b=d_b, real_a=real_a, real_b=real_b,
                        fake_a=fake_a, fake_b=fake_b)
    outputs = [layers.Identity(name=o.name)(o.compute(t)) for o in OUTPUTS]
    d_a.trainable = False
    d_b.trainable = False
    model = keras.Model([real_a, real_b], outputs, name="adversarial")
    model.compile(optimizer=models.make_optimizer(cfg), loss=list(OUTPUT_LOSSES),
                  loss_weights=loss_weights(cfg), jit_compile=cfg.jit_compile)
    return model


def update_discriminator(d, real, fake, cfg):
    """One D update (joint) or two (split, the chapter's); returns the D loss."""
    ones = tf.ones((real.shape[0],) + tuple(d.output.shape[1:]))
    if cfg.d_update == "joint":
        # mse over real and fake together is half their sum: the paper's halved loss.
        return train_utils.fit_batch(d, tf.concat([real, fake], 0),
                                     tf.concat([ones, 0 * ones], 0))["loss"]
    return 0.5 * (train_utils.fit_batch(d, real, ones)["loss"]
                  + train_utils.fit_batch(d, fake, 0 * ones)["loss"])


class CycleGAN:
    """Two generators, two compiled discriminators, one compiled adversarial model, two image
    pools, and the verbs that train, schedule, checkpoint, save and count them."""

    LOSS_NAMES = LOSS_NAMES
    # The loss curves' panels: the six terms on a scale of their own (beside the total they
    # would sit flat near zero); the progress bar shows the first two panels.
    LOSS_PANELS = (("Discriminators", D_LOSS_NAMES),
                   ("Generators: total (weighted sum)", (G_TOTAL,)),
                   ("Generators: each term, unweighted", OUTPUT_NAMES))
    PROGRESS_NAMES = D_LOSS_NAMES + (G_TOTAL,)
    NETWORKS = ("g_ab", "g_ba", "d_a", "d_b")

    def __init__(self, cfg, strategy=None):
        """Built inside `strategy`'s scope (the default: none), which places the weights and
        optimizer states on every replica."""
        self.cfg = cfg
        strategy = strategy or tf.distribute.get_strategy()
        with strategy.scope(), machine.dtype_policy(cfg.precision):
            self.g_ab = models.build_generator(cfg, "generator_AtoB")
            self.g_ba = models.build_generator(cfg, "generator_BtoA")
            self.d_a = models.build_discriminator(cfg, "discriminator_A")
            self.d_b = models.build_discriminator(cfg, "discriminator_B")
            conv_gradients.use(cfg.conv_gradients, (self.g_ab, self.g_ba, self.d_a, self.d_b))
            for d in (self.d_a, self.d_b):
                # Under mixed_float16 (not bfloat16), Keras 3 adds loss scaling to the optimizer itself.
                # A loss object, not "mse": Keras 3 cannot reload a .h5 compiled with the string.
                d.compile(optimizer=models.make_optimizer(cfg), loss=keras.losses.MeanSquaredError(),
                          jit_compile=cfg.jit_compile)
            self.adversarial = build_adversarial_model(self.g_ab, self.g_ba, self.d_a, self.d_b, cfg)
        self.strategy = strategy
        self.replicated = strategy.num_replicas_in_sync > 1
        self.empty_pools()
        self.pool_images = self.pool_counts = None  # state() makes them

        # Inference mode, as the chapter's `predict`, but one compiled call
        # for both directions instead of two `predict` runs per step.
        @tf.function(reduce_retracing=True, jit_compile=cfg.jit_compile)
        def translate(real_a, real_b):
            return self.g_ab(real_a, training=False), self.g_ba(real_b, training=False)
        self.translate = translate

    @classmethod
    def fresh(cls, cfg, strategy=None):
        """A CycleGAN with every random number seeded by cfg.seed."""
        keras.utils.set_random_seed(cfg.seed)
        return cls(cfg, strategy)

    # --- What others ask ------------------------------------------------------

    def generators(self):
        """(G_AB, G_BA): for scores and pictures."""
        return self.g_ab, self.g_ba

    def discriminators(self):
        """(D_A, D_B): for pictures of the graph."""
        return self.d_a, self.d_b

    @property
    def patch_shape(self):
        """Discriminator output shape (no batch axis): the shape of its labels."""
        return tuple(self.d_a.output.shape[1:])

    def sample_rows(self, batch_a, batch_b):
        """The sample grid's rows: A, G_AB(A), G_BA(G_AB(A)) and B, G_BA(B), G_AB(G_BA(B))."""
        fake_b, fake_a = self.translate(batch_a, batch_b)
        rec_a, rec_b = self.translate(fake_a, fake_b)[::-1]
        rows = []
        # The two domains may offer different numbers of sample images.
        for i in range(max(len(batch_a), len(batch_b))):
            if i < len(batch_a):
                rows.append(((batch_a[i], "original A"), (fake_b[i], "generated B"),
                             (rec_a[i], "reconstructed A")))
            if i < len(batch_b):
                rows.append(((batch_b[i], "original B"), (fake_a[i], "generated A"),
                             (rec_b[i], "reconstructed B")))
        return rows

    @staticmethod
    def memory_needed(cfg):
        """training_memory of a CycleGAN step: G_AB(A), G_BA(B), the two cycles and the two
        identity maps through the generators, the two fakes through the discriminators."""
        return training_memory(cfg, 2, 2, generator_passes=6, discriminator_passes=2)

    def passes(self):
        """(network, forward passes' worth of arithmetic) of one train_step, for the benchmark.

        In the adversarial update 6 G passes with weight gradients (forward +
        backward = 3 forwards) and 2 D passes with input gradients only (2x),
        4 D updates' worth of D passes (3x), and, under several replicas only,
        2 G forwards for the fakes.
        """
        return ((self.g_ab, 18 + (2 if self.replicated else 0)), (self.d_a, 16))

    # --- Training --------------------------------------------------------------

    def learning_rate(self, epoch):
        """The learning rate of 0-based `epoch` (learning_rate)."""
        return learning_rate(epoch, self.cfg)

    def set_learning_rate(self, value):
        for model in (self.d_a, self.d_b, self.adversarial):
            model.optimizer.learning_rate.assign(value)

    def set_discriminators_trainable(self, flag):
        # Keras 3 (unlike Keras 2) takes `trainable` from the moment a model's
        # train function is first built, not from compile: True before each
        # D update and False before each adversarial update keeps both right
        # whichever runs first.
        self.d_a.trainable = flag
        self.d_b.trainable = flag

    def fakes_of_last_update(self):
        """(fake_B, fake_A) as the last adversarial update computed them, before it changed G."""
        # Tensors, not the variables: a variable would make the D updates trace again.
        return tuple(tf.convert_to_tensor(self.adversarial.get_layer(name).latest)
                     for name in ("fake_B", "fake_A"))

    def targets(self, real_a, real_b):
        """The adversarial model's targets for a batch, in OUTPUTS order."""
        known = {"ones": tf.ones((real_a.shape[0],) + self.patch_shape),
                 "real_A": real_a, "real_B": real_b}
        return [known[o.target] for o in OUTPUTS]

    def train_step(self, real_a, real_b, times=None):
        """One CycleGAN iteration in the official implementation's order: both generators,
        then both discriminators on the fakes the generators' update computed; returns
        {LOSS_NAMES: float}.

        The adversarial model keeps those fakes, so they cost no second pass;
        under several replicas, where each replica holds only its share, they
        are made by a separate inference pass before the generators change.
        With a dict as `times`, adds the seconds of each part of the step to it.
        """
        timed_part = train_utils.timed_part
        if self.replicated:
            with timed_part(times, "fakes_s"):
                fakes = self.translate(real_a, real_b)
        self.set_discriminators_trainable(False)
        with timed_part(times, "adversarial_update_s"):
            g = train_utils.fit_batch(self.adversarial, [real_a, real_b], self.targets(real_a, real_b))
        with timed_part(times, "fakes_s"):
            fake_b, fake_a = fakes if self.replicated else self.fakes_of_last_update()
            fake_a = self.pools[0].query(fake_a)
            fake_b = self.pools[1].query(fake_b)
        self.set_discriminators_trainable(True)
        with timed_part(times, "discriminator_updates_s"):
            losses = {"D_A": update_discriminator(self.d_a, real_a, fake_a, self.cfg),
                      "D_B": update_discriminator(self.d_b, real_b, fake_b, self.cfg)}
        losses.update({name: g[f"{name}_loss"] for name in OUTPUT_NAMES})
        losses[G_TOTAL] = g["loss"]
        return losses

    def empty_pools(self):
        """Two empty image pools, seeded from cfg.seed."""
        self.pools = (ImagePool(self.cfg.pool_size, self.cfg.seed),
                      ImagePool(self.cfg.pool_size, self.cfg.seed + 1))

    # --- State and saving ------------------------------------------------------

    def state(self):
        """Everything training needs to continue, by name: the four networks, the three
        optimizers (their slots built) and the image pools' copies (store_pools, load_pools)."""
        if self.pool_images is None:
            self.build_optimizers()
            # Pools live in NumPy while training; these copies are for checkpoints only.
            size = (self.cfg.pool_size, self.cfg.image_size, self.cfg.image_size, 3)
            with self.strategy.scope():
                self.pool_images = [tf.Variable(tf.zeros(size)) for _ in self.pools]
                self.pool_counts = [tf.Variable(0, dtype=tf.int64) for _ in self.pools]
        return dict(g_ab=self.g_ab, g_ba=self.g_ba, d_a=self.d_a, d_b=self.d_b,
                    d_a_optimizer=self.d_a.optimizer, d_b_optimizer=self.d_b.optimizer,
                    adversarial_optimizer=self.adversarial.optimizer,
                    pool_images=self.pool_images, pool_counts=self.pool_counts)

    def build_optimizers(self):
        """Create every optimizer slot now, so a checkpoint restores into them at once."""
        self.set_discriminators_trainable(True)
        for d in (self.d_a, self.d_b):
            d.optimizer.build(d.trainable_variables)
        self.set_discriminators_trainable(False)
        self.adversarial.optimizer.build(self.adversarial.trainable_variables)

    def store_pools(self):
        """Copy the pools into their variables, before state() is written."""
        for pool, images, count in zip(self.pools, self.pool_images, self.pool_counts):
            if pool.images:
                images[:len(pool.images)].assign(np.stack(pool.images))
            count.assign(len(pool.images))

    def load_pools(self):
        """Take the pools from their variables, after state() was read."""
        for pool, images, count in zip(self.pools, self.pool_images, self.pool_counts):
            pool.images = list(images.numpy()[:int(count.numpy())])

    def save_networks(self, path_of):
        """The four networks as float32 .h5 at path_of(name), name in NETWORKS, each written
        whole before it replaces the last."""
        self.set_discriminators_trainable(True)  # a reloaded discriminator should train
        for name in self.NETWORKS:
            models.save_h5(models.float32_twin(getattr(self, name)), path_of(name))

    def describe(self):
        """Lines for `main.py summary`: the networks' sizes, the discriminator's patch, the losses."""
        lines = [f"{model.name} params={model.count_params()}"
                 for model in (self.g_ab, self.g_ba, self.d_a, self.d_b)]
        lines.append(f"discriminator output={'x'.join(map(str, self.patch_shape))} "
                     f"receptive_field={models.receptive_field(self.d_a)}px at "
                     f"{self.cfg.image_size}px input")
        lines += [f"adversarial output {output.name}: loss={output.loss} weight={weight:g}"
                  for output, weight in zip(OUTPUTS, loss_weights(self.cfg))]
        return lines

