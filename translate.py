"""`python main.py translate`: images and video clips through a saved generator.

Images: tf.data decodes them in parallel (scaled down to --max-size where
given), images of one size go through the compiled generator as one batch,
and writer threads encode a batch's results while the next is translated.
Larger images than --tile go tile by tile (tiling.py). Clips: PyAV (an
optional package) decodes and encodes the frames, translated in batches
the same way; their sound is not carried over.
"""
import collections
import concurrent.futures
import os
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

import config
import image_files
import machine
import models
import pretrained
import report
from config import UserError
from fileio import atomic_write, checked_output

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm")
# The encoder for each kind of video file PyAV's wheels can write: H.264 where the container takes it.
VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".avi": "mpeg4",
                ".webm": "libvpx-vp9"}
# Pixels translated in one call: a batch of images of one size, or of video frames.
BATCH_PIXELS = 4 * 256 * 256
# Batches of one size from which tracing the generator pays: a trace costs about what four
# untraced calls lose to Python per layer (docs/benchmarks.md, translating one photo). An
# untraced call holds every layer's output to the end, so only small batches go untraced.
TRACE_FROM_BATCHES = 4
UNTRACED_PIXELS = 256 * 256
WRITER_THREADS = 2
# Copies of the generator's widest activation an untiled pass holds at once, about
# (docs/benchmarks.md#photos-larger-than-memory). On a CPU, running out of memory aborts
# the process instead of raising an error, so an image that would is refused beforehand.
LIVE_ACTIVATIONS = 4


def command(args):
    """The translate command, from its parsed flags."""
    if args.pretrained:
        generator = pretrained.pretrained_generator(args.pretrained)
    else:
        generator = args.generator
    translate(generator, args.input, args.output, overwrite=args.overwrite,
              precision=config.from_flags(args).precision, max_size=args.max_size, keep_size=args.keep_size,
              tile=args.tile)


def translate(generator_path, input_path, output, overwrite=False, precision="auto", max_size=0,
              keep_size=False, tile=0):
    """Translate an image, a clip or a folder of them into `output`, never over an original.

    `output` is a folder, or for one clip also a video file name.
    """
    if max_size != 0 and max_size < 4:
        raise UserError(f"--max-size must be at least 4 pixels (or 0: any size), got {max_size}")
    if keep_size and not max_size:
        raise UserError("--keep-size goes with --max-size")
    if tile != 0 and tile < 16:
        raise UserError(f"--tile must be at least 16 (or 0: no tiles), got {tile}")
    generator = models.load_generator(generator_path)
    if tile:
        models.check_input_size(generator, tile, "--tile")
    images, clips, targets = plan_outputs(input_path, output, overwrite)
    if clips:
        require_av()
    precision, why = machine.choose_precision(precision)
    translator = Translator(generator, precision, tile)
    print(f"Precision: {precision} ({why})")
    done, skipped = translate_images(translator, images, targets[:len(images)], max_size, keep_size)
    clips_done, sound = 0, []
    for clip, target in zip(clips, targets[len(images):]):
        try:
            if translate_clip(translator, clip, target, max_size, keep_size):
                sound.append(image_files.file_name(clip))
            clips_done += 1
        except image_files.UnusableImage as why:
            skipped.append(f"{image_files.file_name(clip)} ({why})")
    if skipped:
        kind = "file" if clips else "image"
        warnings.warn(f"skipped {len(skipped)} {kind}(s) of {input_path}: " + ", ".join(skipped),
                      image_files.SkippedImagesWarning)
    counts = [f"{n} {kind}(s)" for n, kind, given in ((done, "image", images),
                                                       (clips_done, "clip", clips)) if given]
    print(f"Translated {' and '.join(counts)} into {output}"
          + (f"; the sound of {', '.join(sound)} is not carried over" if sound else ""))


