"""CycleGAN (Keras 3): train, translate images, summarise the models.

    python main.py --data monet2photo          # train (the default command)
    python main.py translate --generator G.h5 --input DIR --output DIR
    python main.py translate --pretrained monet2photo --input DIR --output DIR
    python main.py convert --pth latest_net_G.pth --output G.h5  # an official PyTorch model
    python main.py export --generator G.h5 --format onnx --output G.onnx
    python main.py evaluate --name monet2photo  # quality numbers on the test split
    python main.py summary --preset paper --image-size 256
    python main.py benchmark --preset book --image-size 128
    python main.py study                       # which settings beat doing nothing, soonest
"""
import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import config  # noqa: E402

COMMANDS = ("train", "translate", "evaluate", "summary", "benchmark", "study", "convert", "export")


class CliError(config.UserError):
    """A user mistake reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CliError(message)


def add_config_flags(parser):
    """One flag per Config field, defaulting to None so presets fill the gaps."""
    for field in dataclasses.fields(config.Config):
        flag = config.flag(field.name)
        text = config.flag_help(field).replace("%", "%%")
        if field.type is bool or isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=type(field.default), default=None,
                                choices=config.CHOICES.get(field.name), help=text)


def add_evaluate_flags(parser):
    parser.add_argument("--name", help="the run in RESULTS_DIR/NAME to score")
    parser.add_argument("--generators", nargs=2, metavar=("A2B", "B2A"),
                        help="score these saved generators instead of a run's")
    parser.add_argument("--data", help="dataset (default: the run's)")
    parser.add_argument("--image-size", type=int, help="pixels (default: the run's)")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--no-fid", action="store_true", help="skip FID and KID")
    parser.add_argument("--inception-weights", help="a local InceptionV3 (no top) weights file")


def add_study_flags(parser):
    # Defaults live in study.py, imported only once TensorFlow is (quietly).
    parser.add_argument("--datasets", nargs="+",
                        help="datasets with a paired truth (default: demo photos)")
    parser.add_argument("--variants", nargs="+", help="variants to train (default: all; see docs/study.md)")
    parser.add_argument("--steps", type=int, help="training steps per variant (default: 160)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)


def build_parser():
    parser = Parser(prog="main.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    train = commands.add_parser("train", help="train a CycleGAN (default)")
    add_config_flags(train)
    for name, text in config.RUN_FLAGS.items():
        train.add_argument(f"--{name}", action="store_true", help=text)
    bench = commands.add_parser("benchmark", help="time the training step and input pipeline")
    add_config_flags(bench)
    bench.add_argument("--steps", type=int, default=10, help="timed training steps")
    bench.add_argument("--pipeline-images", type=int, default=200, help="image files per domain")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--compare", action="store_true",
                       help="time float32 and --precision auto's choice, steps interleaved, "
                            "and print their ratio")
    translate = commands.add_parser("translate", help="translate images with a saved generator")
    generator = translate.add_mutually_exclusive_group(required=True)
    generator.add_argument("--generator", help="a saved generator .h5")
    generator.add_argument("--pretrained", metavar="NAME",
                           help="an official pretrained model, e.g. monet2photo (downloaded once)")
    translate.add_argument("--input", required=True, help="an image file or a folder of images")
    translate.add_argument("--output", required=True, help="folder for the translated images")
    translate.add_argument("--overwrite", action="store_true",
                           help="replace translated images already in --output")
    add_evaluate_flags(commands.add_parser("evaluate", help="score a trained run on the test split"))
    summary = commands.add_parser("summary", help="print the models' sizes and outputs")
    summary.add_argument("--preset", default="book", choices=tuple(config.PRESETS))
    summary.add_argument("--image-size", type=int, default=None)
    add_study_flags(commands.add_parser(
        "study", help="compare settings by how much a short run beats doing nothing"))
    convert = commands.add_parser("convert", help="an official PyTorch CycleGAN .pth into a Keras .h5")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--pth", help="a ResnetGenerator or 70x70 NLayerDiscriminator state dict")
    source.add_argument("--pretrained", metavar="NAME", help="an official pretrained model's name")
    convert.add_argument("--output", required=True, help="the .h5 (or .keras) to write")
    convert.add_argument("--image-size", type=int, default=256,
                         help="a discriminator's input size (generators take any size)")
    export = commands.add_parser("export", help="a saved generator as .keras, SavedModel, ONNX or LiteRT")
    export.add_argument("--generator", required=True, help="a saved generator .h5")
    export.add_argument("--format", required=True,
                        choices=("keras", "saved_model", "onnx", "tflite"))
    export.add_argument("--output", required=True, help="the file (a folder for saved_model) to write")
    export.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                        help="tflite only: one input size instead of any (needed with --upsample resize)")
    for sub in commands.choices.values():
        sub.error = parser.error
    return parser


def import_tensorflow_quietly():
    """Import TensorFlow and find its devices with C++ start-up logging muted.

    Its native code writes CUDA probing notes straight to file descriptor 2,
    past TF_CPP_MIN_LOG_LEVEL; they would bury our one-line messages.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def parse_args(argv):
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["train"] + list(argv)
    return build_parser().parse_args(argv)


