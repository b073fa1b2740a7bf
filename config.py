"""Every hyperparameter in one place: the Config dataclass and its presets.

The CLI fills a Config, the builders in `models.py` and the loop in
`main.py` read it; a preset is just a named Config value.
"""
import dataclasses
from dataclasses import dataclass


class UserError(Exception):
    """A mistake the user must fix (a flag, a file, a folder); one-line message."""
    exit_code = 2


@dataclass(frozen=True)
class Config:
    # Run bookkeeping.
    name: str = "cyclegan"
    data: str = "demo"
    preset: str = "book"
    results_dir: str = "results"
    log_dir: str = "logs"
    seed: int = 0

    # Data.
    image_size: int = 128            # network input (crop) size
    load_size: int = 0               # resize to this before a random crop; 0 = image_size, no crop
    limit: int = 0                   # images per domain, 0 = all

    # Generator.
    filters: int = 32                # width of the first generator conv
    res_blocks: int = 6              # 0 = the paper's rule: 9 at >= 256 px, else 6
    norm: str = "instance"           # encoder/decoder norm: instance | batch
    res_norm: str = "batch"          # residual-block norm: batch | instance
    norm_affine: bool = True         # learn scale/offset in instance norm
    padding: str = "zero"            # zero | reflect
    init: str = "glorot"             # glorot | normal (N(0, 0.02))
    upsample: str = "transpose"      # transpose | resize (resize-then-conv)
    global_skip: bool = False        # output = input + learned change (starts as the identity)

    # Discriminator.
    disc: str = "book"               # book (all stride 2) | patch70 (last stride 1)
    disc_activation: str = "sigmoid" # sigmoid | linear

    # Losses and optimisation.
    lambda_cycle: float = 10.0
    lambda_identity: float = 1.0     # absolute weight of each identity loss
    lr: float = 2e-4
    beta1: float = 0.5
    batch_size: int = 1
    epochs: int = 200                # epochs at the constant learning rate
    decay_epochs: int = 0            # further epochs of linear decay to zero
    steps_per_epoch: int = 0         # 0 = max(|A|, |B|) / batch_size
    pool_size: int = 0               # image history per domain, 0 = off
    d_update: str = "split"          # split: real and fake separately | joint: one update, loss halved

    # Devices and speed.
    strategy: str = "default"        # default | mirrored (all local GPUs) | multiworker (TF_CONFIG)
    precision: str = "auto"          # auto | float32 | bfloat16 | float16 (compute; weights stay float32)
    jit_compile: bool = False        # XLA; slower on the 2-core CPU measured, try it on a GPU

    # Outputs.
    sample_every: int = 10           # epochs
    save_every: int = 10             # epochs
    log_every: int = 1               # steps between TensorBoard scalars
    checkpoint_every: int = 0        # steps between checkpoints, 0 = each epoch

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

    @property
    def loss_weights(self):
        """Weights of the adversarial model's six outputs, in output order."""
        c, i = self.lambda_cycle, self.lambda_identity
        return [1.0, 1.0, c, c, i, i]


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
    init="normal",
    disc="patch70",
    disc_activation="linear",
    lambda_identity=5.0,
    epochs=100,
    decay_epochs=100,
    pool_size=50,
    d_update="joint",
)

# The book's design with the changes `python main.py study` found to beat
# doing nothing soonest (README, "Learning fast: the study"):
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

# Settings the built-in demo data uses unless the user sets them: small
# images and few epochs, so a whole run takes minutes on a laptop CPU.
DEMO_DEFAULTS = dict(image_size=32, epochs=4, sample_every=1, save_every=2)

# Settings that shape the networks or the data they see: a resumed run must keep them.
ARCHITECTURE_FIELDS = ("image_size", "filters", "res_blocks", "norm", "res_norm", "norm_affine",
                       "padding", "upsample", "global_skip", "disc", "disc_activation", "pool_size",
                       "batch_size", "precision")

CHOICES = {
    "norm": ("instance", "batch"),
    "res_norm": ("batch", "instance"),
    "padding": ("zero", "reflect"),
    "init": ("glorot", "normal"),
    "upsample": ("transpose", "resize"),
    "disc": ("book", "patch70"),
    "disc_activation": ("sigmoid", "linear"),
    "d_update": ("split", "joint"),
    "strategy": ("default", "mirrored", "multiworker"),
    "precision": ("auto", "float32", "bfloat16", "float16"),
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
    unknown = set(given) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise UserError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if base.load_size and "image_size" in given and "load_size" not in given:
        given["load_size"] = round(given["image_size"] * base.load_size / base.image_size)
    cfg = dataclasses.replace(base, **given)
    validate(cfg)
    return cfg


def validate(cfg):
    """Raise UserError with one line for any setting the models cannot use."""
    if cfg.image_size < 32 or cfg.image_size % 4:
        raise UserError(f"--image-size must be a multiple of 4 and at least 32, got {cfg.image_size}")
    if cfg.load_size and cfg.load_size < cfg.image_size:
        raise UserError(f"--load-size ({cfg.load_size}) must be at least --image-size ({cfg.image_size})")
    for field, low in (("batch_size", 1), ("filters", 1), ("epochs", 0), ("decay_epochs", 0),
                       ("steps_per_epoch", 0), ("pool_size", 0), ("limit", 0), ("res_blocks", 0),
                       ("sample_every", 1), ("save_every", 1), ("log_every", 1),
                       ("checkpoint_every", 0)):
        value = getattr(cfg, field)
        if value < low:
            raise UserError(f"--{field.replace('_', '-')} must be at least {low}, got {value}")
    if cfg.total_epochs < 1:
        raise UserError("--epochs plus --decay-epochs must be at least 1")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    for field, options in CHOICES.items():
        if getattr(cfg, field) not in options:
            raise UserError(f"--{field.replace('_', '-')} must be one of {', '.join(options)}")