def plan_outputs(input_path, output, overwrite):
    """(image files, clip files, their output paths), every refusal made before any work."""
    source = Path(input_path)
    if source.is_file():
        files = [str(source)]
    else:
        files = image_files.list_images(source, image_files.IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
    is_clip = lambda f: Path(f).suffix.lower() in VIDEO_EXTENSIONS
    clips = [f for f in files if is_clip(f)]
    images = [f for f in files if not is_clip(f)]
    if not files:
        raise UserError(f"no images or clips found in {input_path}")
    output = Path(output)
    if len(clips) == 1 and not images and source.is_file() and output.suffix.lower() in VIDEO_CODECS:
        targets = [output]
        if output.resolve() == source.resolve():
            raise UserError(f"--output {output} is the input clip; give another name")
    else:
        if output.exists() and not output.is_dir():
            raise UserError(f"--output {output} is a file; give a folder for the translations")
        if output.resolve() in {Path(f).resolve().parent for f in files}:
            raise UserError(f"--output {output} holds the input images, which translating would "
                            "overwrite; give another folder")
        targets = [output / Path(f).name for f in images + clips]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise UserError(f"{len(existing)} output file(s) already exist in {existing[0].parent} "
                        f"(e.g. {image_files.file_name(existing[0])}); pass --overwrite to replace them")
    # Links, folders where a file goes, unwritable places: refused before any work.
    return images, clips, [checked_output(t, overwrite=overwrite) for t in targets]


def scaled_size(size, max_size, even=False):
    """(height, width) with the longer side at most max_size (0: any), the shape kept;
    `even`: both rounded down to even numbers, as video encoders need."""
    height, width = size
    factor = min(1.0, max_size / max(height, width)) if max_size else 1.0
    height, width = (max(1, round(height * factor)), max(1, round(width * factor)))
    return (max(2, height - height % 2), max(2, width - width % 2)) if even else (height, width)


def bytes_per_pixel(generator, probe=64):
    """Memory an untiled pass needs per input pixel: LIVE_ACTIVATIONS of its widest activation."""
    widest = max(machine.layer_output_bytes(generator, (1, probe, probe, 3)))
    return LIVE_ACTIVATIONS * widest / probe ** 2


def out_of_memory(name, size):
    return UserError(f"out of memory translating {name} ({size[1]}x{size[0]}); translate it "
                     "smaller with --max-size 1024, or at full size in tiles with --tile 512")


class Translator:
    """A generator compiled once for every image size, in the run's precision, with tiles
    for images larger than `tile`."""

    def __init__(self, generator, precision, tile=0):
        self.generator = models.in_precision(generator, precision)
        self.tile = tile
        self.tiled = None
        if tile:
            import tiling
            self.tiled = tiling.TiledGenerator(self.generator, tile)
        self.traced = tf.function(self.translate_batch, input_signature=[
            tf.TensorSpec((None, None, None, 3), tf.uint8)])
        self.bytes_per_pixel = bytes_per_pixel(self.generator) if machine.on_cpu() else None

    def translate_batch(self, images):
        """uint8 NHWC images -> float32 [-1, 1] translations of the same size."""
        return tf.cast(models.translate_padded(self.generator, image_files.to_network(images)),
                       tf.float32)

    def __call__(self, images, size=None, trace=True):
        """uint8 NHWC images of one size -> float32 translations (scaled to `size`, where given);
        `trace`: through the traced generator, else layer by layer."""
        if self.tiled and max(images.shape[1:3]) > self.tile:
            out = tf.stack([self.tiled(image_files.to_network(image))
                            for image in images])
        else:
            if self.bytes_per_pixel and (self.bytes_per_pixel * np.prod(images.shape[:3])
                                         > (machine.available_memory() or float("inf"))):
                raise MemoryError
            out = self.traced(images) if trace else self.translate_batch(images)
        if size is not None and tuple(size) != tuple(out.shape[1:3]):
            out = tf.image.resize(out, size)
        return out.numpy()


class Writers:
    """Files written by threads while the next batch is translated; the first failure is raised."""

    def __init__(self, workers=WRITER_THREADS):
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.pending = collections.deque()
        self.limit = 4 * workers

    def submit(self, fn, *args):
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.limit:
            self.pending.popleft().result()

    def __enter__(self):
        return self

    def __exit__(self, *error):
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(cancel_futures=True)


def write_translation(target, image):
    try:
        image_files.write_image(target, image)  # a failed write is one line already (fileio.atomic_write)
    except ValueError as error:
        raise UserError(f"cannot write {target}: {config.one_line(error)}") from None


def image_batches(images, max_size, keep_size, tile):
    """[(indices into images, translated size, output size)]: images of one size together,
    up to BATCH_PIXELS a batch, or alone where tiles will translate them."""
    groups = {}
    for i, image in enumerate(images):
        size = scaled_size(image.size, max_size)
        groups.setdefault((size, image.size if keep_size else size), []).append(i)
    batches = []
    for (size, out_size), members in groups.items():
        count = 1 if tile and max(size) > tile else max(1, BATCH_PIXELS // (size[0] * size[1]))
        batches += [(members[i:i + count], size, out_size) for i in range(0, len(members), count)]
    return batches


def image_dataset(images, batches):
    """(batch number, indices, uint8 images) per batch, decoded in parallel, in the order of
    `batches`.

    A file whose body fails to decode (its header and a quick look passed)
    is left out; its batch then comes short, at the end.
    """
    order = [(b, i) for b, (members, _, _) in enumerate(batches) for i in members]
    lengths = tf.constant([len(members) for members, _, _ in batches], tf.int64)
    sizes = [batches[b][1] for b, _ in order]
    ds = tf.data.Dataset.from_tensor_slices((
        [b for b, _ in order], [i for _, i in order], [os.fsencode(images[i]) for _, i in order],
        [images[i].orientation for _, i in order], tf.constant(sizes, tf.int32)))

    def load(batch, index, path, orientation, size):
        image = image_files.decode(path, orientation)
        image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), lambda: image,
                        lambda: tf.cast(tf.round(tf.clip_by_value(tf.image.resize(
                            image, size, antialias=True), 0, 255)), tf.uint8))
        return batch, index, image

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    ds = ds.group_by_window(lambda batch, *_: tf.cast(batch, tf.int64),
                            lambda key, window: window.batch(lengths[key]),
                            window_size_func=lambda key: lengths[key])
    return ds.map(lambda batch, index, image: (batch[0], index, image)).prefetch(1)