def config_from_args(args):
    """The Config for a train command: preset, then demo defaults, then flags.

    With --resume, the run's saved config replaces preset and defaults;
    flags may change only what shapes neither the networks nor the data
    (train.saved_config).
    """
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config.Config)}
    given = {k: v for k, v in given.items() if v is not None}
    data = given.get("data", "demo")
    # The dataset folder's own name, also for paths such as `..` or `photos/`.
    given.setdefault("name", Path(data).resolve().name or "run")
    config.check_run_name(given["name"])
    if args.resume:
        import train
        return train.saved_config(given)
    preset = given.pop("preset", "book")
    if data == "demo":
        given = {**config.DEMO_DEFAULTS, **given}
    return config.make_config(preset, **given)


# --- translate -------------------------------------------------------------

def translate(generator_path, input_path, output_dir, overwrite=False):
    """Translate an image or a folder of them into output_dir, never over an original."""
    import data
    import models
    generator = models.load_generator(generator_path)
    files = [str(input_path)] if Path(input_path).is_file() else data.list_images(input_path)
    if not files:
        raise CliError(f"no images found in {input_path}")
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise CliError(f"--output {output} is a file; give a folder for the translated images")
    if output.resolve() in {Path(f).resolve().parent for f in files}:
        raise CliError(f"--output {output} holds the input images, which translating would "
                       "overwrite; give another folder")
    targets = [output / Path(f).name for f in files]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise CliError(f"{len(existing)} output file(s) already exist in {output} (e.g. "
                       f"{data.file_name(existing[0])}); pass --overwrite to replace them")
    output.mkdir(parents=True, exist_ok=True)
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


def generator_path(args):
    """--generator as given, or the cached conversion of an official --pretrained model."""
    if args.pretrained:
        import pretrained
        return pretrained.pretrained_generator(args.pretrained)
    return args.generator


# --- convert and export ----------------------------------------------------

def convert(args):
    import pretrained
    if args.pretrained:
        model = pretrained.convert_pretrained(args.pretrained, args.output)
    else:
        model = pretrained.convert(args.pth, args.output, args.image_size)
    print(f"Converted {args.pth or args.pretrained} ({pretrained.describe(model)}) into {args.output}")


# --- evaluate --------------------------------------------------------------

def evaluation_target(args):
    """(run folder or None, generator paths, dataset, image size, output folder) for evaluate."""
    if args.generators:
        if not args.data:
            raise CliError("--generators needs --data")
        name = args.name or f"{Path(args.data).resolve().name}-eval"
        config.check_run_name(name)
        size = args.image_size or (config.DEMO_DEFAULTS["image_size"] if args.data == "demo"
                                   else config.Config.image_size)
        return None, args.generators, args.data, size, Path(args.results_dir) / name
    if not args.name:
        raise CliError("evaluate needs --name NAME (a training run) or --generators A2B B2A --data D")
    config.check_run_name(args.name)
    run = Path(args.results_dir) / args.name
    if not (run / "config.json").is_file():
        raise CliError(f"no run {args.name!r}: {run / 'config.json'} is missing")
    saved = json.loads((run / "config.json").read_text())
    from train_utils import MODEL_FILES
    return (run, [run / "models" / MODEL_FILES[g] for g in ("g_ab", "g_ba")],
            args.data or saved["data"], args.image_size or saved["image_size"], run)


