"""Official PyTorch checkpoints, read without PyTorch, compute what PyTorch computed.

The fixtures in tests/fixtures/official were written by
tests/fixtures/make_official_fixtures.py from the official networks.py
with random N(0, 0.02) weights; each .npz holds an input and PyTorch's output.
"""
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import write_images
from conftest import ENV, ROOT, one_line_error, serve_folder

import main
import pretrained
import pth_reader

FIXTURES = Path(__file__).parent / "fixtures" / "official"
NETWORKS = ("resnet_2blocks_ngf8", "resnet_6blocks_ngf4", "resnet_9blocks_ngf4", "patch70_ndf8")
LAYOUTS = {"resnet_2blocks_ngf8": ("generator", 8, 2), "resnet_6blocks_ngf4": ("generator", 4, 6),
           "resnet_9blocks_ngf4": ("generator", 4, 9), "patch70_ndf8": ("discriminator", 8, 0)}


def assert_matches_pytorch(pth, npz, image_size):
    state = pth_reader.read_pth(pth)
    model = pretrained.convert_state_dict(state, image_size)
    reference = np.load(npz)
    out = np.asarray(model(reference["input"], training=False))
    assert out.shape == reference["output"].shape
    np.testing.assert_allclose(out, reference["output"], atol=1e-4, rtol=0)
    return state, model


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("name", NETWORKS)
def test_converted_official_network_matches_pytorch(name, fmt):
    state, model = assert_matches_pytorch(FIXTURES / f"{name}.{fmt}.pth", FIXTURES / f"{name}.npz", 64)
    assert pretrained.official_layout(state)[:3] == LAYOUTS[name]
    assert all(v.dtype == np.float32 for v in state.values())


@pytest.mark.skipif(not os.environ.get("CYCLEGAN_FULL_FIXTURES"),
                    reason="set CYCLEGAN_FULL_FIXTURES to a folder written by "
                           "make_official_fixtures.py --full (45 MB per file)")
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_full_size_official_generator_matches_pytorch(fmt):
    folder = Path(os.environ["CYCLEGAN_FULL_FIXTURES"])
    _, model = assert_matches_pytorch(folder / f"resnet_9blocks_ngf64.{fmt}.pth",
                                      folder / "resnet_9blocks_ngf64.npz", 256)
    assert model.count_params() == 11_378_179


def test_pre_0_4_instance_norm_buffers_are_dropped():
    raw = (FIXTURES / "resnet_9blocks_ngf4.legacy.pth").read_bytes()
    assert b"running_mean" in raw and b"num_batches_tracked" in raw
    state = pth_reader.read_pth(FIXTURES / "resnet_9blocks_ngf4.legacy.pth")
    assert not [k for k in state if k.endswith(pth_reader.STALE_NORM_BUFFERS)]
    assert set(state) == set(pth_reader.read_pth(FIXTURES / "resnet_9blocks_ngf4.zip.pth"))


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, fmt):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"model.1.weight": RunsCommand(marker)}, protocol=2)
    path = tmp_path / "hostile.pth"
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("hostile/data.pkl", payload)
    else:
        path.write_bytes(payload)
    with pytest.raises(pth_reader.CheckpointError, match=r"refusing posix\.system|refusing os\.system"):
        pth_reader.read_pth(path)
    assert not marker.exists()


def test_a_tensor_cannot_point_outside_its_data():
    storage = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(pth_reader.rebuild_tensor(storage, 1, (2, 2), (3, 1)), [[1, 2], [4, 5]])
    for offset, size, stride in ((3, (2, 2), (3, 1)), (0, (7,), (1,)), (0, (2,), (-1,))):
        with pytest.raises(pth_reader.CheckpointError):
            pth_reader.rebuild_tensor(storage, offset, size, stride)
    with pytest.raises(pth_reader.CheckpointError, match="malformed"):  # a view is no storage
        pth_reader.rebuild_tensor(storage.reshape(2, 3), 0, (2,), (1,))


