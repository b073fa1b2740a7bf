"""Every hyperparameter in one place: the Config dataclass and its presets.

The CLI (`main.py`) fills a Config; the builders in `models.py` and the
run in `train.py` read it; a preset is just a named Config value.
"""
import dataclasses
import os
import re
from dataclasses import dataclass


class UserError(Exception):
    """A mistake the user must fix (a flag, a file, a folder); one-line message."""
    exit_code = 2


def one_line(error):
    """The first line of an exception's message, or its type when it has none."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class DataError(UserError):
    """A dataset problem the user must fix; its message is one line."""


def op_error_text(error):
    """A TensorFlow error's own words, without the function, node and op it names."""
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", one_line(getattr(error, "message", error)))
    return re.sub(r".*Iterator::\S+: ", "", text).split(" [Op:")[0].strip()


def setting(default, help, shown=None):
    """A Config field with its help text, for --help and docs/flags.md's table.

    `shown` stands for the default where the CLI fills it in some other way.
    """
    return dataclasses.field(default=default, metadata={"help": help, "shown": shown})


@dataclass(frozen=True)
class Config:
    # Run bookkeeping.
    name: str = setting("cyclegan", "run name: RESULTS_DIR/NAME, LOG_DIR/NAME", shown="dataset name")
    data: str = setting("demo", "demo, photos, painterly, an official dataset or a folder with "
                                 "trainA/, trainB/")
    preset: str = setting("book", "book (the chapter), paper (Zhu et al.) or fast (the study's best)")
    results_dir: str = setting("results", "where run folders go")
    log_dir: str = setting("logs", "where TensorBoard logs go")
    seed: int = setting(0, "seeds Python, NumPy, TensorFlow and the data order")
    model: str = setting("cyclegan", "what is trained: cyclegan (the chapter's), or cut or fastcut "
                                     "(Park et al., 2020: one generator, PatchNCE, no cycle; their own "
                                     "defaults: no pool, joint D update, 200+200 epochs, "
                                     "fastcut 150+50)")

    # Data.
    image_size: int = setting(128, "training crop size in pixels, from 32 to 1024, a multiple of "
                                        "the generator's (4 for resnet)")
    load_size: int = setting(0, "resize to this, then random-crop --image-size; 0: no crop")
    limit: int = setting(0, "images per domain; 0: all")

    # Generator.
    gen: str = setting("resnet", "generator: resnet (encoder, residual blocks, decoder)")
    filters: int = setting(32, "width of the generator's first conv (official --ngf)")
    res_blocks: int = setting(6, "residual blocks; 0: the paper's rule, 9 at >= 256 px, else 6")
    norm: str = setting("instance", "norm in the generator's encoder and decoder")
    res_norm: str = setting("batch", "norm in the residual blocks")
    norm_affine: bool = setting(True, "learned scale and offset in instance norm")
    padding: str = setting("zero", "padding of the generator's stride-1 convs")
    alignment: str = setting("keras", "torch: pad as the official PyTorch networks; keras: 'same'")
    init: str = setting("glorot", "weight init; normal: N(0, 0.02)")
    upsample: str = setting("transpose", "resize: nearest resize then conv (no checkerboard)")
    global_skip: bool = setting(False, "output = input + a learned change: an untrained generator "
                                       "is the identity")

    # Discriminator.
    disc: str = setting("book", "book: four stride-2 convs; patch70: the paper's 70x70")
    disc_filters: int = setting(64, "width of the discriminator's first conv (official --ndf)")
    disc_activation: str = setting("sigmoid", "linear: least squares on raw scores")

    # Losses and optimisation.
    lambda_cycle: float = setting(10.0, "weight of each cycle loss (official --lambda_A, --lambda_B)")
    lambda_identity: float = setting(1.0, "weight of each identity loss, absolute: the official "
                                          "--lambda_identity 0.5 (relative to --lambda_A) is 5 here")
    lr: float = setting(2e-4, "Adam learning rate")
    beta1: float = setting(0.5, "Adam beta_1")
    adam_epsilon: float = setting(1e-7, "Adam epsilon; 1e-8 is PyTorch's, as in the official code")
    adam: str = setting("keras", "keras: epsilon added to sqrt(v); torch: to the bias-corrected "
                                 "sqrt(v / (1 - beta_2^t)), as PyTorch's Adam")
    batch_size: int = setting(1, "images per domain per step (per replica)")
    epochs: int = setting(200, "epochs at the constant learning rate (official --n_epochs)")
    decay_epochs: int = setting(0, "further epochs, the learning rate decaying linearly to 0 "
                                   "(official --n_epochs_decay)")
    lr_schedule: str = setting("documented", "documented: the decay starts after --epochs; "
                                             "official: as the official train.py applies it, one "
                                             "epoch ahead, the last epoch at 0")
    steps_per_epoch: int = setting(0, "0: max(|A|, |B|) / batch size")
    pool_size: int = setting(0, "generated images kept per domain to train D on; 0: none")
    d_update: str = setting("split", "split: real, then fake; joint: one update, loss halved")

    # CUT and FastCUT (--model cut, fastcut); FastCUT's own defaults are in MODEL_DEFAULTS.
    lambda_gan: float = setting(1.0, "CUT: weight of the adversarial loss (official --lambda_GAN)")
    lambda_nce: float = setting(1.0, "CUT: weight of PatchNCE (official --lambda_NCE; fastcut: 10)")
    nce_idt: bool = setting(True, "CUT: also PatchNCE between B and G(B) (official --nce_idt; "
                                  "fastcut: off)")
    nce_layers: str = setting("0,4,8,12,16", "CUT: the official --nce_layers: 0 the image, 1-3, "
                                             "4-7 and 8-11 the three encoder convs (conv, norm, "
                                             "relu), 12 and on the residual blocks")
    num_patches: int = setting(256, "CUT: patches sampled per layer (official --num_patches)")
    nce_temperature: float = setting(0.07, "CUT: PatchNCE temperature (official --nce_T)")
    nce_head: int = setting(256, "CUT: width of the MLP head F (official --netF_nc)")
    flip_equivariance: bool = setting(False, "CUT: G(flip(A)) flipped back must match A patch by "
                                             "patch, half the steps (fastcut: on)")

    # Devices and speed.
    strategy: str = setting("default", "one device, all local GPUs, or TF_CONFIG's machines")
    precision: str = setting("auto", "compute dtype, weights stay float32; auto: bfloat16 where "
                                     "the hardware has it natively, else float32")
    jit_compile: bool = setting(False, "XLA compilation of the steps (docs/benchmarks.md)")
    conv_gradients: str = setting("auto", "how training computes convolution gradients: "
                                          "tensorflow (its own kernels) or convolution (as forward "
                                          "convolutions); auto: convolution on a CPU without "
                                          "oneDNN's ops")

    # Outputs.
    sample_every: int = setting(10, "epochs between sample grids and metrics")
    save_every: int = setting(10, "epochs between .h5 saves of the four networks")
    log_every: int = setting(1, "steps between TensorBoard scalars")
    checkpoint_every: int = setting(0, "steps between checkpoints; 0: each epoch")

    @property
    def total_epochs(self):
        return self.epochs + self.decay_epochs

    @property
    def load_px(self):
        return self.load_size or self.image_size

    @property
    def n_res_blocks(self):
        if self.res_blocks:
            return self.res_blocks
        return 9 if self.image_size >= 256 else 6


