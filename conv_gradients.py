"""Convolution gradients computed as forward convolutions, for training on CPUs where
TensorFlow's own gradient kernels are slow.

Without oneDNN's ops (TensorFlow leaves them off on CPUs without
AVX-512 VNNI, bfloat16 or AMX), a Conv2D's gradient runs Eigen's
Conv2DBackpropFilter and Conv2DBackpropInput, which reach a half to a
tenth of the rate of Eigen's forward convolution (docs/benchmarks.md).
Both gradients of a stride-1 convolution are forward convolutions:

- the kernel's: the input and the output's gradient correlated, with the
  batch and channel axes swapped (the channels sum over the batch);
- the input's: the output's gradient, padded, correlated with the kernel
  turned by 180 degrees, its input and output channels swapped.

A "valid" convolution of stride s splits into s*s stride-1 ones, one per
phase (p, q) of the input (rows p, p+s, ..., columns q, q+s, ...), each
with the taps w[p::s, q::s]; its kernel's gradient is the phases' kernel
gradients interleaved, each a forward convolution as above. Its input's
gradient stays TensorFlow's: at stride 2 that kernel runs near the forward
convolution's rate, and the phases' convolutions do not reliably beat it.

`use` gives the Conv2D layers of training networks this gradient through
Keras's `convolution_op` hook; the layers stay plain Conv2D, so saved
models are unchanged and load anywhere. (Conv2DTranspose has no such hook.)
"""
import tensorflow as tf
from keras import layers

import machine

# Below this many input channels the input gradient's convolution has too few outputs to be
# fast, and TensorFlow's own kernel is quicker (the first 7x7 conv, on RGB); a strided
# convolution's phases then make too small a batch for its kernel gradient too.
MIN_CHANNELS_FOR_INPUT_GRADIENT = 16


