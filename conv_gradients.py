"""Stride-1 convolution gradients computed as forward convolutions, for training on CPUs
where TensorFlow's own gradient kernels are slow.

Without oneDNN's ops (TensorFlow leaves them off on CPUs without
AVX-512 VNNI, bfloat16 or AMX), a Conv2D's gradient runs Eigen's
Conv2DBackpropFilter and Conv2DBackpropInput, which reach a half to a
tenth of the rate of Eigen's forward convolution (docs/benchmarks.md).
Both gradients of a stride-1 convolution are forward convolutions:

- the kernel's: the input and the output's gradient correlated, with the
  batch and channel axes swapped (the channels sum over the batch);
- the input's: the output's gradient, padded, correlated with the kernel
  turned by 180 degrees, its input and output channels swapped.

`use` gives the Conv2D layers of training networks this gradient through
Keras's `convolution_op` hook; the layers stay plain Conv2D, so saved
models are unchanged and load anywhere.
"""
import tensorflow as tf
from keras import layers

import machine

# Below this many input channels the input gradient's convolution has too few outputs to be
# fast, and TensorFlow's own kernel is quicker (the first 7x7 conv, on RGB).
MIN_CHANNELS_FOR_INPUT_GRADIENT = 16


def same_padding(kernel):
    """(before, after) that TensorFlow's "SAME" adds for a stride-1 kernel of this size."""
    return (kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2


def conv2d(x, kernel, padding):
    """tf.nn.conv2d of NHWC `x` at stride 1 ("VALID" or "SAME"), its gradients as
    forward convolutions."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    pads = [[0, 0], same_padding(kh), same_padding(kw), [0, 0]] if padding == "SAME" else None

    @tf.custom_gradient
    def convolve(x, kernel):
        def gradient(dy):
            padded = tf.pad(x, pads) if pads else x
            # Batch as channels and channels as batch: out[ci, i, j, co] sums x * dy over n, h, w.
            d_kernel = tf.transpose(tf.nn.conv2d(tf.transpose(padded, [3, 1, 2, 0]),
                                                 tf.transpose(dy, [1, 2, 0, 3]), 1, "VALID"),
                                    [1, 2, 0, 3])
            if x.shape[-1] < MIN_CHANNELS_FOR_INPUT_GRADIENT:
                d_x = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel,
                                                     out_backprop=dy, strides=[1, 1, 1, 1],
                                                     padding=padding)
            else:
                before = pads or [[0, 0]] * 4
                full = [[0, 0], [kh - 1 - before[1][0], kh - 1 - before[1][1]],
                        [kw - 1 - before[2][0], kw - 1 - before[2][1]], [0, 0]]
                turned = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
                d_x = tf.nn.conv2d(tf.pad(dy, full), turned, 1, "VALID")
            return d_x, d_kernel
        return tf.nn.conv2d(x, kernel, 1, padding), gradient
    return convolve(x, kernel)


def applies_to(layer):
    """Whether `layer` is a convolution this module computes the gradients of."""
    return (type(layer) is layers.Conv2D and tuple(layer.strides) == (1, 1)
            and tuple(layer.dilation_rate) == (1, 1) and layer.groups == 1
            and layer.data_format == "channels_last")


def use(requested, networks):
    """Gives the stride-1 Conv2D layers of `networks` these gradients where --conv-gradients
    (`requested`) chooses them (machine.choose_conv_gradients); returns the choice."""
    choice = machine.choose_conv_gradients(requested)[0]
    if choice == "convolution":
        for network in networks:
            for layer in network.layers:
                if applies_to(layer):
                    # Keras's hook for a convolution's arithmetic; an instance attribute, so
                    # the layer's class and config (and every saved file) stay plain Conv2D.
                    layer.convolution_op = lambda inputs, kernel, layer=layer: conv2d(
                        inputs, tf.convert_to_tensor(kernel), layer.padding.upper())
    return choice