# The chapter's code with its bugs fixed: Config's defaults.
BOOK = Config()

# Zhu et al. (2017) and their official PyTorch implementation.
PAPER = Config(
    preset="paper",
    image_size=256,
    load_size=286,
    filters=64,
    res_blocks=0,
    res_norm="instance",
    norm_affine=False,
    padding="reflect",
    alignment="torch",
    init="normal",
    disc="patch70",
    disc_activation="linear",
    lambda_identity=5.0,
    epochs=100,
    decay_epochs=100,
    pool_size=50,
    d_update="joint",
    adam_epsilon=1e-8,
    adam="torch",
    lr_schedule="official",
)

# The book's design with the changes `python main.py study` found to beat
# doing nothing soonest (docs/study.md):
# - global_skip: the generator starts as the identity, not as noise, so it
#   only has to learn the change; the one change that matters most;
# - res_norm instance: BatchNorm at batch size 1 trains on each image's own
#   statistics but a saved generator runs on running averages;
# - disc_activation linear: least squares on raw scores (the paper's
#   LSGAN); a sigmoid under mse saturates and its gradients fade;
# - upsample resize: resize-then-conv cannot make checkerboard patterns.
# Identity weight, pool, discriminator updates and learning rate stay the book's.
FAST = dataclasses.replace(
    BOOK,
    preset="fast",
    res_norm="instance",
    disc_activation="linear",
    upsample="resize",
    global_skip=True,
)

PRESETS = {"book": BOOK, "paper": PAPER, "fast": FAST}

