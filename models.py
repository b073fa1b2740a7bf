"""Network builders: generators, PatchGAN discriminators, the adversarial model.

Every builder is a pure function of a `config.Config`; nothing here trains.
"""
import functools
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import machine
from config import UserError, make_config
from fileio import atomic_write
from cyclegan_layers import ReflectionPadding2D, TorchAdam


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


def loss_weights(cfg):
    """The weight of each output's loss, in OUTPUTS order."""
    return [float(getattr(cfg, o.weight)) if o.weight else 1.0 for o in OUTPUTS]


def kernel_init(cfg):
    if cfg.init == "normal":
        return keras.initializers.RandomNormal(0.0, 0.02)
    return "glorot_uniform"


def norm_layer(kind, cfg):
    """Instance norm is GroupNormalization with one group per channel.

    The chapter's `InstanceNormalization(axis=1)` on channels-last tensors
    normalised over image rows; this normalises each channel over H and W.
    """
    if kind == "batch":
        # Under a strategy, statistics of the global batch: every replica then keeps the
        # same running averages, as one device with the global batch would.
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5,
                                         synchronized=cfg.strategy != "default")
    return layers.GroupNormalization(
        groups=-1, epsilon=1e-5, center=cfg.norm_affine, scale=cfg.norm_affine)


