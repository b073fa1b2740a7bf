"""The input pipeline: which dataset --data names, its usable files, and tf.data batches.

A dataset is a folder in the layout of the official CycleGAN zips:
trainA/, trainB/, testA/, testB/ (and, where the truth is known,
testA_truth/ with G_AB's ideal output under the same file names).
"""
import os
from pathlib import Path

import tensorflow as tf

import config
import download
import generated
import image_files


def resolve_dataset(data, datasets_dir="datasets"):
    """Path of the dataset folder for `--data`: a path, `demo`, or an official name."""
    if data in generated.GENERATED_DATASETS:
        return generated.GENERATED_DATASETS[data](Path(datasets_dir) / data)
    if data in download.OFFICIAL_DATASETS:
        folder = Path(datasets_dir) / data
        return folder if folder.is_dir() else download.download_official(data, datasets_dir)
    folder = Path(data)
    if not folder.is_dir():
        raise config.DataError(f"--data {data!r} is neither a folder nor one of: "
                               + ", ".join((*generated.GENERATED_DATASETS, *download.OFFICIAL_DATASETS)))
    return folder


def domain_files(root, split, domain, limit=0, remember=True):
    """Usable images of one split/domain (e.g. train, A); warns about the rest; `remember`:
    keep what the check found for the next start (image_files.usable_images)."""
    folder = Path(root) / f"{split}{domain}"
    files = image_files.list_images(folder)
    if limit:
        files = files[:limit]
    files = image_files.usable_images(files, folder, remember)
    if not files:
        raise config.DataError(f"no usable images in {folder}")
    return files


def scaled(image, size):
    """uint8 pixels resized to size x size, in [-1, 1]."""
    return image_files.to_network(tf.image.resize(tf.cast(image, tf.float32), (size, size), antialias=True))


def load_image(path, size, orientation=None):
    """Decode any supported file to upright RGB, resize to size x size, scale to [-1, 1].

    Without `orientation` (one file, eagerly) a file that cannot be used is a DataError.
    """
    if orientation is not None:
        return scaled(image_files.decode(path, orientation), size)
    try:
        return scaled(image_files.read_pixels(path), size)
    except image_files.UnusableImage as why:
        raise config.DataError(f"cannot use image {os.fsdecode(path)!a}: {why}") from None


def augment(image, crop_size, seed):
    """Random crop to crop_size (a no-op when already that size), random flip.

    Stateless ops with a per-image seed: a checkpoint can then save the
    input pipeline's position, which stateful random ops forbid.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_crop(image, (crop_size, crop_size, 3), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def domain_dataset(files, cfg, seed, replicas=1):
    """Endless shuffled, augmented, batched images of one domain.

    Each domain reshuffles on its own as it runs out, so unpaired domains
    of different sizes never pair A[i] with B[i]. Nothing is dropped:
    usable_images decoded every file as this pipeline does, so an error here
    (next_batch reports it) is a file changed or removed since, and ends the
    run rather than a search for readable images that may never end.
    """
    load_px = cfg.load_px
    images = [image_files.as_image_file(f) for f in files]
    ds = tf.data.Dataset.from_tensor_slices(([os.fsencode(f.decoded) for f in images],
                                             [f.orientation for f in images]))
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=seed).batch(2))
    ds = ds.map(lambda file, s: augment(load_image(file[0], load_px, file[1]), cfg.image_size, s),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(cfg.batch_size * replicas, drop_remainder=True)


def train_dataset(files_a, files_b, cfg, replicas=1):
    """Endless (batch_A, batch_B) pairs of global batches (--batch-size per replica), prefetched."""
    pairs = tf.data.Dataset.zip((domain_dataset(files_a, cfg, cfg.seed, replicas),
                                 domain_dataset(files_b, cfg, cfg.seed + 1, replicas)))
    return pairs.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(files_a, files_b, cfg, replicas=1):
    """max(|A|, |B|) / global batch, as the official implementation, unless set."""
    return cfg.steps_per_epoch or max(1, max(len(files_a), len(files_b)) // (cfg.batch_size * replicas))


def next_batch(batches):
    """The next (A, B) pair of an iterator of train_dataset; a failed read is a DataError."""
    try:
        return next(batches)
    except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError, tf.errors.InvalidArgumentError,
            tf.errors.DataLossError) as error:
        raise config.DataError(f"a training image can no longer be read "
                               f"({config.op_error_text(error)}); was the dataset moved, deleted "
                               "or changed during the run? Training stopped; put it back and "
                               "continue with --resume") from None


def load_batch(files, size):
    """A fixed batch of images (no augmentation) for samples and evaluation."""
    return tf.stack([load_image(f, size) for f in files])