def fid_kid_scores(args, g_ab, g_ba, files_a, files_b, size):
    """FID and KID, or none after one line saying why they are skipped."""
    import metrics
    try:
        if args.no_fid:
            raise metrics.FeaturesUnavailable("--no-fid given")
        inception = metrics.load_inception(args.inception_weights)
        return metrics.distribution_scores(inception, g_ab, g_ba, files_a, files_b, size)
    except metrics.FeaturesUnavailable as why:
        print(f"FID/KID skipped: {why}")
        return {}


def evaluate(args):
    import data
    import metrics
    import models
    run, generators, dataset, size, out = evaluation_target(args)
    config.make_config(image_size=size)  # the same size checks as training
    g_ab, g_ba = (models.load_generator(path) for path in generators)
    root = data.resolve_dataset(dataset)
    files_a, files_b = (data.domain_files(root, "test", d) for d in "AB")
    truth = metrics.truth_files(files_a)
    source = f"{len(files_a)} A and {len(files_b)} B test images of {root} at {size} px"
    print(f"Evaluating on {source}" + (", with paired truth" if truth else ""))
    scores = metrics.image_scores(g_ab, g_ba, metrics.file_batches(files_a, size, truth),
                                  metrics.file_batches(files_b, size))
    scores.update(fid_kid_scores(args, g_ab, g_ba, files_a, files_b, size))
    print(metrics.format_table(scores))
    if truth:
        print(metrics.truth_verdict(scores))
    out.mkdir(parents=True, exist_ok=True)
    metrics.save_scores(out / "metrics.json", scores, f"evaluate: {source}")
    if run is not None:
        metrics.write_results_page(run)
    print(f"Metrics in {out / 'metrics.json'}" + (f", page {run / 'index.html'}" if run else ""))


# --- benchmark -------------------------------------------------------------

def benchmark_command(args):
    import benchmark
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config.Config)}
    cfg = config.make_config(given.pop("preset") or "book", **given)
    if args.steps < 1 or args.pipeline_images < 1:
        raise CliError("--steps and --pipeline-images must be at least 1")
    if args.compare:
        figures = benchmark.compare_precisions(cfg, args.steps)
    else:
        figures = benchmark.run_benchmark(cfg, args.steps, args.pipeline_images)
    print(json.dumps(figures, indent=2) if args.json else benchmark.format_figures(figures))


# --- summary ---------------------------------------------------------------

def summary(preset, image_size):
    import models
    cfg = config.make_config(preset, image_size=image_size)
    gan = models.build_cyclegan(cfg)
    for model in (gan.g_ab, gan.g_ba, gan.d_a, gan.d_b):
        print(f"{model.name} params={model.count_params()}")
    print(f"discriminator output={'x'.join(map(str, gan.patch_shape))} "
          f"receptive_field={models.receptive_field(gan.d_a)}px at {cfg.image_size}px input")
    for output, weight in zip(models.OUTPUTS, models.loss_weights(cfg)):
        print(f"adversarial output {output.name}: loss={output.loss} weight={weight:g}")


# --- study -----------------------------------------------------------------

def study_command(args):
    import study
    steps = study.DEFAULT_STEPS if args.steps is None else args.steps
    if steps < 2:
        raise CliError(f"--steps must be at least 2, got {steps}")
    study.run_study(args.datasets or study.DATASETS, args.variants or tuple(study.VARIANTS),
                    args.image_size, steps, args.seed)


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        import_tensorflow_quietly()
        if args.command == "translate":
            translate(generator_path(args), args.input, args.output, args.overwrite)
        elif args.command == "convert":
            convert(args)
        elif args.command == "export":
            import export
            export.export(args.generator, args.format, args.output, args.size)
        elif args.command == "evaluate":
            evaluate(args)
        elif args.command == "benchmark":
            benchmark_command(args)
        elif args.command == "summary":
            summary(args.preset, args.image_size)
        elif args.command == "study":
            study_command(args)
        else:
            import train
            train.train(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    except config.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, which handles its own
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {category.__name__}: {message}\n"
    # Raised inside Keras itself under NumPy 2, once per weight: noise for users.
    warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
    sys.exit(main())
