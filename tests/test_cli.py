"""The command line as a user runs it: real processes, real files."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import one_line_error, page_links, read_tensorboard, run_cli, tiny_data, write_images

import config
import main
import train
from run_folder import RunFolder

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short end-to-end training run on tiny images, shared by the tests below.

    Its trainA holds one unreadable file, which the run must skip with a warning.
    """
    work = tmp_path_factory.mktemp("cli")
    for i, (sub, count) in enumerate((("trainA", 4), ("trainB", 3), ("testA", 2), ("testB", 2))):
        write_images(work / "data" / sub, count, size=48, seed=i)
    (work / "data" / "trainA" / "broken.jpg").write_bytes(b"")
    result = run_cli("--data", "data", "--image-size", 32, "--epochs", 2, "--sample-every", 1,
                     "--save-every", 1, "--name", "tiny", cwd=work)
    return work, result


def test_training_writes_every_output(trained_run):
    work, result = trained_run
    run = work / "results" / "tiny"
    assert (run / "samples" / "epoch_0001.png").is_file()
    assert (run / "samples" / "epoch_0002.png").is_file()
    assert (run / "loss_curves.png").is_file()
    assert sorted(p.name for p in (run / "models").iterdir()) == [
        "discriminatorA.h5", "discriminatorB.h5", "generatorAToB.h5", "generatorBToA.h5"]
    assert "4 A and 3 B images, 4 steps per epoch, 2 epochs" in result.stdout
    precision = json.loads((run / "config.json").read_text())["precision"]  # auto, decided
    assert f"Precision: {precision} (auto: " in result.stdout.splitlines()[0]
    assert not list(run.rglob(".*tmp*"))  # no temporary files left


