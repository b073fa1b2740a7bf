"""Full-size translation in bounded memory: a generator run over overlapping tiles.

Instance norm normalises with statistics of the whole image, which no tile
holds. So the network is cut into segments at tensors that every path
passes through, at its lowest resolution (between residual blocks); only
those cut maps are kept whole, and within a segment each instance norm's
statistics are gathered over all tiles, one pass per norm, before the
next norm needs them. Every tile carries a margin wider than any of its
padded edges can reach, so the part of it that is kept equals the
untiled result up to float rounding. Batch norm in inference mode is per
pixel and needs nothing.
"""
import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import tensorflow as tf
from keras import layers

import models
from config import UserError
from cyclegan_layers import ReflectionPadding2D

# Layers that compute each pixel from the same pixel alone (or, the norms, with statistics).
POINTWISE = (layers.InputLayer, layers.Activation, layers.Add, layers.BatchNormalization,
             layers.GroupNormalization, layers.Identity, layers.ReLU, layers.LeakyReLU,
             layers.Dropout, layers.Rescaling, layers.Multiply, layers.Subtract)


def geometry(layer):
    """(scale, reach) of a layer: its output's resolution over its input's, and how many of
    its input pixels past a tile's edge its output can depend on (generously); None if unknown."""
    square = lambda pair: pair[0] == pair[1]
    if isinstance(layer, layers.Conv2DTranspose) and square(layer.strides):
        return Fraction(layer.strides[0]), -(-max(layer.kernel_size) // layer.strides[0])
    if isinstance(layer, layers.Conv2D) and square(layer.strides):
        return Fraction(1, layer.strides[0]), (max(layer.kernel_size) - 1) * max(layer.dilation_rate)
    if isinstance(layer, layers.ZeroPadding2D):
        return Fraction(1), max(max(side) for side in layer.padding)
    if isinstance(layer, ReflectionPadding2D):
        return Fraction(1), layer.padding
    if isinstance(layer, layers.Cropping2D):
        return Fraction(1), max(max(side) for side in layer.cropping)
    if isinstance(layer, layers.UpSampling2D) and square(layer.size):
        return Fraction(layer.size[0]), 1
    if isinstance(layer, POINTWISE):
        return Fraction(1), 0
    return None


def input_names(entry):
    """Names of the layers whose outputs a layer's config entry takes."""
    names = []

    def walk(item):
        if isinstance(item, dict) and item.get("class_name") == "__keras_tensor__":
            names.append(item["config"]["keras_history"][0])
        elif isinstance(item, dict):
            for value in item.values():
                walk(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                walk(value)
    walk(entry["inbound_nodes"])
    return names


@dataclass
class Segment:
    start: int      # position of the layer whose output is the segment's whole input map
    end: int        # position of the layer whose output is its whole output map
    norms: list     # its instance norms, in order
    margin: int     # model-input pixels each tile extends past the part kept


class TiledGenerator:
    """A functional generator's translation of one image, computed tile by tile."""

    def __init__(self, generator, tile):
        self.name = generator.name
        try:
            graph = generator.get_config()
            entries = graph["layers"]
            inputs = graph["input_layers"]  # one input: [name, 0, 0]
            if not isinstance(inputs[0], str) or any(len(e["inbound_nodes"]) > 1 for e in entries):
                raise KeyError
        except (KeyError, TypeError, NotImplementedError):
            raise self.refusal("it is not a one-input functional model") from None
        self.layers = [generator.get_layer(e["name"]) for e in entries]
        self.inputs = [input_names(e) for e in entries]
        position = {layer.name: i for i, layer in enumerate(self.layers)}
        self.sources = [[position[name] for name in names] for names in self.inputs]
        if any(j >= i for i, sources in enumerate(self.sources) for j in sources):
            raise self.refusal("its layers are not listed in the order they run")
        self.scale, reach = self.measure()
        self.align = math.lcm(*(s.denominator for s in self.scale))
        if tile % self.align:
            raise UserError(f"--tile must be a multiple of {self.align} for {self.name}")
        self.tile = tile
        self.segments = self.cut(reach)
        # The whole image's statistics of each instance norm, set before a pass uses them.
        self.statistics = {i: (tf.Variable(tf.zeros(self.layers[i].input.shape[-1])),
                               tf.Variable(tf.ones(self.layers[i].input.shape[-1])))
                           for s in self.segments for i in s.norms}
        self.passes = {}

    def refusal(self, why):
        return UserError(f"--tile cannot split {self.name}: {why}; translate it whole, "
                         "or smaller with --max-size")

    def measure(self):
        """Each layer output's resolution (over the input's) and reach (model-input pixels)."""
        scale, reach = [], []
        for layer, sources in zip(self.layers, self.sources):
            shape = geometry(layer)
            if shape is None or isinstance(layer, layers.GroupNormalization) and layer.axis != -1:
                raise self.refusal(f"its layer {layer.name} ({type(layer).__name__}) is not one "
                                   "that tiles know")
            if not sources:
                scale.append(Fraction(1))
                reach.append(Fraction(0))
                continue
            before = scale[sources[0]]
            scale.append(before * shape[0])
            reach.append(max(reach[i] for i in sources) + shape[1] / before)
        return scale, reach

    def cut(self, reach):
        """Segments ending where no connection jumps over a layer at the lowest resolution,
        wherever the segment so far computes something."""
        lowest = min(self.scale)
        last_use = [i for i in range(len(self.layers))]
        for i, sources in enumerate(self.sources):
            for j in sources:
                last_use[j] = max(last_use[j], i)
        segments, start, norms, jumped = [], 0, [], 0
        final = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if isinstance(layer, layers.GroupNormalization):
                norms.append(i)
            computes = norms or reach[i] > reach[start]
            if i == final or (computes and jumped <= i and self.scale[i] == lowest):
                margin = max(reach[start:i + 1]) - reach[start]
                segments.append(Segment(start, i, norms, self.align * math.ceil(margin / self.align)))
                start, norms = i, []
            jumped = max(jumped, last_use[i])
        return segments

    def run(self, segment, target, tile):
        """The output of layer `target` for a tile of the segment's input map."""
        values = {segment.start: tile}
        for i in range(segment.start + 1, target + 1):
            layer, args = self.layers[i], [values[j] for j in self.sources[i]]
            x = args[0] if len(args) == 1 else args
            values[i] = self.normalise(i, x) if i in self.statistics else layer(x, training=False)
        return values[target]

    def normalise(self, i, x):
        """Instance (group) norm with the whole image's statistics, as GroupNormalization computes it."""
        layer = self.layers[i]
        mean, inverse = self.statistics[i]
        if layer.scale:
            inverse = inverse * layer.gamma
        offset = -mean * inverse + (layer.beta if layer.center else 0.0)
        return tf.cast(tf.cast(x, tf.float32) * inverse + offset, layer.compute_dtype)

    def traced(self, segment, target):
        """The segment's pass up to `target`, traced once for each."""
        key = (segment.start, target)
        if key not in self.passes:
            self.passes[key] = tf.function(functools.partial(self.run, segment, target),
                                           reduce_retracing=True)
        return self.passes[key]

    def tiles(self, height, width, margin):
        """(kept part, tile) boxes (top, bottom, left, right) in model-input pixels."""
        for top in range(0, height, self.tile):
            for left in range(0, width, self.tile):
                kept = (top, min(top + self.tile, height), left, min(left + self.tile, width))
                yield kept, (max(0, kept[0] - margin), min(height, kept[1] + margin),
                             max(0, kept[2] - margin), min(width, kept[3] + margin))

    def over_tiles(self, segment, target, whole, size):
        """Yield (kept part of the target's output, its box at the target's resolution) per tile."""
        s_in, s_out = self.scale[segment.start], self.scale[target]
        scaled = lambda box, s: tuple(int(v * s) for v in box)
        for kept, tile in self.tiles(*size, segment.margin):
            t, b, l, r = scaled(tile, s_in)
            out = self.traced(segment, target)(whole[:, t:b, l:r])
            expected = ((tile[1] - tile[0]) * s_out, (tile[3] - tile[2]) * s_out)
            if tuple(out.shape[1:3]) != expected:
                raise self.refusal(f"its layer {self.layers[target].name} does not keep the "
                                   "input's geometry")
            inner = scaled((kept[0] - tile[0], kept[1] - tile[0], kept[2] - tile[2],
                            kept[3] - tile[2]), s_out)
            yield out[:, inner[0]:inner[1], inner[2]:inner[3]], scaled(kept, s_out)

    def gather_statistics(self, segment, norm, whole, size):
        """Set `norm`'s mean and 1/sqrt(var + eps) from all tiles (Chan et al.'s pairwise merge)."""
        count, mean, m2 = 0, 0.0, 0.0
        for part, _ in self.over_tiles(segment, self.sources[norm][0], whole, size):
            part = tf.cast(part, tf.float32)
            n = int(np.prod(part.shape[:3]))
            part_mean, part_var = (np.asarray(v, np.float64) for v in tf.nn.moments(part, [0, 1, 2]))
            delta = part_mean - mean
            mean = mean + delta * n / (count + n)
            m2 = m2 + part_var * n + delta ** 2 * count * n / (count + n)
            count += n
        layer = self.layers[norm]
        groups = mean.reshape(layer.groups, -1)        # the channels of each group, equally counted
        group_mean = groups.mean(axis=1, keepdims=True)
        group_m2 = (m2.reshape(layer.groups, -1).sum(axis=1, keepdims=True)
                    + count * ((groups - group_mean) ** 2).sum(axis=1, keepdims=True))
        variance = group_m2 / (count * groups.shape[1])
        shape = mean.shape
        self.statistics[norm][0].assign(np.broadcast_to(group_mean, groups.shape).reshape(shape))
        self.statistics[norm][1].assign(np.broadcast_to(1 / np.sqrt(variance + layer.epsilon),
                                                        groups.shape).reshape(shape))

    def __call__(self, image):
        """One HxWx3 [-1, 1] image of any size translated, as the generator would whole."""
        height, width = image.shape[:2]
        whole = np.asarray(models.edge_pad(tf.convert_to_tensor(image)[None], self.align))
        size = whole.shape[1:3]
        for segment in self.segments:
            for norm in segment.norms:
                self.gather_statistics(segment, norm, whole, size)
            out = None
            for part, (t, b, l, r) in self.over_tiles(segment, segment.end, whole, size):
                if out is None:
                    s = self.scale[segment.end]
                    out = np.empty((1, int(size[0] * s), int(size[1] * s), part.shape[-1]),
                                   part.dtype.as_numpy_dtype)
                out[:, t:b, l:r] = part
            whole = out
        return whole[0, :height, :width]
