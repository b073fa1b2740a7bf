"""Network builders: generators and PatchGAN discriminators, and the networks as files.

Every builder is a pure function of a `config.Config`; nothing here trains
(cyclegan.py does).
"""
import functools
import io

import h5py
import keras
import numpy as np
import tensorflow as tf
from keras import layers
from keras.src.legacy.saving import legacy_h5_format

import machine
from config import UserError
from fileio import atomic_write
from cyclegan_layers import ReflectionPadding2D, TorchAdam


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
    """The generator that --gen names (GENERATORS), refused in one line where it cannot take
    --image-size (check_input_size); translated images of any size are padded to fit."""
    generator = GENERATORS[cfg.gen](cfg, name)
    check_input_size(generator, cfg.image_size, "--image-size")
    return generator


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


def save_h5(model, path):
    """A model as .h5 (the chapter's format) or .keras, written whole before it replaces an
    earlier file.

    The .h5 is built in memory by h5py and written by Python: where h5py
    itself fails to write a file (a full disk), HDF5 keeps objects of it
    open that its exit handler then crashes on (a segfault at exit).
    """
    with atomic_write(path) as tmp:
        if tmp.suffix == ".h5":
            image = io.BytesIO()
            with h5py.File(image, "w") as h5:
                # model.save's own .h5 writer, handed an open file instead of a path.
                legacy_h5_format.save_model_to_hdf5(model, h5)
            tmp.parent.mkdir(parents=True, exist_ok=True)  # as model.save makes it
            tmp.write_bytes(image.getbuffer())
        else:
            model.save(tmp)


def load_generator(path, flag="--generator"):
    """A saved generator, checked to map RGB images to RGB images; `flag` named it."""
    if not str(path).endswith((".h5", ".keras")) or not tf.io.gfile.exists(str(path)):
        raise UserError(f"{flag} {path} is not an existing .h5 or .keras file")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        raise UserError(f"{flag} {path} is not a loadable Keras model "
                        f"({type(error).__name__})") from None
    if (not isinstance(model.input, keras.KerasTensor) or len(model.input.shape) != 4
            or model.input.shape[-1] != 3 or tuple(model.output.shape[-1:]) != (3,)):
        raise UserError(f"{flag} {path} is not an image-to-image generator "
                        f"(input {model.input_shape}, output {model.output_shape})")
    return model


def in_precision(generator, precision):
    """A generator computing in `precision` (float32, bfloat16, float16), its output float32 as
    in training; the weights stay float32."""
    if precision == "float32" and generator.compute_dtype == "float32":
        return generator
    return retyped(generator, machine.POLICIES[precision], "float32")


def edge_pad(images, multiple):
    """NHWC images edge-padded at the bottom and right to a multiple of `multiple` (a tensor)."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    rows = tf.minimum(tf.range(height + -height % multiple), height - 1)
    cols = tf.minimum(tf.range(width + -width % multiple), width - 1)
    return tf.gather(tf.gather(images, rows, axis=1), cols, axis=2)


def size_multiple(generator):
    """What a generator's input sides must be a multiple of: the product of its downsampling
    strides (4 for the resnet generator's two stride-2 convs)."""
    multiple = 1
    for layer in generator.layers:
        if type(layer) is layers.Conv2D and layer.strides[0] > 1:
            multiple *= layer.strides[0]
    return multiple


def check_input_size(generator, size, flag):
    """Refuse, in one line, a `size` that is no multiple of what `generator`'s sides need."""
    multiple = size_multiple(generator)
    if size % multiple:
        raise UserError(f"{flag} must be a multiple of {multiple} for this generator, got {size}")


def translate_padded(generator, images):
    """NHWC [-1, 1] images of any size through `generator`: edge-padded to its size_multiple,
    translated in inference mode, cropped back (a tensor)."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    out = generator(edge_pad(images, size_multiple(generator)), training=False)
    return out[:, :height, :width]


def translate_any_size(generator, image):
    """Translate one HxWx3 [-1, 1] image of any size (translate_padded) into a NumPy array."""
    return np.asarray(translate_padded(generator, tf.convert_to_tensor(image)[None])[0])