def test_output_off_a_terminal_is_one_plain_line_per_epoch_with_the_whole_runs_estimate(trained_run):
    _, result = trained_run  # its stdout is a pipe, as under nohup or on a cluster
    assert "\r" not in result.stdout and "\x1b" not in result.stdout and "\b" not in result.stdout
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Run: "))
    assert lines[start].startswith("Run: 8 steps in all (2 epochs of 4)")
    epochs = [line for line in lines[start:] if line.startswith("Epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["Epoch 1/2", "Epoch 2/2"]
    assert "the run has 4 steps left, about" in epochs[0] and "D_A " in epochs[0]
    assert "the run is complete" in epochs[1]


def test_one_training_is_one_tensorboard_run_with_grouped_tags_and_graphs(trained_run):
    work, _ = trained_run
    events = read_tensorboard(work / "logs" / "tiny")
    tags = set(events.Tags()["tensors"])
    losses = {"D_A", "D_B", "adv_A", "adv_B", "cycle_A", "cycle_B", "identity_A", "identity_B",
              "G_total"}
    assert {f"loss/{name}" for name in losses} | {"train/learning_rate", "samples"} <= tags
    assert {tag.split("/")[0] for tag in tags} == {"loss", "train", "metrics", "samples"}
    assert [e.step for e in events.Tensors("loss/D_A")] == list(range(1, 9))
    assert events.Graph().node  # the graphs are in the run itself
    assert [p for p in (work / "logs" / "tiny").iterdir() if p.is_dir()] == []  # one run


def test_training_logs_metrics_and_builds_a_page_whose_links_resolve(trained_run):
    work, _ = trained_run
    events = read_tensorboard(work / "logs" / "tiny")
    for name in ("cycle_L1_A", "cycle_PSNR_B", "identity_L1_A", "identity_L1_B"):
        assert [e.step for e in events.Tensors(f"metrics/{name}")] == [4, 8]
    assert "metrics/FID_B" not in events.Tags()["tensors"]  # too slow for every sample epoch
    run = work / "results" / "tiny"
    assert json.loads((run / "metrics.json").read_text())["source"] == "epoch 2, 2 A and 2 B images"
    links = page_links(run / "index.html")
    assert {"loss_curves.png", "samples/epoch_0002.png", "samples/epoch_0001.png"} <= set(links)
    assert links.index("samples/epoch_0002.png") < links.index("samples/epoch_0001.png")


def test_evaluate_offline_skips_fid_kid_in_one_line_and_scores_the_rest(trained_run, monkeypatch,
                                                                       capsys):
    import download

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(download, "fetch", offline)
    work, _ = trained_run
    monkeypatch.chdir(work)
    assert main.main(["evaluate", "--name", "tiny"]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "FID" in line]
    assert line.startswith("FID/KID skipped: no InceptionV3 weights (") and line.endswith(
        ": no network); pass --inception-weights PATH to use a local file"), line
    assert "cycle A->B->A, PSNR dB" in out and "identity, B through G_AB, L1" in out
    saved = json.loads((work / "results/tiny/metrics.json").read_text())
    assert saved["source"].startswith("evaluate: 2 A and 2 B test images")
    assert set(saved["metrics"]) == {"cycle_L1_A", "cycle_PSNR_A", "cycle_L1_B", "cycle_PSNR_B",
                                     "identity_L1_A", "identity_L1_B"}
    assert "evaluate: 2 A and 2 B" in (work / "results/tiny/index.html").read_text()
    page_links(work / "results/tiny/index.html")


def test_evaluate_saved_generators_on_a_dataset(trained_run):
    work, _ = trained_run
    models_dir = work / "results/tiny/models"
    result = run_cli("evaluate", "--generators", models_dir / "generatorAToB.h5",
                     models_dir / "generatorBToA.h5", "--data", "data", "--image-size", 32,
                     "--no-fid", cwd=work)
    assert "FID/KID skipped: --no-fid given" in result.stdout
    saved = json.loads((work / "results/data-eval/metrics.json").read_text())
    assert 0 < saved["metrics"]["cycle_L1_A"] < 1


def test_translate_any_size_keeps_names(trained_run, tmp_path):
    work, _ = trained_run
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(pixels).save(tmp_path / "in" / "photo.png")
    Image.fromarray(pixels[:37, :51]).save(tmp_path / "in" / "odd.jpg")
    result = run_cli("translate", "--generator", work / "results/tiny/models/generatorAToB.h5",
                     "--input", tmp_path / "in", "--output", tmp_path / "out", cwd=tmp_path)
    assert "Translated 2 image(s)" in result.stdout
    # Redirected, its progress is plain lines: no carriage return, no escape code.
    assert "2/2 images" in result.stdout
    assert not any(c in result.stdout + result.stderr for c in "\r\x1b\b")
    assert Image.open(tmp_path / "out" / "photo.png").size == (300, 200)
    assert Image.open(tmp_path / "out" / "odd.jpg").size == (51, 37)


def test_rerun_of_an_existing_name_refuses_without_overwrite(trained_run, monkeypatch, capsys):
    work, _ = trained_run
    monkeypatch.chdir(work)
    err = one_line_error(["--data", "data", "--image-size", 32, "--epochs", 1, "--name", "tiny"],
                         capsys)
    assert "--overwrite" in err
    assert (work / "results/tiny/models/generatorAToB.h5").is_file()


def test_summary_prints_book_sizes(capsys):
    assert main.main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "generator_AtoB params=1971747" in out
    assert "discriminator_B params=2766529" in out
    assert "discriminator output=7x7x1" in out
    assert "adversarial output cycle_A: loss=mae weight=10" in out


@pytest.mark.parametrize("args, words", [
    (["--image-size", "30"], "--image-size must be from 32 to 1024"),
    (["--image-size", "34"], "--image-size must be a multiple of 4 for this generator"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "-3"], "--epochs must be at least 0"),
    (["--data", "no/such/folder"], "neither a folder"),
    (["--preset", "nope"], "unknown preset"),
    (["--norm", "nope"], "invalid choice"),
    (["translate", "--generator", "missing.h5", "--input", ".", "--output", "o"], "not an existing"),
    (["evaluate"], "evaluate needs --name"),
    (["evaluate", "--name", "nothing"], "no run 'nothing'"),
    (["evaluate", "--generators", "a.h5", "b.h5"], "--generators needs --data"),
    (["evaluate", "--generators", "a.h5", "b.h5", "--data", ".", "--image-size", "30"], "from 32 to"),
    (["--lr", "nan"], "--lr must be a number above 0"),
    (["--lr", "inf"], "--lr must be a number above 0"),
    (["--beta1", "5"], "--beta1 must be a number from 0"),
    (["--lambda-cycle", "-10"], "--lambda-cycle must be a number from 0"),
    (["--lambda-identity", "nan"], "--lambda-identity must be a number from 0"),
    (["--image-size", "1000000"], "from 32 to 1024"),
    (["--name", "../elsewhere"], "--name must be a plain folder name"),
    (["--name", ".."], "--name must be a plain folder name"),
    (["--name", ""], "--name must be a plain folder name"),
    (["evaluate", "--name", "../x"], "--name must be a plain folder name"),
    (["evaluate", "--generators", "a.h5", "b.h5", "--data", ".", "--name", "a/b"], "plain folder"),
    (["--name", "x" * 300], "--name may be at most 250 bytes long (a file name holds 255)"),
    (["--name", "x" * 300, "--resume"], "--name may be at most 250 bytes"),
    (["evaluate", "--name", "x" * 300], "--name may be at most 250 bytes"),
    (["evaluate", "--generators", "a.h5", "b.h5", "--data", "x" * 251], "--name may be at most"),
    (["evaluate", "--generators", "a.h5", "b.h5", "--data", "."], "--generators a.h5 is not an"),
])
def test_bad_input_is_a_one_line_error(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    assert words in one_line_error(args, capsys)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--image-size", "30"], ["--data", "no/such/folder"]])
def test_a_real_process_prints_only_the_error_line(tmp_path, args):
    """No TensorFlow start-up notes or traceback around it: those go to fd 2 directly."""
    result = run_cli(*args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, \
        result.stderr


@pytest.mark.parametrize("damage, words", [
    (lambda root: __import__("shutil").rmtree(root / "trainB"), "missing folder"),
    (lambda root: [p.unlink() for p in (root / "trainA").iterdir()], "no usable images"),
])
def test_broken_dataset_folders_are_one_line_errors(tmp_path, monkeypatch, capsys, damage, words):
    tiny_data(tmp_path / "data")
    damage(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert words in one_line_error(["--data", "data", "--image-size", 32], capsys)
    assert not (tmp_path / "results").exists()


def test_unreadable_files_are_named_in_one_warning_line_and_training_goes_on(trained_run):
    work, result = trained_run
    lines = [l for l in result.stderr.splitlines() if "SkippedImagesWarning" in l]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "broken.jpg" in lines[0]
    assert "4 A and 3 B images" in result.stdout  # the broken file is not counted
    assert (work / "results/tiny/models/generatorAToB.h5").is_file()


def test_translate_with_a_missing_input_is_a_one_line_error(trained_run, tmp_path, capsys):
    work, _ = trained_run
    err = one_line_error(["translate", "--generator", work / "results/tiny/models/generatorAToB.h5",
                          "--input", tmp_path / "nowhere", "--output", tmp_path / "out"], capsys)
    assert "missing folder" in err


def test_translate_rejects_a_file_that_is_not_a_model(tmp_path):
    (tmp_path / "fake.h5").write_text("not hdf5")
    write_images(tmp_path / "in", 1)
    result = run_cli("translate", "--generator", tmp_path / "fake.h5", "--input", tmp_path / "in",
                     "--output", tmp_path / "out", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "not a loadable Keras model" in result.stderr


def test_no_data_flag_means_the_demo_with_demo_defaults():
    cfg = train.config_from_args(main.parse_args([]))
    assert cfg.data == "demo" and cfg.name == "demo"
    assert cfg.image_size == 32 and cfg.preset == "book"
    cfg = train.config_from_args(main.parse_args(["--data", "monet2photo"]))
    assert (cfg.image_size, cfg.batch_size, cfg.epochs, cfg.name) == (128, 1, 200, "monet2photo")


def test_resume_with_other_architecture_is_refused(trained_run, monkeypatch, capsys):
    work, _ = trained_run
    monkeypatch.chdir(work)
    err = one_line_error(["--data", "data", "--name", "tiny", "--resume", "--filters", 64], capsys)
    assert "trained with --filters 32, not 64" in err
    err = one_line_error(["--data", "data", "--name", "tiny", "--resume", "--precision", "float16"], capsys)
    assert "--precision" in err and "not float16" in err
    assert "no run 'nothing'" in one_line_error(["--name", "nothing", "--resume"], capsys)


def test_a_path_like_dataset_names_the_run_after_the_folder_and_overwrite_stays_inside(
        tmp_path, monkeypatch):
    work = tmp_path / "project"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    assert train.config_from_args(main.parse_args(["--data", ".."])).name == "project"
    assert train.config_from_args(main.parse_args(["--data", "photos/"])).name == "photos"
    # A results/NAME that is a link elsewhere is never emptied by --overwrite.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("mine")
    (work / "sub" / "results").mkdir()
    (work / "sub" / "results" / "run").symlink_to(tmp_path / "precious")
    cfg = train.config_from_args(main.parse_args(["--name", "run"]))
    with pytest.raises(config.UserError, match="is a link"):
        RunFolder.of(cfg).open([work / "data"], overwrite=True)
    assert (tmp_path / "precious" / "keep.txt").read_text() == "mine"


def test_out_of_memory_is_one_line_suggesting_smaller_settings(tmp_path, monkeypatch, capsys):
    import tensorflow as tf
    import cyclegan

    def exhausted(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    tiny_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cyclegan.CycleGAN, "train_step", exhausted)
    err = one_line_error(["--data", "data", "--image-size", 32, "--epochs", 1], capsys)
    assert "out of memory" in err and "smaller --image-size or --batch-size" in err


def test_a_refused_resume_leaves_the_run_as_it_was(trained_run, monkeypatch, capsys):
    work, _ = trained_run
    monkeypatch.chdir(work)
    saved = (work / "results/tiny/config.json").read_bytes()
    trained = json.loads(saved)["precision"]  # auto's choice on this machine
    other = "float16" if trained != "float16" else "float32"
    err = one_line_error(["--data", "data", "--name", "tiny", "--resume", "--precision", other],
                         capsys)
    assert f"trained with --precision {trained}, not {other}" in err
    assert (work / "results/tiny/config.json").read_bytes() == saved


def test_a_resume_whose_checkpoints_are_all_damaged_keeps_the_config(trained_run, tmp_path,
                                                                     monkeypatch, capsys):
    import shutil
    work, _ = trained_run
    shutil.copytree(work / "data", tmp_path / "data")
    shutil.copytree(work / "results/tiny", tmp_path / "results/copy")
    saved = (tmp_path / "results/copy/config.json").read_text().replace('"tiny"', '"copy"')
    (tmp_path / "results/copy/config.json").write_text(saved)
    for path in (tmp_path / "results/copy/checkpoints").glob("*.data-*"):
        path.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(Warning, match="damaged checkpoint"):
        err = one_line_error(["--name", "copy", "--resume", "--epochs", 3], capsys)
    assert "no checkpoint" in err
    assert (tmp_path / "results/copy/config.json").read_text() == saved


def translate_args(work, source, output, *more):
    return ["translate", "--generator", work / "results/tiny/models/generatorAToB.h5",
            "--input", source, "--output", output, *more]


@pytest.mark.slow
def test_translate_never_overwrites_originals_or_earlier_outputs(trained_run, tmp_path, capsys):
    work, _ = trained_run
    originals = write_images(tmp_path / "in", 2)
    before = {p: p.read_bytes() for p in originals}
    assert "holds the input images" in one_line_error(
        translate_args(work, tmp_path / "in", tmp_path / "in"), capsys)
    assert "holds the input images" in one_line_error(
        translate_args(work, originals[0], tmp_path / "in"), capsys)
    (tmp_path / "afile").write_text("x")
    assert "is a file" in one_line_error(translate_args(work, tmp_path / "in", tmp_path / "afile"),
                                         capsys)
    assert {p: p.read_bytes() for p in originals} == before

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / originals[1].name).write_text("earlier output")
    err = one_line_error(translate_args(work, tmp_path / "in", tmp_path / "out"), capsys)
    assert "1 output file(s) already exist" in err and "--overwrite" in err
    assert (tmp_path / "out" / originals[1].name).read_text() == "earlier output"
    assert main.main([str(a) for a in translate_args(work, tmp_path / "in", tmp_path / "out",
                                                     "--overwrite")]) == 0
    Image.open(tmp_path / "out" / originals[1].name).verify()
    # An output name that is a folder, or a link, is never written into or through.
    (tmp_path / "out" / originals[1].name).unlink()
    (tmp_path / "out" / originals[1].name).mkdir()
    (tmp_path / "victim.png").write_text("precious")
    (tmp_path / "out" / originals[0].name).unlink()
    (tmp_path / "out" / originals[0].name).symlink_to(tmp_path / "victim.png")
    err = one_line_error(translate_args(work, tmp_path / "in", tmp_path / "out", "--overwrite"), capsys)
    assert "is a link" in err or "is a folder" in err
    assert (tmp_path / "victim.png").read_text() == "precious"
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_translate_skips_unreadable_images_by_name_and_keeps_exif_orientation(trained_run, tmp_path,
                                                                              capsys):
    work, _ = trained_run
    write_images(tmp_path / "in", 1)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone held upright, stored sideways
    Image.new("RGB", (48, 32)).save(tmp_path / "in" / "portrait.jpg", exif=exif.tobytes())
    with pytest.warns(Warning, match=r"skipped 1 image\(s\) .*broken.jpg \(unreadable\)"):
        assert main.main([str(a) for a in translate_args(work, tmp_path / "in",
                                                         tmp_path / "out")]) == 0
    assert "Translated 2 image(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img_000.png", "portrait.jpg"]
    assert Image.open(tmp_path / "out" / "portrait.jpg").size == (32, 48)


def test_resume_accepts_the_runs_own_preset_and_refuses_another(trained_run, monkeypatch, capsys):
    work, _ = trained_run
    monkeypatch.chdir(work)
    args = ["--data", "data", "--name", "tiny", "--resume", "--preset"]
    assert train.config_from_args(main.parse_args(args + ["book"])).preset == "book"
    assert "trained with --preset book, not paper" in one_line_error(args + ["paper", "--epochs", 1],
                                                                   capsys)


@pytest.mark.slow
def test_every_check_comes_before_the_run_folder_so_the_corrected_command_just_runs(
        tmp_path, monkeypatch, capsys):
    tiny_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    args = ["--data", "data", "--image-size", 32, "--filters", 4, "--disc-filters", 4,
            "--res-blocks", 1, "--epochs", 1, "--steps-per-epoch", 1]
    monkeypatch.setenv("CYCLEGAN_TIMEOUT", "abc")
    assert "CYCLEGAN_TIMEOUT must be a number" in one_line_error(args, capsys)
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    monkeypatch.delenv("CYCLEGAN_TIMEOUT")
    write_images(tmp_path / "data" / "testA_truth", 0)  # a truth folder lacking testA's image
    assert "testA_truth lacks 1 of the images" in one_line_error(args, capsys)
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    (tmp_path / "data" / "testA_truth").rmdir()
    assert main.main([str(a) for a in args]) == 0  # no --overwrite needed
    assert (tmp_path / "results" / "data" / "models" / "generatorAToB.h5").is_file()
