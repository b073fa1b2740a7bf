"""The run folder: its files, the rules of opening it, models, checkpoints, config.json, losses.csv."""
import hashlib
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import config
import cyclegan
from config import UserError, make_config
from conftest import ROOT, one_line_error, tiny_data
from fileio import remove
from run_folder import MODEL_FILES, RUN_MARK, DamagedCheckpointWarning, RunCheckpoint, RunFolder


@pytest.fixture(scope="module")
def small_gan():
    keras.utils.set_random_seed(0)
    return cyclegan.CycleGAN(make_config(image_size=32, precision="float32"))


def test_saved_generator_loads_in_plain_keras_with_identical_output(small_gan, tmp_path):
    folder = RunFolder(tmp_path, tmp_path / "logs", "run")
    folder.save_models(small_gan)
    assert sorted(p.name for p in folder.models.iterdir()) == sorted(MODEL_FILES[n] for n in small_gan.NETWORKS)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 200, 300, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = np.asarray(small_gan.g_ab(x, training=False))
    code = ("import numpy as np, keras;"
            f"m = keras.models.load_model(r'{folder.model('g_ab')}');"
            f"np.save(r'{tmp_path / 'y.npy'}', np.asarray(m(np.load(r'{tmp_path / 'x.npy'}'))))")
    # A bare interpreter in another folder: nothing of this project is importable.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)


def test_saved_discriminator_reloads_trainable(small_gan, tmp_path):
    small_gan.set_discriminators_trainable(False)
    folder = RunFolder(tmp_path, tmp_path / "logs", "run")
    folder.save_models(small_gan)
    assert keras.models.load_model(folder.model("d_a"), compile=False).trainable


@pytest.mark.slow
def test_checkpoint_restores_weights_optimizer_moments_step_pools_and_data_position(tmp_path):
    import data
    from conftest import write_images
    cfg = make_config(image_size=32, pool_size=4)
    files_a = [str(p) for p in write_images(tmp_path / "A", 5, seed=1)]
    files_b = [str(p) for p in write_images(tmp_path / "B", 3, seed=2)]

    def fresh(seed):
        keras.utils.set_random_seed(seed)
        gan = cyclegan.CycleGAN(cfg)
        batches = iter(data.train_dataset(files_a, files_b, cfg))
        return gan, gan.pools, batches, RunCheckpoint(gan, batches, tmp_path / "ckpt")

    gan, pools, batches, checkpoint = fresh(0)
    for _ in range(3):
        gan.train_step(*next(batches))
    checkpoint.save(3)
    expected_next = [b.numpy() for b in next(batches)]

    gan2, pools2, batches2, checkpoint2 = fresh(1)
    assert checkpoint2.restore() == 3
    for a, b in ((gan.g_ab, gan2.g_ab), (gan.d_b, gan2.d_b)):
        for x, y in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_array_equal(x, y)
    for model, model2 in ((gan.adversarial, gan2.adversarial), (gan.d_a, gan2.d_a)):
        assert len(model.optimizer.variables) == len(model2.optimizer.variables) > 2
        for x, y in zip(model.optimizer.variables, model2.optimizer.variables):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for pool, pool2 in zip(pools, pools2):
        assert len(pool2.images) == len(pool.images) == 3
        np.testing.assert_array_equal(np.stack(pool.images), np.stack(pool2.images))
    for x, y in zip(expected_next, next(batches2)):
        np.testing.assert_array_equal(x, y.numpy())


def small_gan_and_checkpoint(tmp_path):
    import data
    from conftest import write_images
    cfg = make_config(image_size=32)
    files = [str(p) for p in write_images(tmp_path / "A", 2)]
    keras.utils.set_random_seed(0)
    gan = cyclegan.CycleGAN(cfg)
    batches = iter(data.train_dataset(files, files, cfg))
    return gan, RunCheckpoint(gan, batches, tmp_path / "ckpt")