def translate_images(translator, files, targets, max_size, keep_size):
    """(images translated, ['name (why)' of those skipped])."""
    if not files:
        return 0, []
    images, skipped, usable_targets = [], [], []
    for path, target in zip(files, targets):
        try:
            images.append(image_files.inspect_image(path))
            usable_targets.append(target)
        except image_files.UnusableImage as why:
            skipped.append(f"{image_files.file_name(path)} ({why})")
    targets = usable_targets
    batches = image_batches(images, max_size, keep_size, translator.tile)
    batches_of_size = collections.Counter(size for _, size, _ in batches)
    progress = report.CountProgress(len(images), "images")
    written = set()
    with Writers() as writers:
        for batch, indices, pixels in image_dataset(images, batches):
            indices = indices.numpy()
            first = images[indices[0]]
            try:
                members, size, out_size = batches[int(batch)]
                trace = (batches_of_size[size] >= TRACE_FROM_BATCHES
                         or len(members) * size[0] * size[1] > UNTRACED_PIXELS)
                out = translator(pixels, out_size, trace)
            except (tf.errors.ResourceExhaustedError, MemoryError):
                raise out_of_memory(image_files.file_name(first), first.size) from None
            for i, image in zip(indices, out):
                writers.submit(write_translation, targets[i], image)
                written.add(i)
            progress.add(len(indices))
    progress.finish()
    skipped += [f"{image_files.file_name(image)} (unreadable)" for i, image in enumerate(images)
                if i not in written]
    return len(written), skipped


