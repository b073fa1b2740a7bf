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
import atexit
import importlib
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import config  # noqa: E402
import flags  # noqa: E402

class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise config.UserError(message)


def add_evaluate_flags(parser):
    # --name, --data and --image-size: the run's, where one is scored.
    flags.add_config_flags(parser, ("name", "data", "image_size", "results_dir"))
    parser.add_argument("--generators", nargs=2, metavar=("A2B", "B2A"),
                        help="score these saved generators instead of a run's")
    parser.add_argument("--no-fid", action="store_true", help="skip FID and KID")
    parser.add_argument("--inception-weights", help="a local InceptionV3 (no top) weights file")


def add_study_flags(parser):
    # Defaults live in study.py, imported only once TensorFlow is (quietly).
    parser.add_argument("--datasets", nargs="+",
                        help="datasets with a paired truth (default: photos painterly)")
    parser.add_argument("--variants", nargs="+",
                        help="variants to train (default: the CycleGAN ones; CUT's by name, "
                             "e.g. cut fastcut; see docs/study.md)")
    parser.add_argument("--steps", type=int, help="training steps per variant (default: 160)")
    parser.add_argument("--samples", help="also a .png of each dataset's first test images, their "
                                          "truth and every variant's translation side by side")
    flags.add_config_flags(parser, ("image_size", "seed", "precision"))  # image size: the demo data's


def build_parser():
    parser = Parser(prog="main.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    train = commands.add_parser("train", help="train a CycleGAN (default)")
    flags.add_config_flags(train)
    for name, text in flags.RUN_FLAGS.items():
        train.add_argument(f"--{name}", action="store_true", help=text)
    bench = commands.add_parser("benchmark", help="time the training step and input pipeline")
    flags.add_config_flags(bench)
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
    translate.add_argument("--input", required=True,
                           help="an image or video file, or a folder of them")
    translate.add_argument("--output", required=True,
                           help="folder for the translations (for one clip also a video file)")
    translate.add_argument("--overwrite", action="store_true",
                           help="replace translations already in --output")
    flags.add_config_flags(translate, ("precision",))
    translate.add_argument("--max-size", type=int, default=0, metavar="N",
                           help="scale images whose longer side exceeds N down to N first "
                                "(the official --load_size); 0: translate at full size")
    translate.add_argument("--keep-size", action="store_true",
                           help="with --max-size: scale the translations back to the input's size")
    translate.add_argument("--tile", type=int, default=0, metavar="N",
                           help="translate images larger than N x N pixels in overlapping tiles, "
                                "in bounded memory, with the same result; 0: whole")
    add_evaluate_flags(commands.add_parser("evaluate", help="score a trained run on the test split"))
    summary = commands.add_parser("summary", help="print the models' sizes and outputs")
    flags.add_config_flags(summary, ("preset", "image_size", "model"))
    add_study_flags(commands.add_parser(
        "study", help="compare settings by how much a short run beats doing nothing"))
    convert = commands.add_parser("convert", help="an official PyTorch CycleGAN .pth into a Keras .h5")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--pth", help="a ResnetGenerator or 70x70 NLayerDiscriminator state dict")
    source.add_argument("--pretrained", metavar="NAME", help="an official pretrained model's name")
    convert.add_argument("--output", required=True, help="the .h5 (or .keras) to write")
    flags.add_config_flags(convert, ("image_size",))  # the paper preset's: a discriminator's input
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
    if not argv or argv[0] not in tuple(HANDLERS) + ("-h", "--help"):
        argv = ["train"] + list(argv)
    return build_parser().parse_args(argv)


# Each command's body, as "module.function" taking the parsed flags; imported only when run.
HANDLERS = {
    "train": "train.command",
    "translate": "translate.command",
    "evaluate": "metrics.evaluate",
    "summary": "cut.summary",
    "benchmark": "benchmark.command",
    "study": "study.command",
    "convert": "pretrained.convert_command",
    "export": "export.command",
}


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        import_tensorflow_quietly()
        module, function = HANDLERS[args.command].split(".")
        getattr(importlib.import_module(module), function)(args)
    except config.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, which handles its own
        print("\nstopped (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


def exit_at_once(code):
    """Ends the process without the interpreter's teardown of TensorFlow (about a second)
    once Python's exit handlers have run and the output is flushed."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {category.__name__}: {message}\n"
    # Raised inside Keras itself under NumPy 2, once per weight: noise for users.
    warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
    code = main()
    if sys.argv[1:2] == ["translate"]:  # its files are whole and in place when it returns
        exit_at_once(code)
    sys.exit(code)
