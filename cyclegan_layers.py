"""The paper preset's two custom objects: reflection padding and PyTorch's Adam.

Core Keras has no reflection padding layer that survives a `.h5` round
trip (a `keras.ops.pad` node or a `Lambda` will not reload), nor an Adam
that steps as PyTorch's does. A paper-preset `.h5` (generators built with
`--padding reflect`, discriminators saved compiled with `--adam torch`)
needs this module imported before `keras.models.load_model`. The book
preset uses neither.
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


@keras.saving.register_keras_serializable(package="cyclegan")
class TorchAdam(keras.optimizers.Adam):
    """Adam as torch.optim.Adam steps: epsilon added to sqrt(v / (1 - beta_2^t)).

    Keras's Adam adds it to sqrt(v) instead: PyTorch's with an epsilon
    1 / sqrt(1 - beta_2^t) times larger (32 times at the first step, still
    1.26 times at the thousandth), which shortens the step of every weight
    whose gradient is not far above epsilon (docs/study.md, the paper
    preset against the official code).
    """

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        step = ops.cast(self.iterations + 1, variable.dtype)
        bias_1 = 1 - ops.power(ops.cast(self.beta_1, variable.dtype), step)
        bias_2 = 1 - ops.power(ops.cast(self.beta_2, variable.dtype), step)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
        denominator = ops.add(ops.divide(ops.sqrt(v), ops.sqrt(bias_2)), self.epsilon)
        self.assign_sub(variable, ops.divide(ops.multiply(m, lr / bias_1), denominator))
