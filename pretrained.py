"""The official PyTorch CycleGANs in Keras, without PyTorch.

`convert_state_dict` recognises an official ResnetGenerator or 70x70
NLayerDiscriminator from the keys and shapes of a state dict (read by
`pth_reader.read_pth`) and copies its weights into the paper preset's
network, which computes the same function. `pretrained_generator` fetches
an official model by name.
"""
import os
import re
import tempfile
from pathlib import Path

import download
import models
import pth_reader
from config import UserError, from_flags, make_config
from fileio import checked_output

DEFAULT_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models/{name}.pth"
URL_VARIABLE = "CYCLEGAN_PRETRAINED_URL"
PRETRAINED_DIR = "pretrained"
# An official generator's .pth is 45 MB (ngf 64, 9 blocks); a download may be at most this.
MAX_PTH_BYTES = 128 * 2 ** 20
# The names the official download script lists.
OFFICIAL_NAMES = (
    "apple2orange", "orange2apple", "summer2winter_yosemite", "winter2summer_yosemite",
    "horse2zebra", "zebra2horse", "monet2photo", "style_monet", "style_cezanne", "style_ukiyoe",
    "style_vangogh", "sat2map", "map2sat", "cityscapes_photo2label", "cityscapes_label2photo",
    "facades_photo2label", "facades_label2photo", "iphone2dslr_flower",
)

def generator_parameters(ngf, blocks):
    """(name, PyTorch weight shape, transposed) of each conv of an official ResnetGenerator.

    In its Sequential: pad 0, conv 1, norm, relu, stride-2 convs at 4 and 7,
    residual blocks from 10 (pad, conv 1, norm, relu, pad, conv 5, norm),
    two transposed convs (weights in, out, k, k) three entries apart, then
    a pad and the last conv.
    """
    wide = 4 * ngf
    params = [("model.1", (ngf, 3, 7, 7), False), ("model.4", (2 * ngf, ngf, 3, 3), False),
              ("model.7", (wide, 2 * ngf, 3, 3), False)]
    for i in range(10, 10 + blocks):
        params += [(f"model.{i}.conv_block.{j}", (wide, wide, 3, 3), False) for j in (1, 5)]
    up = 10 + blocks
    return params + [(f"model.{up}", (wide, 2 * ngf, 3, 3), True),
                     (f"model.{up + 3}", (2 * ngf, ngf, 3, 3), True),
                     (f"model.{up + 7}", (3, ngf, 7, 7), False)]


def discriminator_parameters(ndf):
    """The same for the official 70x70 NLayerDiscriminator (n_layers 3): five 4x4 convs."""
    widths = (3, ndf, 2 * ndf, 4 * ndf, 8 * ndf, 1)
    return [(f"model.{i}", (widths[n + 1], widths[n], 4, 4), False)
            for n, i in enumerate((0, 2, 5, 8, 11))]


BLOCK_KEY = re.compile(r"model\.(\d+)\.conv_block\.")


def official_layout(state):
    """(kind, width, residual blocks, parameters), read from the state dict's keys and shapes."""
    if "model.1.weight" in state:
        ngf = state["model.1.weight"].shape[0]
        blocks = len({m.group(1) for m in map(BLOCK_KEY.match, state) if m})
        if not blocks:  # --res-blocks 0 means the paper's rule here, not none
            raise pth_reader.CheckpointError("expected a ResnetGenerator with residual blocks, found none")
        layout = ("generator", ngf, blocks, generator_parameters(ngf, blocks))
    elif "model.0.weight" in state:
        ndf = state["model.0.weight"].shape[0]
        layout = ("discriminator", ndf, 0, discriminator_parameters(ndf))
    else:
        raise pth_reader.CheckpointError("expected an official CycleGAN ResnetGenerator or NLayerDiscriminator "
                              f"state dict (model.N.weight entries), found {describe_keys(state)}")
    check_layout(state, layout[0], layout[3])
    return layout


def describe_keys(state):
    keys = sorted(state)
    return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "") if keys else "no tensors"