def conv(x, filters, kernel, strides, cfg, use_bias=True, initializer=None):
    """A conv that keeps 'same' geometry with zero or reflection padding.

    On even sizes Keras' 'same' pads a stride-2 conv at the bottom and right
    only; PyTorch (alignment torch) pads every side, shifting the grid by half
    a pixel.
    """
    if cfg.padding == "reflect" and strides == 1 and kernel > 1:
        x = ReflectionPadding2D(kernel // 2)(x)
        padding = "valid"
    elif cfg.alignment == "torch" and strides > 1:
        x = layers.ZeroPadding2D(kernel // 2)(x)
        padding = "valid"
    else:
        padding = "same"
    return layers.Conv2D(filters, kernel, strides, padding=padding, use_bias=use_bias,
                         kernel_initializer=initializer or kernel_init(cfg))(x)


def conv_norm_relu(x, filters, kernel, strides, cfg):
    x = conv(x, filters, kernel, strides, cfg)
    x = norm_layer(cfg.norm, cfg)(x)
    return layers.Activation("relu")(x)


def residual_block(x, cfg):
    """Two 3x3 convs with a skip connection and no activation after the add."""
    width = x.shape[-1]
    y = conv(x, width, 3, 1, cfg)
    y = norm_layer(cfg.res_norm, cfg)(y)
    y = layers.Activation("relu")(y)
    y = conv(y, width, 3, 1, cfg)
    y = norm_layer(cfg.res_norm, cfg)(y)
    return layers.Add()([y, x])


def upsample_block(x, filters, cfg):
    """Doubles height and width: transposed conv, or resize then conv.

    A transposed conv's bias is redundant before an instance norm with an
    offset, so the chapter leaves it out; the paper (no offset) keeps it.
    Of the 2H+1 rows a 3x3 stride-2 transposed conv spans, Keras' 'same'
    keeps the first 2H and PyTorch's ConvTranspose2d(padding=1,
    output_padding=1) the last 2H.
    """
    if cfg.upsample == "resize":
        x = layers.UpSampling2D(2, interpolation="nearest")(x)
        x = conv(x, filters, 3, 1, cfg)
    else:
        torch_aligned = cfg.alignment == "torch"
        x = layers.Conv2DTranspose(filters, 3, 2, padding="valid" if torch_aligned else "same",
                                   use_bias=not cfg.norm_affine,
                                   kernel_initializer=kernel_init(cfg))(x)
        if torch_aligned:
            x = layers.Cropping2D(((1, 0), (1, 0)))(x)
    x = norm_layer(cfg.norm, cfg)(x)
    return layers.Activation("relu")(x)


def build_generator(cfg, name="generator"):
    """The generator that --gen names (GENERATORS); any input size divisible by 4."""
    return GENERATORS[cfg.gen](cfg, name)


def resnet_generator(cfg, name):
    """Encoder, residual blocks, decoder, as the chapter and the paper."""
    inputs = keras.Input((None, None, 3), name="image")
    f = cfg.filters
    x = conv_norm_relu(inputs, f, 7, 1, cfg)
    x = conv_norm_relu(x, 2 * f, 3, 2, cfg)
    x = conv_norm_relu(x, 4 * f, 3, 2, cfg)
    for _ in range(cfg.n_res_blocks):
        x = residual_block(x, cfg)
    x = upsample_block(x, 2 * f, cfg)
    x = upsample_block(x, f, cfg)
    if cfg.global_skip:
        outputs = change_of_input(inputs, x, cfg)
    else:  # float32 out under mixed precision
        outputs = layers.Activation("tanh", dtype="float32")(conv(x, 3, 7, 1, cfg))
    return keras.Model(inputs, outputs, name=name)


def change_of_input(inputs, x, cfg):
    """Output = input + a learned change, clipped to [-1, 1].

    The change's conv starts at zero, so an untrained generator is the
    identity: training starts from doing nothing instead of from noise.
    """
    change = layers.Activation("tanh")(conv(x, 3, 7, 1, cfg, initializer="zeros"))
    return layers.Activation("hard_tanh", dtype="float32")(layers.Add()([inputs, change]))


def build_discriminator(cfg, name="discriminator"):
    """The discriminator that --disc names (DISCRIMINATORS)."""
    return DISCRIMINATORS[cfg.disc](cfg, name)


def patch_discriminator(cfg, name, strides):
    """PatchGAN: one real/fake score per overlapping image patch.

    `strides`: of the three normalised conv blocks.
    """
    inputs = keras.Input((cfg.image_size, cfg.image_size, 3), name="image")
    x = layers.ZeroPadding2D(1)(inputs)
    x = layers.Conv2D(cfg.disc_filters, 4, 2, kernel_initializer=kernel_init(cfg))(x)
    x = layers.LeakyReLU(0.2)(x)
    for i, stride in enumerate(strides, start=1):
        x = layers.ZeroPadding2D(1)(x)
        x = layers.Conv2D(cfg.disc_filters * 2 ** i, 4, stride,
                          kernel_initializer=kernel_init(cfg))(x)
        x = norm_layer("instance", cfg)(x)
        x = layers.LeakyReLU(0.2)(x)
    x = layers.ZeroPadding2D(1)(x)
    outputs = layers.Conv2D(1, 4, 1, activation=cfg.disc_activation, dtype="float32",
                            kernel_initializer=kernel_init(cfg))(x)
    return keras.Model(inputs, outputs, name=name)


# Builders by name: a new architecture is a function here plus its name in config.CHOICES.
GENERATORS = {"resnet": resnet_generator}
DISCRIMINATORS = {
    "book": functools.partial(patch_discriminator, strides=(2, 2, 2)),
    "patch70": functools.partial(patch_discriminator, strides=(2, 2, 1)),  # the paper's 70x70
}


def receptive_field(model):
    """Input pixels seen by one output unit, from the conv layers' kernels and strides."""
    field = 1
    for layer in reversed(model.layers):
        if isinstance(layer, layers.Conv2D):
            field = (field - 1) * layer.strides[0] + layer.kernel_size[0]
    return field


def make_optimizer(cfg):
    # One per compiled model: Keras 3 refuses an optimizer shared by several.
    adam = TorchAdam if cfg.adam == "torch" else keras.optimizers.Adam
    return adam(cfg.lr, beta_1=cfg.beta1, epsilon=cfg.adam_epsilon)


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
    model.compile(optimizer=make_optimizer(cfg), loss=list(OUTPUT_LOSSES),
                  loss_weights=loss_weights(cfg), jit_compile=cfg.jit_compile)
    return model


@dataclass
class CycleGAN:
    """The four networks, the compiled adversarial model and a compiled translator."""
    g_ab: keras.Model
    g_ba: keras.Model
    d_a: keras.Model
    d_b: keras.Model
    adversarial: keras.Model

    jit_compile: bool = False

    def __post_init__(self):
        # Inference mode, as the chapter's `predict`, but one compiled call
        # for both directions instead of two `predict` runs per step.
        @tf.function(reduce_retracing=True, jit_compile=self.jit_compile)
        def translate(real_a, real_b):
            return self.g_ab(real_a, training=False), self.g_ba(real_b, training=False)
        self.translate = translate

    def fakes_of_last_update(self):
        """(fake_B, fake_A) as the last adversarial update computed them, before it changed G."""
        # Tensors, not the variables: a variable would make the D updates trace again.
        return tuple(tf.convert_to_tensor(self.adversarial.get_layer(name).latest)
                     for name in ("fake_B", "fake_A"))

    @property
    def patch_shape(self):
        """Discriminator output shape (no batch axis): the shape of its labels."""
        return tuple(self.d_a.output.shape[1:])

    def targets(self, real_a, real_b):
        """The adversarial model's targets for a batch, in OUTPUTS order."""
        known = {"ones": tf.ones((real_a.shape[0],) + self.patch_shape),
                 "real_A": real_a, "real_B": real_b}
        return [known[o.target] for o in OUTPUTS]

    def set_discriminators_trainable(self, flag):
        # Keras 3 (unlike Keras 2) takes `trainable` from the moment a model's
        # train function is first built, not from compile: True before each
        # D update and False before each adversarial update keeps both right
        # whichever runs first.
        self.d_a.trainable = flag
        self.d_b.trainable = flag


def build_cyclegan(cfg):
    """Two generators, two compiled discriminators, one compiled adversarial model.

    Call it inside a `tf.distribute` strategy's scope to place the weights
    and optimizer states on every replica.
    """
    with machine.dtype_policy(cfg.precision):
        g_ab = build_generator(cfg, "generator_AtoB")
        g_ba = build_generator(cfg, "generator_BtoA")
        d_a = build_discriminator(cfg, "discriminator_A")
        d_b = build_discriminator(cfg, "discriminator_B")
        for d in (d_a, d_b):
            # Under mixed_float16 (not bfloat16), Keras 3 adds loss scaling to the optimizer itself.
            # A loss object, not "mse": Keras 3 cannot reload a .h5 compiled with the string.
            d.compile(optimizer=make_optimizer(cfg), loss=keras.losses.MeanSquaredError(),
                      jit_compile=cfg.jit_compile)
        adversarial = build_adversarial_model(g_ab, g_ba, d_a, d_b, cfg)
    return CycleGAN(g_ab, g_ba, d_a, d_b, adversarial, cfg.jit_compile)


def retyped(model, policy, output_policy=None):
    """The same network and weights with every layer computing under the dtype `policy`
    (the output layer under `output_policy`, where given)."""
    config = model.get_config()
    outputs = config["output_layers"]  # one output: [name, 0, 0]; several: a list of those
    outputs = {outputs[0]} if isinstance(outputs[0], str) else {name for name, *_ in outputs}
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer":
            layer["config"]["dtype"] = output_policy if output_policy and layer["name"] in outputs \
                else policy
    twin = model.__class__.from_config(config)
    twin.set_weights(model.get_weights())
    return twin


def float32_twin(model):
    """The same network and weights computing in float32: what a saved model should be."""
    if model.compute_dtype == "float32":
        return model
    twin = retyped(model, "float32")
    twin.trainable = model.trainable
    if model.compiled:  # a reloaded discriminator trains as the saved one did
        optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # no loss scaling
        twin.compile(optimizer=optimizer.__class__.from_config(optimizer.get_config()),
                     loss=model.loss)
    return twin


def summary(args):
    """`main.py summary`: the networks' sizes, the discriminator's patch and the six losses."""
    cfg = make_config(args.preset, image_size=args.image_size)
    gan = build_cyclegan(cfg)
    for model in (gan.g_ab, gan.g_ba, gan.d_a, gan.d_b):
        print(f"{model.name} params={model.count_params()}")
    print(f"discriminator output={'x'.join(map(str, gan.patch_shape))} "
          f"receptive_field={receptive_field(gan.d_a)}px at {cfg.image_size}px input")
    for output, weight in zip(OUTPUTS, loss_weights(cfg)):
        print(f"adversarial output {output.name}: loss={output.loss} weight={weight:g}")


def save_h5(model, path):
    """A model as .h5, written whole before it replaces an earlier file."""
    # .h5 on purpose (the chapter's format); Keras's "legacy format" note is noise here.
    absl = logging.getLogger("absl")
    with atomic_write(path) as tmp, machine.temporarily(lambda: absl.level, absl.setLevel, logging.ERROR):
        model.save(tmp)


def load_generator(path):
    """A saved generator, checked to map RGB images to RGB images."""
    if not str(path).endswith((".h5", ".keras")) or not tf.io.gfile.exists(str(path)):
        raise UserError(f"--generator {path} is not an existing .h5 or .keras file")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        raise UserError(f"--generator {path} is not a loadable Keras model "
                        f"({type(error).__name__})") from None
    if (not isinstance(model.input, keras.KerasTensor) or len(model.input.shape) != 4
            or model.input.shape[-1] != 3 or tuple(model.output.shape[-1:]) != (3,)):
        raise UserError(f"--generator {path} is not an image-to-image generator "
                        f"(input {model.input_shape}, output {model.output_shape})")
    return model


def in_precision(generator, precision):
    """A generator computing in `precision` (float32, bfloat16, float16), its output float32 as
    in training; the weights stay float32."""
    if precision == "float32" and generator.compute_dtype == "float32":
        return generator
    return retyped(generator, machine.POLICIES[precision], "float32")


def edge_pad(images, multiple=4):
    """NHWC images edge-padded at the bottom and right to a multiple of `multiple` (a tensor)."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    rows = tf.minimum(tf.range(height + -height % multiple), height - 1)
    cols = tf.minimum(tf.range(width + -width % multiple), width - 1)
    return tf.gather(tf.gather(images, rows, axis=1), cols, axis=2)


def translate_any_size(generator, image):
    """Translate one HxWx3 [-1, 1] image of any size: edge-pad to a multiple of 4, crop back."""
    h, w = image.shape[:2]
    padded = edge_pad(tf.convert_to_tensor(image)[None])
    return np.asarray(generator(padded, training=False)[0])[:h, :w]