def test_wrong_layouts_name_what_was_expected():
    state = pth_reader.read_pth(FIXTURES / "resnet_2blocks_ngf8.zip.pth")
    missing = {k: v for k, v in state.items() if k != "model.10.conv_block.5.weight"}
    with pytest.raises(pth_reader.CheckpointError, match="ResnetGenerator.*model.10.conv_block.5.weight is missing"):
        pretrained.convert_state_dict(missing)
    dropout = {k.replace("conv_block.5", "conv_block.6"): v for k, v in state.items()}
    with pytest.raises(pth_reader.CheckpointError, match="no dropout"):
        pretrained.convert_state_dict(dropout)
    wrong_shape = {**state, "model.4.weight": np.zeros((16, 8, 4, 4), np.float32)}
    with pytest.raises(pth_reader.CheckpointError, match=r"model.4.weight has shape \(16, 8, 4, 4\)"):
        pretrained.convert_state_dict(wrong_shape)
    with pytest.raises(pth_reader.CheckpointError, match="expected an official CycleGAN"):
        pretrained.convert_state_dict({"fc.weight": np.zeros((2, 2), np.float32)})
    no_blocks = {k: v for k, v in state.items() if not pretrained.BLOCK_KEY.match(k)}
    with pytest.raises(pth_reader.CheckpointError, match="with residual blocks, found none"):
        pretrained.convert_state_dict(no_blocks)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_truncated_or_foreign_files_are_one_line_errors(tmp_path, capsys, fmt):
    raw = (FIXTURES / f"resnet_2blocks_ngf8.{fmt}.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    err = one_line_error(["convert", "--pth", tmp_path / "cut.pth", "--output", tmp_path / "g.h5"], capsys)
    assert "cut.pth" in err
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    one_line_error(["convert", "--pth", tmp_path / "notes.pth", "--output", tmp_path / "g.h5"], capsys)
    assert not (tmp_path / "g.h5").exists()


def test_convert_then_translate_a_200x300_image(tmp_path, capsys):
    h5 = tmp_path / "g.h5"
    assert main.main(["convert", "--pth", str(FIXTURES / "resnet_9blocks_ngf4.legacy.pth"),
                      "--output", str(h5)]) == 0
    assert "resnet_9blocks generator, ngf 4" in capsys.readouterr().out
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8)).save(
        tmp_path / "wide.png")
    assert main.main(["translate", "--generator", str(h5), "--input", str(tmp_path / "wide.png"),
                      "--output", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "wide.png").size == (300, 200)
    # A second convert would overwrite: refused, the first kept.
    one_line_error(["convert", "--pth", FIXTURES / "patch70_ndf8.zip.pth", "--output", h5], capsys)
    assert keras.models.load_model(h5, compile=False).output.shape[-1] == 3


@pytest.fixture
def model_server(monkeypatch):
    """The fixtures folder over loopback HTTP, as the pretrained-model address."""
    with serve_folder(FIXTURES) as (base, requests):
        monkeypatch.setenv(pretrained.URL_VARIABLE, f"{base}/{{name}}.zip.pth")
        yield requests


def test_translate_pretrained_downloads_converts_once_and_caches(tmp_path, monkeypatch, capsys,
                                                                  model_server):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "paintings", 2, size=36)
    args = ["translate", "--pretrained", "resnet_2blocks_ngf8", "--input", "paintings",
            "--output", "photos"]
    assert main.main(args) == 0
    assert "Converted the official resnet_2blocks_ngf8" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["img_000.png", "img_001.png"]
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == ["resnet_2blocks_ngf8.h5"]
    assert main.main(args + ["--overwrite"]) == 0
    assert len(model_server) == 1  # the second run used the cached .h5

    assert main.main(["convert", "--pretrained", "resnet_6blocks_ngf4", "--output", "g6.h5"]) == 0
    assert "(resnet_6blocks generator, ngf 4) into g6.h5" in capsys.readouterr().out
    assert (tmp_path / "g6.h5").is_file() and len(model_server) == 2


