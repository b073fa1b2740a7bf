"""CUT and FastCUT being trained (Park et al., 2020): one generator, one discriminator, the
patch head F, PatchNCE, and the verbs the loop, checkpoints, study and benchmark ask.

Contrastive unpaired translation drops CycleGAN's second generator and its
cycle: the content of A is kept by PatchNCE, which asks each patch of
G(A)'s encoder features to pick out, among the patches of the same image,
the patch of A's features at the same place. FastCUT is CUT without the
identity term, with flip equivariance and a tenfold NCE weight. What
differs from cyclegan.py's design, and why, is in docs/design.md.

`model_class` is the one place where --model picks the class being trained.
"""
import keras
import tensorflow as tf
from keras import layers

import config
import conv_gradients
import cyclegan
import machine
import models
import train_utils

# The official PatchNCE's value on the diagonal of the negatives (the positive pair itself).
DIAGONAL_LOGIT = -10.0
# The official L2 normalisation: x / (|x| + NORM_EPSILON).
NORM_EPSILON = 1e-7
# The official head's init: Xavier normal with gain 0.02 (Keras: variance scale gain^2, fan_avg).
HEAD_INIT_GAIN = 0.02


def model_class(cfg):
    """The class that trains cfg.model: cyclegan.CycleGAN or CUT."""
    return CUT if cfg.model in ("cut", "fastcut") else cyclegan.CycleGAN


def summary(args):
    """`main.py summary`: the networks' sizes, the discriminator's patch and the losses."""
    cfg = config.from_flags(args)
    print("\n".join(model_class(cfg)(cfg).describe()))


# --- PatchNCE -------------------------------------------------------------------

def l2_normalize(x):
    """Rows of x divided by their length (plus NORM_EPSILON), as the official head does."""
    return x / (tf.norm(x, axis=-1, keepdims=True) + NORM_EPSILON)


def patch_nce(feat_q, feat_k, batch, temperature, all_negatives=False):
    """Per-patch PatchNCE loss of (batch * patches, channels) query and key rows.

    Each query row's positive is the key row of the same patch; its negatives
    are the other patches' keys of the same image (of the whole batch with
    `all_negatives`). No gradient flows through the keys.
    """
    feat_k = tf.stop_gradient(feat_k)
    dim = feat_q.shape[-1]
    positive = tf.reduce_sum(feat_q * feat_k, axis=-1, keepdims=True)
    groups = 1 if all_negatives else batch
    q = tf.reshape(feat_q, (groups, -1, dim))
    k = tf.reshape(feat_k, (groups, -1, dim))
    negative = tf.matmul(q, k, transpose_b=True)
    patches = q.shape[1]
    negative = tf.where(tf.eye(patches, dtype=tf.bool)[None], DIAGONAL_LOGIT, negative)
    logits = tf.concat([positive, tf.reshape(negative, (-1, patches))], axis=1) / temperature
    # Cross-entropy with the positive (column 0) as the class.
    return tf.reduce_logsumexp(logits, axis=1) - logits[:, 0]


def sample_patches(features, patch_ids):
    """(batch * patches, channels) rows of NHWC `features` at the flat positions `patch_ids`,
    the same positions in every image, image by image."""
    batch, height, width, channels = features.shape
    flat = tf.reshape(features, (-1, height * width, channels))
    return tf.reshape(tf.gather(flat, patch_ids, axis=1), (-1, channels))


def encoder_points(generator, res_blocks):
    """The tensors of `generator` that the official --nce_layers numbers name.

    The official ResNet generator is a list of layers: 0 the padded image,
    then conv, norm, relu of each of the three encoder convs (its antialiased
    downsampling adds a fourth layer, 7 and 11, after the second and third,
    which here is the relu's output: these convs stride themselves), then
    the residual blocks from 12 on.
    """
    order = generator.layers
    convs = [i for i, layer in enumerate(order) if type(layer) is layers.Conv2D][:3]
    points = [order[convs[0]].input]
    for n, i in enumerate(convs):
        points += [order[i + k].output for k in range(3)]
        if n:
            points.append(order[i + 2].output)
    adds = [layer for layer in order if type(layer) is layers.Add][:res_blocks]
    return points + [layer.output for layer in adds]


def build_encoder(generator, cfg):
    """image -> the features at --nce-layers, sharing the generator's weights."""
    points = encoder_points(generator, cfg.n_res_blocks)
    return keras.Model(generator.input, [points[i] for i in config.nce_layers(cfg)],
                       name="nce_encoder")


def build_head(channels, width):
    """F: one two-layer MLP per feature layer, (rows, channels[n]) -> (rows, width).

    The official code creates it at the first batch, when PyTorch first
    knows the features' channels; Keras knows them from the graph, so it is
    built at once, and a checkpoint restores into it like any network.
    """
    init = keras.initializers.VarianceScaling(HEAD_INIT_GAIN ** 2, "fan_avg", "untruncated_normal")
    inputs, outputs = [], []
    for n, width_in in enumerate(channels):
        x = keras.Input((width_in,), name=f"features_{n}")
        inputs.append(x)
        y = layers.Dense(width, activation="relu", kernel_initializer=init, name=f"mlp_{n}_0")(x)
        outputs.append(layers.Dense(width, kernel_initializer=init, dtype="float32",
                                    name=f"mlp_{n}_1")(y))
    return keras.Model(inputs, outputs, name="patch_head")