# What --model cut and --model fastcut change unless given, as the official CUT code's
# options do: no image pool, one halved D update, its epochs, and FastCUT's own weights.
MODEL_DEFAULTS = {
    "cyclegan": {},
    "cut": dict(pool_size=0, d_update="joint", epochs=200, decay_epochs=200),
    "fastcut": dict(pool_size=0, d_update="joint", epochs=150, decay_epochs=50, lambda_nce=10.0,
                    nce_idt=False, flip_equivariance=True),
}

# Settings the built-in demo data uses unless the user sets them: small
# images and few epochs (no decay, whatever --model's own schedule), so a
# whole run takes minutes on a laptop CPU.
DEMO_DEFAULTS = dict(image_size=32, epochs=4, decay_epochs=0, sample_every=1, save_every=2)

# Settings that shape the networks or the data they see: a resumed run must keep them.
ARCHITECTURE_FIELDS = ("image_size", "gen", "filters", "res_blocks", "norm", "res_norm",
                       "norm_affine", "padding", "alignment", "upsample", "global_skip", "disc",
                       "disc_filters", "disc_activation", "pool_size", "batch_size", "model",
                       "nce_layers", "nce_head", "nce_idt")
# Settings a resumed run must keep as well: the data, its order and its
# epochs, and the replicas and dtypes its checkpoint was written with.
RESUME_FIXED = ARCHITECTURE_FIELDS + ("preset", "data", "seed", "load_size", "limit",
                                      "steps_per_epoch", "precision", "strategy")

# Settings that say where a run is: taken from the command line, never from a saved config.
LOCATION_FIELDS = ("name", "results_dir", "log_dir")

# Larger inputs are for `translate`, which takes any size; training them needs a big accelerator.
MAX_IMAGE_SIZE = 1024