def test_unknown_pretrained_model_names_the_address_tried(tmp_path, monkeypatch, capsys,
                                                          model_server):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(["translate", "--pretrained", "no_such_model", "--input", ".",
                          "--output", "out"], capsys)
    assert "/no_such_model.zip.pth" in err
    assert not (tmp_path / "pretrained" / "no_such_model.h5").exists()
    err = one_line_error(["translate", "--pretrained", "../etc", "--input", ".", "--output", "out"],
                         capsys)
    assert "monet2photo" in err
    for template in ("http://127.0.0.1:1/model.pth", "http://127.0.0.1:1/{model}.pth"):
        monkeypatch.setenv(pretrained.URL_VARIABLE, template)
        err = one_line_error(["convert", "--pretrained", "x", "--output", "x.h5"], capsys)
        assert "{name}" in err and template in err


def zip_pth(path, tensors, storage_bytes):
    """A zip-format .pth of one float storage of `storage_bytes` and {name: (size, stride)}
    tensors viewing it, pickled as torch.save pickles them, without PyTorch."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", state_pickle(tensors, storage_bytes))
        archive.writestr("archive/data/0", bytes(storage_bytes))
    return path


def state_pickle(tensors, storage_bytes):
    """The data.pkl of zip_pth."""
    import collections
    import sys
    import types
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        pass
    for module, function in ((torch, FloatStorage), (utils, _rebuild_tensor_v2)):
        function.__module__, function.__qualname__ = module.__name__, function.__name__
        setattr(module, function.__name__, function)

    class Storage:
        pass

    class Tensor:
        def __init__(self, size, stride):
            self.size, self.stride = size, stride

        def __reduce__(self):
            return _rebuild_tensor_v2, (storage, 0, self.size, self.stride, False,
                                        collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", FloatStorage, "0", "cpu", storage_bytes // 4)
            return None

    storage = Storage()
    state = collections.OrderedDict((k, Tensor(*v)) for k, v in tensors.items())
    buffer = io.BytesIO()
    modules = {"torch": torch, "torch._utils": utils}
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        Pickler(buffer, protocol=2).dump(state)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
    return buffer.getvalue()


def test_a_tensor_claiming_more_than_the_file_holds_is_a_one_line_error(tmp_path, capsys):
    """Stride 0 lets 4 bytes claim 100000 x 100000 floats (37 GiB) that reading would copy out."""
    bomb = zip_pth(tmp_path / "bomb.pth", {"model.1.weight": ((100_000, 100_000), (0, 0))}, 4)
    assert bomb.stat().st_size < 1000
    err = one_line_error(["convert", "--pth", bomb, "--output", tmp_path / "g.h5"], capsys)
    assert "claim more bytes than the file has" in err and "bomb.pth" in err
    many = zip_pth(tmp_path / "many.pth", {f"t{i}": ((256,), (1,)) for i in range(50)}, 1024)
    with pytest.raises(pth_reader.CheckpointError, match="claim more bytes"):  # one storage, shared
        pth_reader.read_pth(many)
    fine = zip_pth(tmp_path / "fine.pth", {"a": ((2, 128), (128, 1))}, 1024)
    assert pth_reader.read_pth(fine)["a"].shape == (2, 128)
    assert not (tmp_path / "g.h5").exists()


def deflate_bomb(path, storage_bytes, inflated_bytes):
    """A zip .pth whose tensor data entry declares `storage_bytes` (as its pickle does) and is a
    deflated stream of about 1 MB that inflates to `inflated_bytes` of zeros."""
    chunk = 2 ** 24
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    # After a full flush the stream starts afresh: the same bytes again inflate to the same chunk.
    block = squeeze.compress(bytes(chunk)) + squeeze.flush(zlib.Z_FULL_FLUSH)
    stream = block * (inflated_bytes // chunk) + squeeze.flush()
    tensors = {"model.1.weight": ((storage_bytes // 4,), (1,))}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", state_pickle(tensors, storage_bytes))
        archive.writestr("archive/data/0", stream)  # stored: the entry's bytes are the stream
    raw = bytearray(path.read_bytes())
    name = b"archive/data/0"
    local = raw.index(b"PK\x03\x04" + raw[4:8], raw.index(b"archive/data.pkl") + 1)
    central = next(i for i in range(len(raw)) if raw[i:i + 4] == b"PK\x01\x02"
                   and raw[i + 46:i + 46 + len(name)] == name)
    for at, method_at, size_at in ((local, 8, 22), (central, 10, 24)):
        raw[at + method_at:at + method_at + 2] = struct.pack("<H", zipfile.ZIP_DEFLATED)
        raw[at + size_at:at + size_at + 4] = struct.pack("<I", storage_bytes)
    path.write_bytes(raw)
    return path


def deep_legacy_pth(path, depth):
    """A legacy .pth whose state dict's one key is a tuple nested `depth` deep (a few bytes a
    level), which CPython's unpickler builds and then hashes by recursion, past the C stack."""
    head = b"".join(pickle.dumps(value, protocol=2) for value in
                    (pth_reader.LEGACY_MAGIC, pth_reader.LEGACY_PROTOCOL, {"little_endian": True}))
    # PROTO 2, {}, (), then TUPLE1 `depth` times, None, SETITEM, STOP; no storage keys.
    path.write_bytes(head + b"\x80\x02})" + b"\x85" * depth + b"Ns." + pickle.dumps([], protocol=2))
    return path


