"""`main.py translate`: turn an image, or a folder of them, around with a saved generator."""
import warnings
from pathlib import Path

import data
import models
from config import UserError
from fileio import checked_output


def generator_path(args):
    """--generator as given, or the cached conversion of an official --pretrained model."""
    if args.pretrained:
        import pretrained
        return pretrained.pretrained_generator(args.pretrained)
    return args.generator


def command(args):
    translate(generator_path(args), args.input, args.output, args.overwrite)


def translate(generator_path, input_path, output_dir, overwrite=False):
    """Translate an image or a folder of them into output_dir, never over an original."""
    generator = models.load_generator(generator_path)
    files = [str(input_path)] if Path(input_path).is_file() else data.list_images(input_path)
    if not files:
        raise UserError(f"no images found in {input_path}")
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder for the translated images")
    if output.resolve() in {Path(f).resolve().parent for f in files}:
        raise UserError(f"--output {output} holds the input images, which translating would "
                        "overwrite; give another folder")
    targets = [output / Path(f).name for f in files]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise UserError(f"{len(existing)} output file(s) already exist in {output} (e.g. "
                        f"{data.file_name(existing[0])}); pass --overwrite to replace them")
    targets = [checked_output(t, overwrite=overwrite) for t in targets]
    skipped = []
    for path, target in zip(files, targets):
        try:
            image = data.read_image(path)
        except data.UnusableImage as why:
            skipped.append(f"{data.file_name(path)} ({why})")
            continue
        data.write_image(target, models.translate_any_size(generator, image))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} image(s) of {input_path}: " + ", ".join(skipped),
                      data.SkippedImagesWarning)
    print(f"Translated {len(files) - len(skipped)} image(s) into {output_dir}")
