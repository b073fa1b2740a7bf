"""CUT and FastCUT: PatchNCE and the patch head against the official code's values, and
`python main.py --model cut|fastcut` trained, resumed, evaluated, translated and exported."""
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import one_line_error, page_links, read_tensorboard, run_cli

import config
import cut
import main

FIXTURE = Path(__file__).parent / "fixtures" / "patchnce.npz"  # make_patchnce_fixture.py
TINY = ["--image-size", 32, "--filters", 4, "--disc-filters", 4, "--res-blocks", 5,
        "--num-patches", 16, "--nce-head", 16, "--steps-per-epoch", 2, "--sample-every", 1,
        "--save-every", 1, "--precision", "float32"]


@pytest.fixture(scope="module")
def official():
    return dict(np.load(FIXTURE))


def test_patchnce_gives_the_official_patchnce_loss(official):
    for key, everything in (("nce_loss", False), ("nce_loss_all_negatives", True)):
        ours = cut.patch_nce(official["nce_q"], official["nce_k"], int(official["batch"]),
                             float(official["temperature"]), all_negatives=everything)
        np.testing.assert_allclose(ours, official[key], rtol=1e-5, atol=1e-5)


def test_patch_head_gives_the_official_patch_sample_f_rows(official):
    layers = sorted(int(k.rsplit("_", 1)[1]) for k in official if k.startswith("head_ids_"))
    channels = [official[f"head_features_{n}"].shape[-1] for n in layers]
    head = cut.build_head(channels, int(official["head_width"]))
    for n in layers:
        for m in (0, 1):
            head.get_layer(f"mlp_{n}_{m}").set_weights([official[f"head_kernel_{n}_{m}"],
                                                        official[f"head_bias_{n}_{m}"]])
    rows = head([cut.sample_patches(official[f"head_features_{n}"], official[f"head_ids_{n}"])
                 for n in layers])
    for n in layers:
        np.testing.assert_allclose(cut.l2_normalize(rows[n]), official[f"head_rows_{n}"],
                                   rtol=1e-5, atol=1e-6)


def test_the_models_defaults_are_the_official_ones_and_flags_override_them():
    cut_cfg, fast = (config.make_config(model=m) for m in ("cut", "fastcut"))
    assert (cut_cfg.epochs, cut_cfg.decay_epochs, cut_cfg.lambda_nce, cut_cfg.nce_idt,
            cut_cfg.flip_equivariance, cut_cfg.pool_size) == (200, 200, 1.0, True, False, 0)
    assert (fast.epochs, fast.decay_epochs, fast.lambda_nce, fast.nce_idt,
            fast.flip_equivariance) == (150, 50, 10.0, False, True)
    assert config.make_config(model="fastcut", lambda_nce=3.0).lambda_nce == 3.0
    assert config.make_config(preset="paper").model == "cyclegan"  # every preset: a CycleGAN