def same_padding(kernel):
    """(before, after) that TensorFlow's "SAME" adds for a stride-1 kernel of this size."""
    return (kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2


def batch_as_channels(t):
    """NHWC `t` with its batch and channel axes swapped; for one image the 2-D transpose it
    is (TensorFlow's 4-D transpose moves the same data several times slower)."""
    n, h, w, c = t.shape
    if None in (n, h, w, c):
        return tf.transpose(t, [3, 1, 2, 0])
    flat = tf.reshape(t, [n, h * w, c])
    swapped = tf.transpose(flat[0]) if n == 1 else tf.transpose(flat, [2, 1, 0])
    return tf.reshape(swapped, [c, h, w, n])


def kernel_gradient(x, dy):
    """The kernel's gradient of a stride-1 "VALID" conv of `x` with output gradient `dy`:
    x and dy correlated, the batch as channels and the channels as batch (out[ci, i, j, co]
    sums x * dy over n, h, w)."""
    return tf.transpose(tf.nn.conv2d(batch_as_channels(x), tf.transpose(dy, [1, 2, 0, 3]), 1,
                                     "VALID"), [1, 2, 0, 3])


def strided_kernel_gradient(x, dy, kernel_shape, stride):
    """The kernel's gradient of a "VALID" conv of stride `stride`, phase by phase:
    dW[s*a+p, s*b+q] is the stride-1 kernel gradient of x[:, p::s, q::s] with dy at (a, b)."""
    kh, kw, cin, cout = kernel_shape
    s = stride
    ho, wo = dy.shape[1], dy.shape[2]
    most_h, most_w = -(-kh // s), -(-kw // s)  # taps of the phase with the most (phase 0)
    rows, cols = s * (ho + most_h - 1), s * (wo + most_w - 1)
    x = x[:, :rows, :cols]
    if x.shape[1] < rows or x.shape[2] < cols:  # rows only taps beyond the kernel would read
        x = tf.pad(x, [[0, 0], [0, rows - x.shape[1]], [0, cols - x.shape[2]], [0, 0]])
    # Phase (p, q) of x is channels [(p*s + q)*cin, (p*s + q + 1)*cin), a contiguous batch here.
    phases = batch_as_channels(tf.nn.space_to_depth(x, s))
    dy_as_kernel = tf.transpose(dy, [1, 2, 0, 3])
    taps = []
    for p in range(s):
        for q in range(s):
            th, tw = -(-(kh - p) // s), -(-(kw - q) // s)  # this phase's taps
            if th == 0 or tw == 0:
                taps.append(tf.zeros([cin, most_h, most_w, cout], dy.dtype))
                continue
            first = (p * s + q) * cin
            tap = tf.nn.conv2d(phases[first:first + cin, :ho + th - 1, :wo + tw - 1],
                               dy_as_kernel, 1, "VALID")
            taps.append(tf.pad(tap, [[0, 0], [0, most_h - th], [0, most_w - tw], [0, 0]]))
    # [p, q, ci, a, b, co] -> [a, p, b, q, ci, co]: row s*a + p, column s*b + q.
    taps = tf.reshape(tf.stack(taps), [s, s, cin, most_h, most_w, cout])
    return tf.reshape(tf.transpose(taps, [3, 0, 4, 1, 2, 5]),
                      [s * most_h, s * most_w, cin, cout])[:kh, :kw]


def conv2d(x, kernel, padding, stride=1):
    """tf.nn.conv2d of NHWC `x`, its gradients as forward convolutions: at stride 1
    ("VALID" or "SAME") both, at a larger stride ("VALID" only) the kernel's."""
    kh, kw, cin, _ = kernel.shape
    if stride > 1 and (padding != "VALID" or x.shape[1] is None or x.shape[2] is None):
        return tf.nn.conv2d(x, kernel, stride, padding)  # only static, valid geometry splits
    pads = [[0, 0], same_padding(kh), same_padding(kw), [0, 0]] if padding == "SAME" else None

    @tf.custom_gradient
    def convolve(x, kernel):
        def gradient(dy):
            if stride > 1:
                if cin < MIN_CHANNELS_FOR_INPUT_GRADIENT:
                    d_kernel = tf.raw_ops.Conv2DBackpropFilter(
                        input=x, filter_sizes=tf.shape(kernel), out_backprop=dy,
                        strides=[1, stride, stride, 1], padding=padding)
                else:
                    d_kernel = strided_kernel_gradient(x, dy, kernel.shape, stride)
                d_x = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel,
                                                     out_backprop=dy,
                                                     strides=[1, stride, stride, 1],
                                                     padding=padding)
                return d_x, d_kernel
            d_kernel = kernel_gradient(tf.pad(x, pads) if pads else x, dy)
            if cin < MIN_CHANNELS_FOR_INPUT_GRADIENT:
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
        return tf.nn.conv2d(x, kernel, stride, padding), gradient
    return convolve(x, kernel)


def applies_to(layer):
    """Whether `layer` is a convolution this module computes the gradients of: stride 1, or
    one stride along both axes with "valid" padding."""
    if type(layer) is not layers.Conv2D:
        return False
    strides = tuple(layer.strides)
    return (strides[0] == strides[1] and (strides == (1, 1) or layer.padding == "valid")
            and tuple(layer.dilation_rate) == (1, 1) and layer.groups == 1
            and layer.data_format == "channels_last")


def use(requested, networks):
    """Gives the Conv2D layers of `networks` that it `applies_to` these gradients where
    --conv-gradients (`requested`) chooses them (machine.choose_conv_gradients); returns
    the choice."""
    choice = machine.choose_conv_gradients(requested)[0]
    if choice == "convolution":
        for network in networks:
            for layer in network.layers:
                if applies_to(layer):
                    # Keras's hook for a convolution's arithmetic; an instance attribute, so
                    # the layer's class and config (and every saved file) stay plain Conv2D.
                    layer.convolution_op = lambda inputs, kernel, layer=layer: conv2d(
                        inputs, tf.convert_to_tensor(kernel), layer.padding.upper(),
                        layer.strides[0])
    return choice
