import numpy as np

import image_files


def test_hidden_and_non_image_files_are_ignored(tiny_dataset):
    (tiny_dataset / "trainA" / ".hidden.png").write_bytes(b"x")
    (tiny_dataset / "trainA" / "notes.txt").write_text("hi")
    assert len(image_files.list_images(tiny_dataset / "trainA")) == 5


def test_to_unit_maps_network_range_to_display_range():
    np.testing.assert_allclose(image_files.to_unit(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 0.5, 1, 1])
