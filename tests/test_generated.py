import numpy as np
import pytest
from PIL import Image

import generated
import metrics


def test_demo_dataset_is_deterministic_with_a_known_truth(tmp_path):
    first = generated.make_demo_dataset(tmp_path / "one")
    second = generated.make_demo_dataset(tmp_path / "two")
    for sub in ("trainA", "trainB", "testA", "testB", "testA_truth"):
        names = sorted(p.name for p in (first / sub).iterdir())
        assert names and names == sorted(p.name for p in (second / sub).iterdir())
        assert (first / sub / names[0]).read_bytes() == (second / sub / names[0]).read_bytes()
    a = np.asarray(Image.open(first / "testA" / "0000.png"))
    truth = np.asarray(Image.open(first / "testA_truth" / "0000.png"))
    np.testing.assert_array_equal(truth, generated.demo_translation(a))
    assert not (tmp_path / "one.partial").exists()


def stand_in_photos():
    """Three small 'photos' of distinct flat colours, so a patch tells its source by its red."""
    return {name: np.full((200, 240, 3), stand_in_colour(level), np.uint8)
            for name, level in (("one", 30), ("two", 120), ("three", 210))}


def stand_in_colour(red):
    return red, red // 2, red // 4


def pixel_levels(folder):
    return {int(np.asarray(Image.open(p))[0, 0, 0]) for p in folder.iterdir()}


@pytest.mark.parametrize("make, translation", [(generated.make_photo_dataset, generated.photo_grading),
                                               (generated.make_painterly_dataset, generated.painterly)])
def test_photo_datasets_split_by_photo_with_their_translation_as_truth(tmp_path, monkeypatch,
                                                                       make, translation):
    monkeypatch.setattr(generated, "PHOTO_TEST_COUNT", 1)
    root = make(tmp_path / "photos", stand_in_photos())
    names = {sub: sorted(p.name for p in (root / sub).iterdir())
             for sub in ("trainA", "trainB", "testA", "testB", "testA_truth")}
    assert len(names["trainA"]) == len(names["trainB"]) == 2 * generated.PHOTO_PATCHES["train"] // 2
    assert names["testA"] == names["testA_truth"] and names["testA"]
    train_sources = {n.split("_")[0] for n in names["trainA"] + names["trainB"]}
    test_sources = {n.split("_")[0] for n in names["testA"] + names["testB"]}
    assert train_sources == {"one", "two"} and test_sources == {"three"}
    assert pixel_levels(root / "trainA") == {30, 120} and pixel_levels(root / "testA") == {210}
    for name in names["testA"]:
        a = np.asarray(Image.open(root / "testA" / name))
        assert a.shape == (generated.PHOTO_PATCH, generated.PHOTO_PATCH, 3)
        np.testing.assert_array_equal(np.asarray(Image.open(root / "testA_truth" / name)),
                                      translation(a))
    translated = int(translation(np.full((1, 1, 3), stand_in_colour(210), np.uint8))[0, 0, 0])
    assert pixel_levels(root / "testB") == {translated} != {210}  # B is translated, not raw
    assert (root / generated.GENERATED_MARK).is_file()
    assert not (tmp_path / "photos.partial").exists()


def test_photo_grading_is_a_real_change_of_colour():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    graded = generated.photo_grading(image)
    assert graded.dtype == np.uint8 and graded.shape == image.shape
    assert np.abs(graded.astype(int) - image).mean() > 20


def textured(size=64):
    """Smooth colour gradients under fine noise: detail a paint filter flattens."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([60 + 120 * xx, 80 + 100 * yy, 150 - 80 * xx * yy], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def test_painterly_flattens_detail_that_no_colour_map_reproduces():
    image = textured()
    painted = generated.painterly(image)
    assert painted.dtype == np.uint8 and painted.shape == image.shape
    detail = lambda x: np.abs(np.diff(x.astype(float), axis=1)).mean()
    assert detail(painted) < detail(image) / 2
    as_batch = lambda x: (x[None].astype(np.float32) / 127.5 - 1,)
    colour_map = metrics.colour_map_psnr([as_batch(image) + as_batch(painted)])
    graded = metrics.colour_map_psnr([as_batch(image) + as_batch(generated.photo_grading(image))])
    assert colour_map < 30 < graded  # the grading is (nearly) a colour map, the paint is not