def test_a_pth_whose_data_inflates_past_the_file_is_refused_in_bounded_memory(tmp_path, capsys):
    declares = deflate_bomb(tmp_path / "declares.pth", 2 ** 30, 2 ** 30)
    hides = deflate_bomb(tmp_path / "hides.pth", 2 ** 19, 2 ** 30)  # declares 512 KiB
    assert declares.stat().st_size < 2 ** 21 and hides.stat().st_size < 2 ** 21
    assert "claim more bytes than the file has" in one_line_error(
        ["convert", "--pth", declares, "--output", tmp_path / "g.h5"], capsys)
    assert "hides.pth is not a readable PyTorch checkpoint" in one_line_error(
        ["convert", "--pth", hides, "--output", tmp_path / "g.h5"], capsys)
    # Neither is inflated whole: reading them fits in 600 MB more address space.
    code = ("import resource, sys; sys.path.insert(0, sys.argv[1]); import pth_reader;"
            # 600 MB beyond what the process holds once its modules are imported.
            "mapped = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
            "resource.setrlimit(resource.RLIMIT_AS, (mapped + 600 * 2 ** 20, resource.RLIM_INFINITY))\n"
            "for path in sys.argv[2:]:\n"
            "    try: pth_reader.read_pth(path)\n"
            "    except pth_reader.CheckpointError as error: print(error)")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), str(declares), str(hides)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2, result.stderr
    assert not (tmp_path / "g.h5").exists()


def test_a_pth_nesting_a_tuple_200000_deep_is_refused_not_a_crash(tmp_path):
    deep = deep_legacy_pth(tmp_path / "deep.pth", 200_000)
    assert deep.stat().st_size < 300_000
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "convert", "--pth", str(deep),
                             "--output", str(tmp_path / "g.h5")], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "nests objects more than" in result.stderr
    shallow = deep_legacy_pth(tmp_path / "shallow.pth", 3)  # the scan refuses depth, not tuples
    with pytest.raises(pth_reader.CheckpointError, match="holds no state dict of tensors"):
        pth_reader.read_pth(shallow)


def test_a_pickle_memo_index_past_its_length_is_refused_before_unpickling():
    """CPython's unpickler would allocate a memo table as long as the index (16 GiB here)."""
    hostile = io.BytesIO(b"\x80\x02N" + b"r" + struct.pack("<I", 2 ** 31) + b".")
    with pytest.raises(pth_reader.CheckpointError, match="memo index"):
        pth_reader.unpickle(hostile)