def test_a_failed_checkpoint_write_cleans_up_and_a_damaged_one_falls_back(tmp_path):
    import resource
    gan, checkpoint = small_gan_and_checkpoint(tmp_path)
    checkpoint.save(1)
    checkpoint.save(2)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))  # writes fail: "File too large"
    try:
        with pytest.raises(UserError) as error:
            checkpoint.save(3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(error.value)
    assert "\n" not in message and "step 3" in message and "file is too large" in message
    assert "ckpt-2 is kept" in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if "ckpt-3" in p.name) == []
    assert checkpoint.manager.latest_checkpoint.endswith("ckpt-2")

    checkpoint.save(3)
    damaged = next((tmp_path / "ckpt").glob("ckpt-3.data-*"))
    damaged.write_bytes(damaged.read_bytes()[:1000])  # truncated, as by a crash mid-copy
    with pytest.warns(DamagedCheckpointWarning, match="ckpt-3"):
        assert checkpoint.restore() == 2
    for path in (tmp_path / "ckpt").glob("ckpt-[12].data-*"):
        path.write_bytes(b"")
    with pytest.warns(DamagedCheckpointWarning), pytest.raises(UserError, match="no checkpoint"):
        checkpoint.restore()


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_saved_discriminators_reload_compiled_in_float32_and_train(tmp_path, precision):
    """Whatever the run's precision, a saved .h5 is float32 and a discriminator reloads compiled."""
    gan = cyclegan.CycleGAN(make_config(image_size=32, filters=8, precision=precision))
    folder = RunFolder(tmp_path, tmp_path / "logs", "run")
    folder.save_models(gan)
    d = keras.models.load_model(folder.model("d_a"))
    assert d.compiled and d.compute_dtype == "float32"
    assert isinstance(d.loss, keras.losses.MeanSquaredError)


# --- Opening a run: nothing outside results/NAME and logs/NAME, whatever the flags ---------

def hashes(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["dataset", "parent", "inside"])
@pytest.mark.parametrize("which", ["--results-dir", "--log-dir"])
def test_run_folders_that_are_hold_or_lie_in_the_dataset_are_refused_and_it_stays_whole(
        tmp_path, monkeypatch, capsys, where, which):
    ds = tmp_path / "ds" / "mine"
    tiny_data(ds)
    (ds / "notes.txt").write_text("my notes")
    before = hashes(tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    # The run is named after the dataset folder: parent/NAME is the dataset itself.
    place = {"dataset": "ds/mine", "parent": "ds", "inside": "ds/mine/trainA"}[where]
    for extra in ([], ["--overwrite"], ["--resume"]):
        err = one_line_error(["--data", "ds/mine", "--image-size", 32, "--epochs", 1, which, place]
                             + extra, capsys)
        assert "which this run reads" in err or extra == ["--resume"]
    assert hashes(tmp_path / "ds") == before
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["mine"]


def fake_run(tmp_path, name="run", **settings):
    """results/NAME with a config.json, as a run that has not trained yet leaves it."""
    tiny_data(tmp_path / "data")
    cfg = make_config(name=name, data="data", image_size=32, epochs=1, **settings)
    folder = RunFolder(tmp_path / "results", tmp_path / "logs", name)
    folder.root.mkdir(parents=True)
    folder.write_config(cfg)
    return folder


@pytest.mark.parametrize("planted", [".lock", ".config.tmp.json", "models", "losses.csv"])
def test_a_link_planted_in_a_run_folder_never_redirects_a_write(tmp_path, monkeypatch, capsys,
                                                               planted):
    folder = fake_run(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    target = victim if planted == "models" else victim / "precious.txt"
    (folder.root / planted).symlink_to(target)
    monkeypatch.chdir(tmp_path)
    err = one_line_error(["--name", "run", "--resume"], capsys)
    assert "link" in err
    assert (victim / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


def test_overwrite_removes_links_inside_the_run_never_what_they_point_to(tmp_path):
    folder = RunFolder(tmp_path / "results", tmp_path / "logs", "run")
    folder.root.mkdir(parents=True)
    (folder.root / RUN_MARK).write_text("")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "keep.txt").write_text("mine")
    (folder.root / "models").symlink_to(tmp_path / "precious")
    (folder.root / "config.json").symlink_to(tmp_path / "precious" / "keep.txt")
    folder.open([tmp_path / "data"], overwrite=True).close()
    assert (tmp_path / "precious" / "keep.txt").read_text() == "mine"
    assert not folder.config.exists() and folder.models.is_dir() and not folder.models.is_symlink()


def test_a_run_folder_or_log_folder_that_is_a_link_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="is a link"):
        RunFolder(tmp_path / "results", tmp_path / "logs", "run").open([tmp_path / "data"],
                                                                       overwrite=True)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_parents_named_by_the_user_may_be_links(tmp_path):
    (tmp_path / "big_disk").mkdir()
    (tmp_path / "results").symlink_to(tmp_path / "big_disk")
    folder = RunFolder(tmp_path / "results", tmp_path / "logs", "run")
    folder.open([tmp_path / "data"]).close()
    assert (tmp_path / "big_disk" / "run" / "samples").is_dir()


def test_resume_takes_where_the_run_is_from_the_flags_never_from_config_json(tmp_path, monkeypatch):
    import train
    folder = fake_run(tmp_path)
    saved = json.loads(folder.config.read_text())
    saved.update(results_dir=str(tmp_path / "anywhere"), log_dir="/tmp/elsewhere", name="other")
    folder.config.write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    cfg = train.resumed_config({"name": "run"})
    assert (cfg.results_dir, cfg.log_dir, cfg.name) == ("results", "logs", "run")


@pytest.mark.parametrize("content", ["", "not json", "[]", "{}", "null",
                                     "SETTINGS_WITH_A_STRING_NUMBER", "SETTINGS_WITH_BAD_VALUE"])
def test_a_damaged_config_json_is_one_line_on_resume_and_evaluate(tmp_path, monkeypatch, capsys,
                                                                  content):
    folder = fake_run(tmp_path)
    settings = json.loads(folder.config.read_text())
    if content == "SETTINGS_WITH_A_STRING_NUMBER":
        content = json.dumps({**settings, "image_size": "32"})
    elif content == "SETTINGS_WITH_BAD_VALUE":
        content = json.dumps({**settings, "disc": "huge"})
    folder.config.write_text(content)
    monkeypatch.chdir(tmp_path)
    for args in (["--name", "run", "--resume"], ["evaluate", "--name", "run", "--no-fid"]):
        err = one_line_error(args, capsys)
        assert "config.json is damaged" in err and "--overwrite" in err
    assert folder.config.read_text() == content


def test_losses_csv_resaved_by_a_spreadsheet_is_read_and_extended(tmp_path):
    history = RunFolder(tmp_path, tmp_path, "run").losses_history(cyclegan.LOSS_NAMES)
    history.path.parent.mkdir()
    history.append(1, {k: 1.0 for k in cyclegan.LOSS_NAMES})
    text = history.path.read_text().replace("\n", "\r\n")
    lines = text.splitlines()
    damaged = lines + ["2,oops", "three," + ",".join("1" for _ in cyclegan.LOSS_NAMES)]
    history.path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(damaged).encode())  # BOM, CRLF, junk
    history.append(2, {k: 2.0 for k in cyclegan.LOSS_NAMES})
    columns = history.read()
    assert list(columns["epoch"]) == [1, 2] and list(columns["D_A"]) == [1.0, 2.0]
    history.path.write_bytes(b"\x00\xff garbage")
    history.append(3, {k: 3.0 for k in cyclegan.LOSS_NAMES})  # never stops an epoch's checkpoint
    assert list(history.read()["epoch"]) == [3]