def check_layout(state, kind, params):
    """One line naming the first entry that differs from the official network's."""
    expected = {}
    for name, shape, transposed in params:
        expected[f"{name}.weight"] = shape
        expected[f"{name}.bias"] = shape[1:2] if transposed else shape[:1]
    what = ("a ResnetGenerator (resnet_Nblocks, instance norm, no dropout)" if kind == "generator"
            else "a 70x70 NLayerDiscriminator (n_layers 3, instance norm)")
    for key in sorted(set(expected) | set(state)):
        if key not in state:
            raise pth_reader.CheckpointError(f"expected {what}: {key} is missing")
        if key not in expected:
            raise pth_reader.CheckpointError(f"expected {what}: unexpected entry {key}")
        if state[key].shape != expected[key]:
            raise pth_reader.CheckpointError(f"expected {what}: {key} has shape {state[key].shape}, "
                                  f"not {expected[key]}")


def convert_state_dict(state, image_size=256):
    """The paper preset's Keras network holding an official state dict's weights.

    PyTorch kernels (out, in, k, k) and transposed kernels (in, out, k, k)
    both become Keras' (k, k, in, out) and (k, k, out, in) by one transpose.
    """
    kind, width, blocks, params = official_layout(state)
    if kind == "generator":
        cfg = make_config("paper", filters=width, res_blocks=blocks)
        model = models.build_generator(cfg, "generator")
    else:
        cfg = make_config("paper", disc_filters=width, image_size=image_size)
        model = models.build_discriminator(cfg, "discriminator")
    layers = [layer for layer in model.layers if layer.weights]
    for layer, (name, _, _) in zip(layers, params, strict=True):
        layer.set_weights([state[f"{name}.weight"].transpose(2, 3, 1, 0), state[f"{name}.bias"]])
    return model


def describe(model):
    """'resnet_9blocks generator, ngf 64' or '70x70 discriminator, ndf 64'."""
    convs = [layer for layer in model.layers if layer.weights]
    if model.name == "discriminator":
        return f"70x70 discriminator, ndf {convs[0].filters}"
    return f"resnet_{(len(convs) - 6) // 2}blocks generator, ngf {convs[0].filters}"


def convert(pth_path, output_path, image_size=256):
    """Convert an official .pth into a Keras .h5 (or .keras); returns the model."""
    output_path = checked_output(output_path, (".h5", ".keras"))
    state = pth_reader.read_pth(pth_path)
    try:
        model = convert_state_dict(state, image_size)
    except pth_reader.CheckpointError as error:
        raise pth_reader.CheckpointError(f"{pth_path}: {error}") from None
    models.save_h5(model, output_path)
    return model


def convert_command(args):
    """`main.py convert`: an official .pth (a file, or a pretrained model by name) into a .h5."""
    if args.pretrained:
        model = convert_pretrained(args.pretrained, args.output)
    else:
        model = convert(args.pth, args.output, from_flags(args, preset="paper").image_size)
    print(f"Converted {args.pth or args.pretrained} ({describe(model)}) into {args.output}")


def pretrained_url(name):
    return download.url_from_template(os.environ.get(URL_VARIABLE) or DEFAULT_URL, name, URL_VARIABLE)


def convert_pretrained(name, output_path):
    """Download the official NAME.pth into a temporary folder and convert it to OUTPUT_PATH."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise UserError(f"--pretrained {name!r} is not a model name; official ones: "
                        + ", ".join(OFFICIAL_NAMES))
    checked_output(output_path, (".h5", ".keras"))
    with tempfile.TemporaryDirectory() as folder:
        pth = download.download([pretrained_url(name)], Path(folder) / f"{name}.pth", MAX_PTH_BYTES)
        return convert(pth, output_path)


def pretrained_generator(name, folder=PRETRAINED_DIR):
    """FOLDER/NAME.h5, converted from the official NAME.pth the first time it is asked for."""
    h5 = Path(folder) / f"{name}.h5"
    if not h5.is_file():
        model = convert_pretrained(name, h5)
        print(f"Converted the official {name} ({describe(model)}) into {h5}")
    return h5