def mse(prediction, target):
    return tf.reduce_mean(tf.square(tf.cast(prediction, tf.float32) - target))


class CUT:
    """G (A -> B), D_B compiled for train_on_batch, the head F, one Adam for G and F, a seeded
    random generator for patches and flips, and the verbs that train, schedule, checkpoint,
    save and count them."""

    NETWORKS = ("g_ab", "d_b", "f")

    def __init__(self, cfg, strategy=None):
        self.cfg = cfg
        self.strategy = strategy or tf.distribute.get_strategy()
        self.flip = cfg.flip_equivariance
        self.idt = cfg.nce_idt and cfg.lambda_nce > 0
        g_names = ("G_GAN", "NCE") + (("NCE_Y",) if self.idt else ())
        self.LOSS_NAMES = ("D",) + g_names + ("G_total",)
        self.LOSS_PANELS = (("Discriminator", ("D",)),
                            ("Generator: total (G_GAN + mean of the NCE terms)", ("G_total",)),
                            ("Generator: each term, weighted", g_names))
        self.PROGRESS_NAMES = ("D", "G_total")
        with self.strategy.scope(), machine.dtype_policy(cfg.precision):
            self.g_ab = models.build_generator(cfg, "generator_AtoB")
            self.d_b = models.build_discriminator(cfg, "discriminator_B")
            conv_gradients.use(cfg.conv_gradients, (self.g_ab, self.d_b))
            self.d_b.compile(optimizer=models.make_optimizer(cfg),
                             loss=keras.losses.MeanSquaredError(), jit_compile=cfg.jit_compile)
            self.encoder = build_encoder(self.g_ab, cfg)
            self.f = build_head([out.shape[-1] for out in self.encoder.outputs], cfg.nce_head)
            # One Adam over G and F is the official code's two: Adam is per weight, and both
            # take the same rate, betas and steps.
            self.optimizer = models.make_optimizer(cfg)
            if keras.config.dtype_policy().name == "mixed_float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.rng = tf.random.Generator.from_seed(cfg.seed)
        self.trained = self.g_ab.trainable_variables + self.f.trainable_variables
        self.translate_a = tf.function(lambda x: self.g_ab(x, training=False),
                                       reduce_retracing=True, jit_compile=cfg.jit_compile)
        self.generator_update = tf.function(self.update_generator, jit_compile=cfg.jit_compile)

    @classmethod
    def fresh(cls, cfg, strategy=None):
        """A CUT with every random number seeded by cfg.seed."""
        keras.utils.set_random_seed(cfg.seed)
        return cls(cfg, strategy)

    # --- What others ask ------------------------------------------------------

    def generators(self):
        """(G_AB, None): CUT has no B -> A generator."""
        return self.g_ab, None

    def discriminators(self):
        return (self.d_b,)

    @property
    def patch_shape(self):
        return tuple(self.d_b.output.shape[1:])

    @staticmethod
    def memory_needed(cfg):
        """cyclegan.training_memory of a CUT step: G on A (and on B for the identity term), the
        encoder again on G(A) (and G(B)), D on G(A); one generator and one discriminator."""
        images = 2 if cfg.nce_idt and cfg.lambda_nce > 0 else 1
        return cyclegan.training_memory(cfg, 1, 1, generator_passes=2 * images,
                                        discriminator_passes=1)

    def passes(self):
        """(network, forward passes' worth of arithmetic) of one train_step, for the benchmark.

        One G forward on A for D's fakes; D's update on real and fake B with
        weight gradients (2 x 3); in G's update, G on A (and B) with weight
        gradients (3 each), D on G(A) with input gradients (2), the encoder
        on A (and B) forward only and on G(A) (and G(B)) with gradients (3).
        The head's MLPs are negligible.
        """
        images = 2 if self.idt else 1
        return ((self.g_ab, 1 + 3 * images), (self.d_b, 8), (self.encoder, 4 * images))

    def sample_rows(self, batch_a, batch_b):
        """The sample grid's rows: A and G(A), and B and G(B), which the identity term
        (nce_idt) asks to stay B; there is no B -> A."""
        fake_b, same_b = self.translate_a(batch_a), self.translate_a(batch_b)
        return ([((a, "original A"), (b, "generated B")) for a, b in zip(batch_a, fake_b)]
                + [((b, "original B"), (s, "B through G")) for b, s in zip(batch_b, same_b)])

    # --- Training --------------------------------------------------------------

    def learning_rate(self, epoch):
        return cyclegan.learning_rate(epoch, self.cfg)

    def set_learning_rate(self, value):
        for optimizer in (self.d_b.optimizer, self.optimizer):
            optimizer.learning_rate.assign(value)

    def patch_ids(self, features):
        """Per feature layer, cfg.num_patches random flat positions (all of them if fewer)."""
        ids = []
        for feature in features:
            count = feature.shape[1] * feature.shape[2]
            order = tf.argsort(self.rng.uniform((count,)))
            ids.append(order[:min(self.cfg.num_patches, count)])
        return ids

    def nce(self, source, target, flipped):
        """The official calculate_NCE_loss: PatchNCE of G's features of `target` (queries,
        flipped back where the input was flipped) against those of `source` (keys), weighted,
        averaged over the layers."""
        cfg = self.cfg
        queries = self.encoder(target, training=True)
        queries = [tf.where(flipped, tf.reverse(q, [2]), q) for q in queries]
        keys = self.encoder(source, training=True)
        ids = self.patch_ids(keys)
        keys = self.f([sample_patches(k, i) for k, i in zip(keys, ids)], training=True)
        queries = self.f([sample_patches(q, i) for q, i in zip(queries, ids)], training=True)
        total = 0.0
        for q, k in zip(queries, keys):
            total += tf.reduce_mean(patch_nce(l2_normalize(q), l2_normalize(k), source.shape[0],
                                              cfg.nce_temperature)) * cfg.lambda_nce
        return total / len(queries)

    def update_generator(self, real_a, real_b, flipped):
        """One Adam step of G and F on G_GAN + the mean of the NCE terms; returns the losses."""
        cfg = self.cfg
        real = tf.concat([real_a, real_b], 0) if self.idt else real_a
        with tf.GradientTape() as tape:
            fake = self.g_ab(tf.where(flipped, tf.reverse(real, [2]), real), training=True)
            fake_b = fake[:real_a.shape[0]]
            losses = {"G_GAN": mse(self.d_b(fake_b, training=False), 1.0) * cfg.lambda_gan,
                      "NCE": self.nce(real_a, fake_b, flipped) if cfg.lambda_nce > 0 else 0.0}
            nce = losses["NCE"]
            if self.idt:
                losses["NCE_Y"] = self.nce(real_b, fake[real_a.shape[0]:], flipped)
                nce = (nce + losses["NCE_Y"]) / 2
            losses["G_total"] = losses["G_GAN"] + nce
            loss = losses["G_total"]
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                loss = self.optimizer.scale_loss(loss)
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.trained), self.trained))
        return losses

    def train_step(self, real_a, real_b, times=None):
        """One CUT iteration in the official order: D on real B and G(A), then G and F;
        returns {LOSS_NAMES: float}. With a dict as `times`, adds each part's seconds to it.

        FastCUT flips the step's input images left to right half the time.
        """
        timed_part = train_utils.timed_part
        flipped = (self.rng.uniform(()) < 0.5) if self.flip else tf.constant(False)
        with timed_part(times, "fakes_s"):
            fake_b = self.translate_a(tf.where(flipped, tf.reverse(real_a, [2]), real_a))
        with timed_part(times, "discriminator_updates_s"):
            d_loss = cyclegan.update_discriminator(self.d_b, real_b, fake_b, self.cfg)
        with timed_part(times, "generator_update_s"):
            losses = self.generator_update(real_a, real_b, flipped)
        return {"D": float(d_loss), **{k: float(v) for k, v in losses.items()}}

    def empty_pools(self):
        """CUT keeps no image pool (the official pool_size 0)."""

    def store_pools(self):
        pass

    def load_pools(self):
        pass

    # --- State and saving ------------------------------------------------------

    def state(self):
        """Everything training needs to continue, by name: G, D, F, both optimizers (their
        slots built) and the random generator of patches and flips."""
        self.d_b.optimizer.build(self.d_b.trainable_variables)
        self.optimizer.build(self.trained)
        return dict(g_ab=self.g_ab, d_b=self.d_b, f=self.f, d_b_optimizer=self.d_b.optimizer,
                    generator_optimizer=self.optimizer, rng=self.rng.state)

    def save_networks(self, path_of):
        """G, D and F as float32 .h5 at path_of(name), name in NETWORKS."""
        for name in self.NETWORKS:
            models.save_h5(models.float32_twin(getattr(self, name)), path_of(name))

    def describe(self):
        """Lines for `main.py summary`."""
        cfg = self.cfg
        lines = [f"{model.name} params={model.count_params()}"
                 for model in (self.g_ab, self.d_b, self.f)]
        lines.append(f"discriminator output={'x'.join(map(str, self.patch_shape))} "
                     f"receptive_field={models.receptive_field(self.d_b)}px at "
                     f"{cfg.image_size}px input")
        shapes = ", ".join(f"{i} ({out.shape[-1]} channels)"
                           for i, out in zip(config.nce_layers(cfg), self.encoder.outputs))
        lines.append(f"{cfg.model}: PatchNCE on layers {shapes}; {cfg.num_patches} patches, "
                     f"T {cfg.nce_temperature:g}, weight {cfg.lambda_nce:g}, identity term "
                     f"{'on' if self.idt else 'off'}, flip equivariance "
                     f"{'on' if self.flip else 'off'}; G_GAN weight {cfg.lambda_gan:g}")
        return lines
