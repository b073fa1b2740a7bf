"""Pieces of the training loop: step, image pool, schedule, logging, samples, saving."""
import contextlib
import csv
import logging
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import OUTPUT_NAMES  # noqa: E402

D_LOSS_NAMES = ("D_A", "D_B")
G_LOSS_NAMES = OUTPUT_NAMES + ("G_total",)
LOSS_NAMES = D_LOSS_NAMES + G_LOSS_NAMES
MODEL_FILES = {"g_ab": "generatorAToB.h5", "g_ba": "generatorBToA.h5",
               "d_a": "discriminatorA.h5", "d_b": "discriminatorB.h5"}


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


def learning_rate(epoch, cfg):
    """Constant for cfg.epochs, then linear decay to zero over cfg.decay_epochs."""
    if epoch < cfg.epochs:
        return cfg.lr
    return cfg.lr * max(0.0, 1.0 - (epoch - cfg.epochs + 1) / (cfg.decay_epochs + 1))


def set_learning_rate(gan, value):
    for model in (gan.d_a, gan.d_b, gan.adversarial):
        model.optimizer.learning_rate.assign(value)


def update_discriminator(d, real, fake, cfg):
    """One D update (joint) or two (split, the chapter's); returns the D loss."""
    ones = tf.ones((real.shape[0],) + tuple(d.output.shape[1:]))
    if cfg.d_update == "joint":
        # mse over real and fake together is half their sum: the paper's halved loss.
        return float(d.train_on_batch(tf.concat([real, fake], 0), tf.concat([ones, 0 * ones], 0)))
    return 0.5 * (float(d.train_on_batch(real, ones)) + float(d.train_on_batch(fake, 0 * ones)))


def train_step(gan, real_a, real_b, pools, cfg):
    """One CycleGAN iteration: both discriminators, then both generators."""
    fake_b, fake_a = gan.translate(real_a, real_b)
    fake_a = pools[0].query(fake_a)
    fake_b = pools[1].query(fake_b)
    gan.set_discriminators_trainable(True)
    losses = {"D_A": update_discriminator(gan.d_a, real_a, fake_a, cfg),
              "D_B": update_discriminator(gan.d_b, real_b, fake_b, cfg)}
    gan.set_discriminators_trainable(False)
    ones = tf.ones((real_a.shape[0],) + gan.patch_shape)
    g = gan.adversarial.train_on_batch([real_a, real_b], [ones, ones, real_a, real_b, real_a, real_b],
                                       return_dict=True)
    losses.update({name: float(g[f"{name}_loss"]) for name in OUTPUT_NAMES})
    losses["G_total"] = float(g["loss"])
    return losses


# --- Logging -------------------------------------------------------------

class TensorBoardLogger:
    """Scalars, images and model graphs under log_dir/NAME for TensorBoard."""

    def __init__(self, log_dir, name):
        self.root = Path(log_dir) / name
        self.writer = tf.summary.create_file_writer(str(self.root))

    def scalars(self, values, step):
        with self.writer.as_default(step=step):
            for key, value in values.items():
                tf.summary.scalar(key, value)

    def image_file(self, tag, png_path, step):
        image = tf.io.decode_png(tf.io.read_file(str(png_path)), channels=3)
        with self.writer.as_default(step=step):
            tf.summary.image(tag, image[None])

    def graph(self, model):
        """The model's graph in the Graphs tab, as a run of its own."""
        spec = tf.TensorSpec((1,) + tuple(model.input.shape[1:]), model.input.dtype)
        graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
        writer = tf.summary.create_file_writer(str(self.root / f"graph_{model.name}"))
        with writer.as_default():
            tf.summary.graph(graph)
        writer.close()

    def flush(self):
        self.writer.flush()


class LossHistory:
    """Per-epoch mean losses in a CSV, so curves survive restarts."""

    def __init__(self, path):
        self.path = Path(path)

    def append(self, epoch, means):
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(("epoch",) + LOSS_NAMES)
            writer.writerow([epoch] + [f"{means[k]:.6g}" for k in LOSS_NAMES])

    def read(self):
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {k: np.array([float(r[k]) for r in rows]) for k in ("epoch",) + LOSS_NAMES}


def atomic_path(path):
    """A temporary sibling to write to before `os.replace`, keeping the suffix."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def save_loss_curves(history, path):
    """Discriminator and generator loss curves per epoch, one picture."""
    data = history.read()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name in D_LOSS_NAMES:
        axes[0].plot(data["epoch"], data[name], label=name)
    for name in G_LOSS_NAMES:
        axes[1].plot(data["epoch"], data[name], label=name)
    for ax, title in zip(axes, ("Discriminators", "Generators")):
        ax.set(title=title, xlabel="epoch", ylabel="mean loss")
        ax.legend(fontsize="small")
    save_figure(fig, path)


def save_figure(fig, path):
    tmp = atomic_path(path)
    fig.savefig(tmp, format=Path(path).suffix[1:], bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def to_unit(images):
    """[-1, 1] network pixels back to [0, 1] for display."""
    return np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0)


def save_sample_grid(gan, batch_a, batch_b, path, title):
    """Rows: A, G_AB(A), G_BA(G_AB(A)) and B, G_BA(B), G_AB(G_BA(B)) per sample."""
    fake_b, fake_a = gan.translate(batch_a, batch_b)
    rec_a, rec_b = gan.translate(fake_a, fake_b)[::-1]
    rows = []
    for i in range(len(batch_a)):
        rows.append(((batch_a[i], "original A"), (fake_b[i], "generated B"), (rec_a[i], "reconstructed A")))
        rows.append(((batch_b[i], "original B"), (fake_a[i], "generated A"), (rec_b[i], "reconstructed B")))
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False,
                             layout="constrained")
    for ax_row, row in zip(axes, rows):
        for ax, (image, label) in zip(ax_row, row):
            ax.imshow(to_unit(image))
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, path)


def save_models(gan, folder):
    """The four networks as .h5, each written whole before it replaces the last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gan.set_discriminators_trainable(True)  # a reloaded discriminator should train
    for attr, filename in MODEL_FILES.items():
        tmp = atomic_path(folder / filename)
        # .h5 on purpose (the chapter's format); Keras's "legacy format" note is noise here.
        with silence_absl_warnings():
            getattr(gan, attr).save(tmp)
        os.replace(tmp, folder / filename)


@contextlib.contextmanager
def silence_absl_warnings():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