@pytest.mark.parametrize("flags, words", [
    (["--nce-layers", "0,4,x"], "--nce-layers must be numbers"),
    (["--nce-layers", "0,40"], "--nce-layers must be distinct numbers from 0 to 17"),
    (["--strategy", "mirrored"], "--model cut trains on one device"),
])
def test_bad_cut_settings_are_one_line_errors(flags, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert words in one_line_error(["--model", "cut", *flags], capsys)
    assert not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """A CUT run on the demo data: 1 epoch, then resumed to 2."""
    work = tmp_path_factory.mktemp("cut")
    first = run_cli("--model", "cut", "--name", "c", "--epochs", 1, *TINY, cwd=work)
    resumed = run_cli("--name", "c", "--resume", "--epochs", 2, cwd=work)
    return work, first, resumed


def test_a_cut_run_writes_its_outputs_and_resumes(cut_run):
    work, first, resumed = cut_run
    run = work / "results" / "c"
    assert "D " in first.stdout and "G_total " in first.stdout
    assert "Resuming run c at step 2." in resumed.stdout
    assert sorted(p.name for p in (run / "models").iterdir()) == [
        "discriminatorB.h5", "generatorAToB.h5", "patchHeadF.h5"]
    assert [p.name for p in sorted((run / "samples").iterdir())] == ["epoch_0001.png",
                                                                    "epoch_0002.png"]
    assert (run / "losses.csv").read_text().splitlines()[0] == "epoch,D,G_GAN,NCE,NCE_Y,G_total"
    assert len((run / "losses.csv").read_text().splitlines()) == 3
    tags = set(read_tensorboard(work / "logs" / "c").Tags()["tensors"])
    assert {"loss/D", "loss/G_GAN", "loss/NCE", "loss/NCE_Y", "loss/G_total"} <= tags
    assert {"metrics/truth_PSNR", "metrics/baseline_PSNR"} <= tags
    assert not any("cycle" in tag for tag in tags)
    page_links(run / "index.html")
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"] == "cut" and saved["epochs"] == 2


def test_a_cut_generator_loads_in_plain_keras_translates_evaluates_and_exports(
        cut_run, tmp_path, capsys, monkeypatch):
    work, _, _ = cut_run
    g = work / "results" / "c" / "models" / "generatorAToB.h5"
    x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    assert keras.models.load_model(g, compile=False)(x).shape == (1, 32, 32, 3)
    monkeypatch.chdir(work)
    assert main.main(["evaluate", "--name", "c", "--no-fid"]) == 0
    out = capsys.readouterr().out
    assert "no B -> A generator" in out
    scores = json.loads((work / "results" / "c" / "metrics.json").read_text())["metrics"]
    assert {"truth_PSNR", "baseline_PSNR", "truth_SSIM"} <= set(scores)
    assert not any(name.endswith("_A") or "cycle" in name for name in scores)
    Image.fromarray(np.zeros((37, 51, 3), np.uint8)).save(tmp_path / "odd.png")
    assert main.main(["translate", "--generator", str(g), "--input", str(tmp_path / "odd.png"),
                      "--output", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "odd.png").size == (51, 37)
    assert main.main(["export", "--generator", str(g), "--format", "keras",
                      "--output", str(tmp_path / "g.keras")]) == 0
    assert (tmp_path / "g.keras").is_file()


@pytest.mark.slow
def test_a_fastcut_run_trains_without_the_identity_term(tmp_path):
    run_cli("--model", "fastcut", "--name", "f", "--epochs", 1, *TINY, cwd=tmp_path)
    header = (tmp_path / "results" / "f" / "losses.csv").read_text().splitlines()[0]
    assert header == "epoch,D,G_GAN,NCE,G_total"
    saved = json.loads((tmp_path / "results" / "f" / "config.json").read_text())
    assert (saved["lambda_nce"], saved["flip_equivariance"], saved["nce_idt"]) == (10.0, True, False)
    assert (tmp_path / "results" / "f" / "models" / "generatorAToB.h5").is_file()


def test_summary_of_cut_names_its_networks_and_patchnce(capsys):
    assert main.main(["summary", "--model", "fastcut", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "generator_AtoB params=" in out and "patch_head params=" in out
    assert "fastcut: PatchNCE on layers 0 (3 channels), 4 " in out and "flip equivariance on" in out


@pytest.mark.slow
def test_a_cut_starting_point_restores_its_weights_and_the_benchmark_counts_its_passes():
    import benchmark
    import study
    cfg = config.make_config(model="cut", image_size=32, filters=4, disc_filters=4, res_blocks=5,
                             num_patches=16, nce_head=16, precision="float32")
    gan = cut.CUT.fresh(cfg)
    start = study.StartingPoint(gan)
    before = [w.numpy() for w in gan.g_ab.weights + gan.f.weights]
    images = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    losses = gan.train_step(images, images)
    assert set(losses) == set(gan.LOSS_NAMES) and all(np.isfinite(list(losses.values())))
    assert not np.allclose(before[0], gan.g_ab.weights[0].numpy())
    start.restore()
    for value, weight in zip(before, gan.g_ab.weights + gan.f.weights):
        np.testing.assert_array_equal(value, weight.numpy())
    assert benchmark.iteration_gflop(gan, cfg) > 0