# Each test is written so that NaN fails it too.
NUMBER_RANGES = {
    "lr": (lambda v: 0 < v < float("inf"), "above 0 (and finite)"),
    "beta1": (lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    "adam_epsilon": (lambda v: 0 < v < 1, "above 0 and below 1"),
    "lambda_cycle": (lambda v: 0 <= v <= 1e4, "from 0 to 10000"),
    "lambda_identity": (lambda v: 0 <= v <= 1e4, "from 0 to 10000"),
    "lambda_gan": (lambda v: 0 <= v <= 1e4, "from 0 to 10000"),
    "lambda_nce": (lambda v: 0 <= v <= 1e4, "from 0 to 10000"),
    "nce_temperature": (lambda v: 1e-3 <= v <= 1e3, "from 0.001 to 1000"),
}

# The names of models.GENERATORS and models.DISCRIMINATORS are repeated in
# CHOICES so that the CLI can check flags before importing TensorFlow.
CHOICES = {
    "model": ("cyclegan", "cut", "fastcut"),
    "gen": ("resnet",),
    "norm": ("instance", "batch"),
    "res_norm": ("batch", "instance"),
    "padding": ("zero", "reflect"),
    "alignment": ("keras", "torch"),
    "init": ("glorot", "normal"),
    "upsample": ("transpose", "resize"),
    "disc": ("book", "patch70"),
    "disc_activation": ("sigmoid", "linear"),
    "d_update": ("split", "joint"),
    "adam": ("keras", "torch"),
    "lr_schedule": ("documented", "official"),
    "strategy": ("default", "mirrored", "multiworker"),
    "precision": ("auto", "float32", "bfloat16", "float16"),
    "conv_gradients": ("auto", "tensorflow", "convolution"),
}


def make_config(preset="book", **overrides):
    """The preset's Config with `overrides` applied (None values ignored).

    A paper-preset run below 256 px keeps the paper's 286/256 load-to-crop
    ratio unless a load size is given.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    base = PRESETS[preset]
    given = {k: v for k, v in overrides.items() if v is not None}
    # The model's own defaults (MODEL_DEFAULTS), under what is given, over the preset's.
    given = {**MODEL_DEFAULTS.get(given.get("model", base.model), {}), **given}
    unknown = set(given) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise UserError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if base.load_size and "image_size" in given and "load_size" not in given:
        given["load_size"] = round(given["image_size"] * base.load_size / base.image_size)
    cfg = dataclasses.replace(base, **given)
    validate(cfg)
    return cfg


def given_flags(args):
    """{field: value} of the Config flags given on the command line (those not given are None)."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Config)}
    return {k: v for k, v in given.items() if v is not None}


def from_flags(args, **defaults):
    """The Config of a command's parsed flags: the preset (--preset, else defaults' or book),
    then `defaults` (a command's own, such as DEMO_DEFAULTS), then every Config flag given."""
    given = given_flags(args)
    preset = given.pop("preset", defaults.pop("preset", "book"))
    return make_config(preset, **{**defaults, **given})


def checked_settings(saved):
    """The settings of a saved config.json (a parsed JSON value), checked against Config's
    fields, types, ranges and choices; location fields left out.

    Raises UserError naming the first fault.
    """
    if not isinstance(saved, dict):
        raise UserError(f"a JSON object of settings was expected, not {type(saved).__name__}")
    settings = {}
    for field in dataclasses.fields(Config):
        if field.name in LOCATION_FIELDS:
            continue
        if field.name not in saved:
            raise UserError(f"{field.name} is missing")
        value, kind = saved[field.name], type(field.default)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (isinstance(value, bool) if kind is bool else numeric if kind is float
                else isinstance(value, kind) and not isinstance(value, bool)):
            raise UserError(f"{field.name} is {value!r}, not {kind.__name__}")
        settings[field.name] = float(value) if kind is float else value
    make_config(**settings)  # ranges and choices
    return settings


def flag(field):
    return "--" + field.replace("_", "-")


# Bytes in a file name on Linux's file systems (NAME_MAX of ext4, XFS, Btrfs, tmpfs).
NAME_MAX = 255
# The longest name made of a run's: evaluate's default results folder for a dataset, NAME-eval.
EVAL_SUFFIX = "-eval"


def check_run_name(name):
    """A run name is one plain folder name: results/NAME and logs/NAME, never elsewhere; short
    enough for a file name, with what the program adds to it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"--name must be a plain folder name (no '/', not '.' or '..'), got {name!r}")
    longest = NAME_MAX - len(EVAL_SUFFIX)
    if len(os.fsencode(name)) > longest:
        raise UserError(f"--name may be at most {longest} bytes long (a file name holds "
                        f"{NAME_MAX}), got one of {len(os.fsencode(name))}")


def validate(cfg):
    """Raise UserError with one line for any setting the models cannot use."""
    check_run_name(cfg.name)
    # The multiple its sides need is the generator's own (models.check_input_size).
    if not 32 <= cfg.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be from 32 to {MAX_IMAGE_SIZE}, got {cfg.image_size}")
    if cfg.load_size and not cfg.image_size <= cfg.load_size <= 2 * MAX_IMAGE_SIZE:
        raise UserError(f"--load-size ({cfg.load_size}) must be from --image-size "
                        f"({cfg.image_size}) to {2 * MAX_IMAGE_SIZE}")
    for field, (within, wording) in NUMBER_RANGES.items():
        if not within(getattr(cfg, field)):
            raise UserError(f"{flag(field)} must be a number {wording}, got {getattr(cfg, field)}")
    for field, low in (("batch_size", 1), ("filters", 1), ("disc_filters", 1), ("epochs", 0),
                       ("decay_epochs", 0), ("steps_per_epoch", 0), ("pool_size", 0), ("limit", 0), ("res_blocks", 0),
                       ("sample_every", 1), ("save_every", 1), ("log_every", 1),
                       ("checkpoint_every", 0)):
        value = getattr(cfg, field)
        if value < low:
            raise UserError(f"{flag(field)} must be at least {low}, got {value}")
    if cfg.total_epochs < 1:
        raise UserError("--epochs plus --decay-epochs must be at least 1")
    for field, options in CHOICES.items():
        if getattr(cfg, field) not in options:
            raise UserError(f"{flag(field)} must be one of {', '.join(options)}")
    if cfg.model != "cyclegan":
        validate_cut(cfg)


def nce_layers(cfg):
    """--nce-layers as a tuple of ints, each one a point of the generator's encoder."""
    try:
        layers = tuple(int(part) for part in cfg.nce_layers.split(","))
    except ValueError:
        raise UserError(f"--nce-layers must be numbers separated by commas, got "
                        f"{cfg.nce_layers!r}") from None
    last = 11 + cfg.n_res_blocks
    if not layers or any(not 0 <= i <= last for i in layers) or len(set(layers)) < len(layers):
        raise UserError(f"--nce-layers must be distinct numbers from 0 to {last} (12 and on: the "
                        f"{cfg.n_res_blocks} residual blocks), got {cfg.nce_layers!r}")
    return layers


def validate_cut(cfg):
    nce_layers(cfg)
    for field in ("num_patches", "nce_head"):
        if getattr(cfg, field) < 1:
            raise UserError(f"{flag(field)} must be at least 1, got {getattr(cfg, field)}")
    if cfg.strategy != "default":
        raise UserError(f"--model {cfg.model} trains on one device: --strategy {cfg.strategy} "
                        "is not supported for it")