# --- video clips -------------------------------------------------------------

def require_av():
    try:
        import av
    except ImportError:
        raise UserError("translating video clips needs the optional package av (PyAV, "
                        "FFmpeg included): pip install av") from None
    return av


def translate_clip(translator, source, target, max_size, keep_size):
    """Translate one clip into `target` at its frame rate; True if its sound was left out.

    Raises UnusableImage for a file that holds no readable video.
    """
    av = require_av()
    try:
        clip = av.open(str(source))
    except av.error.FFmpegError as error:
        raise image_files.UnusableImage(f"unreadable: {config.one_line(error)}") from None
    with clip:
        if not clip.streams.video:
            raise image_files.UnusableImage("no video stream")
        stream = clip.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or 25
        original = (stream.codec_context.height, stream.codec_context.width)
        size = scaled_size(original, max_size, even=True)
        out_size = scaled_size(original, 0, even=True) if keep_size else size
        broken = []
        batches = tf.data.Dataset.from_generator(
            lambda: decoded_frames(av, clip, stream, size, broken),
            output_signature=tf.TensorSpec((*size, 3), tf.uint8))
        batches = batches.batch(max(1, BATCH_PIXELS // (size[0] * size[1]))).prefetch(1)
        print(f"{image_files.file_name(source)}: {stream.frames or 'unknown number of'} frames at "
              f"{float(rate):g} frames/s, {original[1]}x{original[0]}")
        progress = report.CountProgress(stream.frames, "frames")
        try:
            with atomic_write(target) as tmp:
                encode(av, tmp, Path(target).suffix.lower(), rate, out_size,
                       translated_frames(translator, batches, out_size, progress, source))
                if broken and not progress.done:
                    raise image_files.UnusableImage(f"unreadable: {broken[0]}")
        except av.error.FFmpegError as error:
            raise UserError(f"cannot write {target}: {config.one_line(error)}") from None
        progress.finish()
        if broken:
            warnings.warn(f"{image_files.file_name(source)} breaks off after frame {progress.done} "
                          f"({broken[0]}); the {progress.done} frames before are translated "
                          f"into {target}", BrokenClipWarning)
        return bool(clip.streams.audio)


class BrokenClipWarning(UserWarning):
    """A clip's video stops decoding part-way; the frames before it are translated."""


def decoded_frames(av, clip, stream, size, broken):
    """The clip's frames as uint8 arrays of `size`, up to the first that fails to decode; its
    error is appended to `broken`."""
    try:
        for frame in clip.decode(stream):
            yield frame.to_ndarray(format="rgb24", height=size[0], width=size[1])
    except av.error.FFmpegError as error:
        broken.append(error.strerror or config.one_line(error))


def translated_frames(translator, batches, size, progress, source):
    """uint8 frames, translated batch by batch."""
    for pixels in batches:
        try:
            out = translator(pixels, size)
        except (tf.errors.ResourceExhaustedError, MemoryError):
            raise out_of_memory(image_files.file_name(source), size) from None
        progress.add(len(out))
        yield from np.asarray(image_files.to_uint8(out))


def encode(av, path, suffix, rate, size, frames):
    """Write `frames` (uint8 HxWx3) to the video file `path` at `rate` frames a second.

    One thread encodes while the next batch is translated.
    """
    with av.open(str(path), "w", format=None) as out, Writers(workers=1) as encoder:
        stream = out.add_stream(VIDEO_CODECS.get(suffix, "libx264"), rate=rate)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"

        def put(frame):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for frame in frames:
            encoder.submit(put, frame)
        encoder.submit(lambda: [out.mux(packet) for packet in stream.encode()])