def test_an_unwritable_log_dir_is_one_line_and_leaves_no_run_behind(tmp_path, monkeypatch, capsys):
    tiny_data(tmp_path / "data")
    (tmp_path / "logfile").write_text("a file where the log folder should be")
    monkeypatch.chdir(tmp_path)
    args = ["--data", "data", "--image-size", 32, "--epochs", 1, "--name", "run"]
    assert "cannot write" in one_line_error(args + ["--log-dir", "logfile"], capsys)
    assert [p.name for p in (tmp_path / "results" / "run").iterdir()] == [".lock"]
    assert not (tmp_path / "results" / "run" / "config.json").exists()


def test_no_path_under_a_run_is_joined_outside_the_run_folder_module():
    names = ['"config.json"', '"losses.csv"', '"metrics.json"', '"index.html"', '"loss_curves.png"',
             '"generatorAToB.h5"', '"discriminatorA.h5"', '"epoch_', '"checkpoints"',
             '/ "samples"', '/ "models"', '"losses.csv"', '".lock"']
    for path in ROOT.glob("*.py"):
        if path.name == "run_folder.py":
            continue
        text = path.read_text()
        assert not [n for n in names if n in text], path.name


@pytest.mark.slow
def test_two_first_demo_runs_at_once_make_one_whole_demo_dataset(tmp_path):
    code = "import data; data.resolve_dataset('demo', 'datasets')"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err.decode()
    demo = tmp_path / "datasets" / "demo"
    counts = {sub: len(list((demo / sub).glob("*.png"))) for sub in
              ("trainA", "trainB", "testA", "testB", "testA_truth")}
    assert counts == {"trainA": 120, "trainB": 120, "testA": 8, "testB": 8, "testA_truth": 8}
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir() if not p.name.endswith(".lock")) \
        == ["demo"]


