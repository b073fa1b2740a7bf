"""The one custom layer: reflection padding for the paper preset.

Core Keras has no reflection padding layer that survives a `.h5` round
trip (a `keras.ops.pad` node or a `Lambda` will not reload), so generators
built with `--padding reflect` need this module imported before
`keras.models.load_model`. The book preset uses no custom layer at all.
"""
import keras


@keras.saving.register_keras_serializable(package="cyclegan")
class ReflectionPadding2D(keras.layers.Layer):
    """Pads height and width by mirroring the image, without repeating the edge."""

    def __init__(self, padding=1, **kwargs):
        super().__init__(**kwargs)
        self.padding = int(padding)

    def call(self, inputs):
        p = self.padding
        return keras.ops.pad(inputs, [[0, 0], [p, p], [p, p], [0, 0]], mode="reflect")

    def compute_output_shape(self, input_shape):
        grow = lambda n: None if n is None else n + 2 * self.padding
        return (input_shape[0], grow(input_shape[1]), grow(input_shape[2]), input_shape[3])

    def get_config(self):
        return {**super().get_config(), "padding": self.padding}
