"""The paper preset end to end: sizes, a short run, reloading its generator."""
import json
import subprocess
import sys

import keras
import pytest

from conftest import ROOT, run_cli, tiny_data

import config
import cyclegan_layers
import main
import models


def test_summary_of_the_paper_preset_matches_the_official_implementation(capsys):
    assert main.main(["summary", "--preset", "paper", "--image-size", "256"]) == 0
    out = capsys.readouterr().out
    for model in ("generator_AtoB", "generator_BtoA"):
        assert f"{model} params=11378179" in out
    for model in ("discriminator_A", "discriminator_B"):
        assert f"{model} params=2764737" in out
    assert "discriminator output=30x30x1 receptive_field=70px" in out
    assert "adversarial output identity_B: loss=mae weight=5" in out


@pytest.mark.slow
def test_paper_preset_trains_saves_and_reloads_with_one_import(tmp_path):
    tiny_data(tmp_path / "data")
    run_cli("--data", "data", "--preset", "paper", "--image-size", 32, "--epochs", 1,
            "--decay-epochs", 1, "--filters", 8, "--name", "p", cwd=tmp_path)
    saved = json.loads((tmp_path / "results/p/config.json").read_text())
    assert (saved["load_size"], saved["pool_size"], saved["padding"]) == (36, 50, "reflect")
    generator = tmp_path / "results/p/models/generatorAToB.h5"
    plain, with_import = load_with_and_without_import(
        tmp_path, f"m = keras.models.load_model(r'{generator}'); "
                  "print(m(keras.ops.zeros((1, 200, 300, 3))).shape)")
    assert plain.returncode != 0 and "ReflectionPadding2D" in plain.stderr
    assert with_import.returncode == 0, with_import.stderr
    assert "(1, 200, 300, 3)" in with_import.stdout
    # A discriminator is saved compiled, with PyTorch's Adam: the same one import.
    disc = tmp_path / "results/p/models/discriminatorA.h5"
    plain, with_import = load_with_and_without_import(
        tmp_path, f"d = keras.models.load_model(r'{disc}'); print(type(d.optimizer).__name__)")
    assert plain.returncode != 0 and "torch_adam" in plain.stderr
    assert with_import.returncode == 0 and "TorchAdam" in with_import.stdout, with_import.stderr


def load_with_and_without_import(cwd, code):
    """`code` run after `import keras` in a fresh Python, without and with `import cyclegan_layers`."""
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return [subprocess.run([sys.executable, "-c", f"{prefix}import keras; {code}"], cwd=cwd,
                           env=env if not prefix else {**env, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True)
            for prefix in ("", "import cyclegan_layers; ")]


def test_paper_preset_steps_with_pytorchs_adam_and_its_epsilon():
    # PyTorch's Adam adds 1e-8 to the root of the bias-corrected second moment, Keras's 1e-7
    # to the root of the raw one (tests/test_models.py checks the steps themselves).
    paper = models.make_optimizer(config.make_config("paper"))
    assert isinstance(paper, cyclegan_layers.TorchAdam) and paper.epsilon == pytest.approx(1e-8)
    book = models.make_optimizer(config.make_config("book"))
    assert type(book) is keras.optimizers.Adam and book.epsilon == pytest.approx(1e-7)