def test_a_users_own_folder_named_like_a_generated_dataset_is_never_replaced(tmp_path):
    import data
    mine = tmp_path / "datasets" / "demo"
    tiny_data(mine)
    (mine / "notes.txt").write_text("my notes")
    before = hashes(mine)
    for _ in range(2):
        with pytest.raises(config.DataError, match="not generated by this program"):
            data.resolve_dataset("demo", tmp_path / "datasets")
    assert hashes(mine) == before


# --- --overwrite: only what a run of this program wrote --------------------------------------

@pytest.mark.parametrize("side", ["results", "logs"])
def test_overwrite_never_empties_a_folder_that_holds_no_run_of_this_program(tmp_path, monkeypatch,
                                                                          capsys, side):
    tiny_data(tmp_path / "data")
    mine = tmp_path / "victim" / ("res" if side == "results" else "logs") / "Documents"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work")
    (mine / "sub" / "notes.txt").write_text("more")
    before = hashes(tmp_path / "victim")
    monkeypatch.chdir(tmp_path)
    args = ["--data", "data", "--name", "Documents", "--results-dir", "victim/res", "--log-dir",
            "victim/logs", "--image-size", 32, "--epochs", 1]
    for extra in (["--overwrite"], []):
        err = one_line_error(args + extra, capsys)
        assert f"{mine.relative_to(tmp_path)} holds files but no run of this program" in err
    assert hashes(tmp_path / "victim") == before
    assert sorted(p.name for p in mine.iterdir()) == ["sub", "thesis.txt"]  # no lock left in it


def test_overwrite_removes_what_a_run_wrote_and_keeps_everything_else(tmp_path, capsys):
    folder = RunFolder(tmp_path / "results", tmp_path / "logs", "run")
    folder.open([tmp_path / "data"]).close()
    for path in (folder.config, folder.page, folder.sample(1), folder.root / ".losses.tmp.csv",
                 folder.logs / "events.out.tfevents.1.host.1.0.v2", folder.logs / "plugins" / "x",
                 folder.root / "notes.txt", folder.logs / "mine" / "draft.txt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    folder.open([tmp_path / "data"], overwrite=True).close()
    assert "--overwrite kept what no run writes" in capsys.readouterr().out
    assert sorted(p.name for p in folder.root.iterdir()) == [
        ".cyclegan-run", ".lock", "checkpoints", "models", "notes.txt", "samples"]
    assert list(folder.samples.iterdir()) == []
    assert sorted(p.name for p in folder.logs.iterdir()) == [".cyclegan-run", ".lock", "mine"]
    assert (folder.logs / "mine" / "draft.txt").read_text() == "x"
    # A link among what is kept is refused before anything is removed.
    folder.config.write_text("x")
    (folder.root / "elsewhere").symlink_to(tmp_path / "data")
    with pytest.raises(UserError, match="elsewhere is a link"):
        folder.open([tmp_path / "data"], overwrite=True)
    assert folder.config.is_file()


def test_opening_a_run_removes_what_a_cut_short_checkpoint_left_and_nothing_else(tmp_path):
    folder = RunFolder(tmp_path / "results", tmp_path / "logs", "run")
    folder.open([tmp_path / "data"]).close()
    partial = folder.checkpoints / "ckpt-7_temp"
    partial.mkdir()
    (partial / "part-00000-of-00001.data-00000-of-00001").write_bytes(bytes(1000))
    for name in ("ckpt-5.index", "ckpt-5.data-00000-of-00001", "checkpoint", "ckpt-7_temp_mine"):
        (folder.checkpoints / name).write_text("x")
    folder.open([tmp_path / "data"], resume=True).close()
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == [
        "checkpoint", "ckpt-5.data-00000-of-00001", "ckpt-5.index", "ckpt-7_temp_mine"]


def test_a_new_run_is_refused_where_only_the_log_folder_holds_an_earlier_one(tmp_path):
    folder = RunFolder(tmp_path / "results", tmp_path / "logs", "run")
    folder.open([tmp_path / "data"]).close()
    (folder.logs / "events.out.tfevents.1.host.1.0.v2").write_text("x")
    remove(folder.root)
    with pytest.raises(UserError, match="logs/run already holds a run; .*--overwrite"):
        folder.open([tmp_path / "data"])
    folder.open([tmp_path / "data"], overwrite=True).close()
    assert sorted(p.name for p in folder.logs.iterdir()) == [".cyclegan-run", ".lock"]
