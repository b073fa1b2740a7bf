"""Quality numbers checked against independent computations; FID and KID; evaluate."""
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import config
import data
import download
import generated
import metrics
from config import UserError
from conftest import write_images


def scaling_model(factor):
    """A stand-in generator: x -> factor * x, any image size."""
    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, keras.layers.Rescaling(factor)(inputs))


# --- FID and KID -----------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero_and_of_a_shifted_copy_the_shift_squared():
    x = np.random.default_rng(0).normal(size=(200, 6))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-8)
    # Equal covariances: only the mean term is left.
    assert metrics.fid(x, x + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-8)


def test_frechet_distance_matches_the_eigenvalues_of_the_covariance_product():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = a @ a.T, b @ b.T  # positive definite, not commuting
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # Tr sqrt(c1 c2) is the sum of the square roots of the (real, positive) eigenvalues of c1 c2.
    trace_sqrt = np.sum(np.sqrt(np.linalg.eigvals(c1 @ c2).real))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)
    # Diagonal covariances: the trace term is the squared difference of standard deviations.
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert metrics.frechet_distance(np.zeros(3), np.diag(v1), np.ones(3), np.diag(v2)) == \
        pytest.approx(3 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 3)), rng.normal(1.0, 1.0, size=(4, 3))
    k = lambda u, v: (u @ v / 3 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(a, b) for a in x for b in y) / 20
    assert metrics.kid(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_over_subsets_is_near_zero_for_one_distribution_and_not_for_two():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    same = metrics.kid(x, y, subset=100, subsets=20)
    shifted = metrics.kid(x, y + 1.0, subset=100, subsets=20)
    assert abs(same) < 0.05 < shifted


# --- Image scores ----------------------------------------------------------

def test_image_scores_match_a_computation_by_hand(tmp_path):
    files_a = [str(p) for p in write_images(tmp_path / "A", 11, size=32, seed=0)]
    files_b = [str(p) for p in write_images(tmp_path / "B", 3, size=32, seed=1)]
    g_ab, g_ba = scaling_model(-1.0), scaling_model(0.5)
    # 11 images: two batches of unequal size, so the mean must be per image.
    scores = metrics.image_scores(g_ab, g_ba, metrics.file_batches(files_a, 32),
                                  metrics.file_batches(files_b, 32))
    unit = lambda x: (x + 1) / 2
    a, b = data.load_batch(files_a, 32).numpy(), data.load_batch(files_b, 32).numpy()
    expected = {
        "cycle_L1_A": np.abs(unit(-0.5 * a) - unit(a)).mean(),   # A -> -A -> -A/2
        "identity_L1_A": np.abs(unit(0.5 * a) - unit(a)).mean(),
        "cycle_L1_B": np.abs(unit(-0.5 * b) - unit(b)).mean(),   # B -> B/2 -> -B/2
        "identity_L1_B": np.abs(unit(-b) - unit(b)).mean(),
        "cycle_PSNR_A": np.mean(tf.image.psnr(unit(-0.5 * a), unit(a), 1.0)),
        "cycle_PSNR_B": np.mean(tf.image.psnr(unit(-0.5 * b), unit(b), 1.0)),
    }
    assert scores.keys() == expected.keys()  # no truth folder, no truth scores
    for name, value in expected.items():
        assert scores[name] == pytest.approx(float(value), rel=1e-4), name


def test_a_perfect_demo_generator_beats_the_do_nothing_baseline(tmp_path):
    root = generated.make_demo_dataset(tmp_path / "demo")
    files_a, files_b = data.domain_files(root, "test", "A"), data.domain_files(root, "test", "B")
    truth = metrics.truth_files(files_a)
    assert [Path(t).name for t in truth] == [Path(f).name for f in files_a]
    negate = scaling_model(-1.0)  # the demo's colour negative, in [-1, 1] pixels
    scores = metrics.image_scores(negate, negate, metrics.file_batches(files_a, 32, truth),
                                  metrics.file_batches(files_b, 32))
    assert scores["truth_PSNR"] > 60 > 15 > scores["baseline_PSNR"]
    assert scores["truth_SSIM"] == pytest.approx(1.0, abs=1e-4) and scores["baseline_SSIM"] < 0.5
    # Exact reconstruction, capped: float32 rounding differs between CPUs, a real miss is < 70 dB.
    assert scores["cycle_PSNR_A"] == pytest.approx(metrics.PSNR_CAP_DB, abs=1e-3)
    assert scores["cycle_L1_B"] == pytest.approx(0.0, abs=1e-6)
    a, t = data.load_batch(files_a, 32).numpy(), data.load_batch(truth, 32).numpy()
    assert scores["baseline_SSIM"] == pytest.approx(
        float(np.mean(tf.image.ssim((a + 1) / 2, (t + 1) / 2, 1.0))), rel=1e-4)
    assert "closer to the truth" in metrics.truth_verdict(scores)


def test_truth_files_need_every_name(tmp_path):
    files = [str(p) for p in write_images(tmp_path / "testA", 3)]
    assert metrics.truth_files(files) is None
    write_images(tmp_path / "testA_truth", 2)
    with pytest.raises(config.DataError, match="lacks 1 of the images"):
        metrics.truth_files(files)


# --- Inception -------------------------------------------------------------

def test_failed_weight_download_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(download, "fetch", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(metrics.FeaturesUnavailable, match="network is unreachable.*--inception-weights"):
        metrics.load_inception()


def test_local_inception_weights_are_used(tmp_path):
    keras.utils.set_random_seed(0)
    saved = keras.applications.InceptionV3(weights=None, include_top=False, pooling="avg",
                                           input_shape=(299, 299, 3))
    saved.save_weights(tmp_path / "inception.weights.h5")
    model = metrics.load_inception(str(tmp_path / "inception.weights.h5"))
    for got, want in zip(model.weights, saved.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    assert metrics.features(model, [images]).shape == (2, 2048)
    with pytest.raises(UserError, match="is not a file"):
        metrics.load_inception(str(tmp_path / "missing.h5"))


def test_distribution_scores_compare_translated_with_real_features(tmp_path):
    files_a = [str(p) for p in write_images(tmp_path / "A", 5, size=32, seed=0)]
    files_b = [str(p) for p in write_images(tmp_path / "B", 4, size=32, seed=1)]
    inputs = keras.Input((16, 16, 3))  # a tiny stand-in for InceptionV3
    extractor = keras.Model(inputs, keras.layers.Dense(6)(keras.layers.Flatten()(inputs)))
    g_ab, g_ba = scaling_model(-1.0), scaling_model(0.5)
    scores = metrics.distribution_scores(extractor, g_ab, g_ba, files_a, files_b, 32)

    def feats(images):  # resize, then Inception's preprocessing is the identity on [-1, 1]
        return np.asarray(extractor(tf.image.resize(images, (16, 16)))).astype(np.float64)
    a, b = data.load_batch(files_a, 32), data.load_batch(files_b, 32)
    assert scores["FID_B"] == pytest.approx(metrics.fid(feats(-a), feats(b)), rel=1e-4)
    assert scores["KID_B"] == pytest.approx(metrics.kid(feats(-a), feats(b)), rel=1e-4)
    assert scores["FID_A"] == pytest.approx(metrics.fid(feats(0.5 * b), feats(a)), rel=1e-4)
    assert scores["KID_A"] == pytest.approx(metrics.kid(feats(0.5 * b), feats(a)), rel=1e-4)


def test_colour_map_oracle_recovers_a_global_colour_change_and_not_a_local_one():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (3, 16, 16, 3)).astype(np.float32)
    mix = np.array([[0.6, 0.3, 0.0], [0.1, 0.7, 0.1], [0.2, 0.0, 0.5]], np.float32)
    as_net = lambda x: x * 2 - 1
    recoloured = images @ mix.T + 0.1
    assert metrics.colour_map_psnr([(as_net(images), as_net(recoloured))]) > 60
    shifted = np.roll(recoloured, 1, axis=2)  # every pixel takes its neighbour's colour
    assert metrics.colour_map_psnr([(as_net(images), as_net(shifted))]) < 25


def test_evaluate_without_models_names_generators_and_a_stopped_one_leaves_no_folder(
        tmp_path, monkeypatch, capsys):
    import shutil
    import main
    import cyclegan
    from config import make_config
    from conftest import one_line_error, tiny_data
    from run_folder import RunFolder
    tiny_data(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    folder = RunFolder("results", "logs", "run")
    folder.root.mkdir(parents=True)
    folder.write_config(make_config(name="run", data="data", image_size=32, epochs=1))
    err = one_line_error(["evaluate", "--name", "run", "--no-fid"], capsys)
    assert "run 'run' has saved no models yet" in err and "--generators A2B B2A" in err
    folder.save_models(cyclegan.CycleGAN(make_config(image_size=32, filters=4, disc_filters=4,
                                                    res_blocks=1)))
    args = ["evaluate", "--generators", folder.model("g_ab"), folder.model("g_ba"), "--data", "data",
            "--image-size", 32, "--no-fid"]
    shutil.rmtree(tmp_path / "data" / "testB")
    assert "missing folder" in one_line_error(args, capsys)
    assert not (tmp_path / "results" / "data-eval").exists()
    write_images(tmp_path / "data" / "testB", 1)

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(metrics, "image_scores", interrupted)
    assert main.main([str(a) for a in args]) == 130  # Ctrl-C while scoring
    assert not (tmp_path / "results" / "data-eval").exists()
