"""Official datasets: downloaded from a loopback server the test starts, checked, unpacked safely,
given up when the server never finishes."""
import io
import signal
import subprocess
import sys
import time
import zipfile

import pytest

import config
import data
import download
from conftest import ENV, ROOT, one_line_error, serve_endless, serve_folder, within, write_images


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served: (that folder, its base address)."""
    served = tmp_path / "served"
    served.mkdir()
    with serve_folder(served) as (base, _):
        yield served, base


def dataset_zip(tmp_path, name="facades", extra=()):
    """Bytes of a small dataset zip in the official layout, plus (entry, bytes) `extra`."""
    source = tmp_path / "source"
    for sub in ("trainA", "trainB", "testA", "testB"):
        write_images(source / name / sub, 2, size=8)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(source.rglob("*")):
            archive.write(path, path.relative_to(source).as_posix())
        for entry, content in extra:
            archive.writestr(entry, content)
    return buffer.getvalue()


def listing(folder):
    """What a folder holds, but the lock that makes two runs download a dataset one at a time."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def use_hosts(monkeypatch, *templates):
    monkeypatch.setenv(download.DATASET_URL_VARIABLE, " ".join(templates))


def test_the_default_hosts_are_the_current_official_one_then_the_old_one(monkeypatch):
    monkeypatch.delenv(download.DATASET_URL_VARIABLE, raising=False)
    assert download.dataset_urls("monet2photo") == [
        "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets/monet2photo.zip",
        "https://people.eecs.berkeley.edu/~taesung_park/CycleGAN/datasets/monet2photo.zip"]


def test_download_falls_back_to_the_second_host_and_unpacks_in_place(tmp_path, server, monkeypatch):
    served, base = server
    (served / "good").mkdir()
    (served / "good" / "facades.zip").write_bytes(dataset_zip(tmp_path))
    use_hosts(monkeypatch, f"{base}/moved/{{name}}.zip", f"{base}/good/{{name}}.zip")
    datasets = tmp_path / "datasets"
    root = data.resolve_dataset("facades", datasets)
    assert root == (datasets / "facades").resolve()
    assert len(data.domain_files(root, "train", "A")) == 2
    assert listing(datasets) == ["facades"]  # no archive, no staging


def test_a_partial_archive_left_by_a_kill_is_fetched_again(tmp_path, server, monkeypatch):
    served, base = server
    good = dataset_zip(tmp_path)
    (served / "facades.zip").write_bytes(good)
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / "facades.zip").write_bytes(good[:len(good) // 2])
    (datasets / ".facades.unpacking").mkdir()  # a kill during an earlier unpack
    (datasets / ".facades.unpacking" / "junk").write_text("half")
    use_hosts(monkeypatch, f"{base}/{{name}}.zip")
    root = data.resolve_dataset("facades", datasets)
    assert len(data.domain_files(root, "test", "B")) == 2
    assert listing(datasets) == ["facades"]


def test_a_truncated_download_is_a_one_line_error_naming_every_host_and_the_folder(
        tmp_path, server, monkeypatch):
    served, base = server
    good = dataset_zip(tmp_path)
    (served / "facades.zip").write_bytes(good[:len(good) // 2])
    use_hosts(monkeypatch, f"{base}/{{name}}.zip", f"{base}/missing/{{name}}.zip")
    datasets = tmp_path / "datasets"
    with pytest.raises(config.DataError) as error:
        data.resolve_dataset("facades", datasets)
    message = str(error.value)
    assert "\n" not in message and "not a complete zip" in message
    assert f"{base}/facades.zip" in message and f"{base}/missing/facades.zip" in message
    assert str((datasets / "facades").resolve()) in message
    assert listing(datasets) == []  # nothing half-written is left to trust


@pytest.mark.parametrize("entry, words", [
    ("../evil.txt", "outside facades/"),
    ("/tmp/evil.txt", "outside facades/"),
    ("demo/trainA/0000.png", "outside facades/"),
    ("facades/../demo/x.png", "outside facades/"),
    ("link", "link"),
])
def test_an_archive_that_writes_elsewhere_is_refused_whole(tmp_path, server, monkeypatch, entry,
                                                           words):
    served, base = server
    if entry == "link":
        info = zipfile.ZipInfo("facades/trainA/link")
        info.external_attr = (0o120777 << 16)  # a symbolic link entry
        extra = [(info, "/etc/passwd")]
    else:
        extra = [(entry, "payload")]
    (served / "facades.zip").write_bytes(dataset_zip(tmp_path, extra=extra))
    use_hosts(monkeypatch, f"{base}/{{name}}.zip")
    datasets = tmp_path / "datasets"
    write_images(datasets / "demo" / "trainA", 1)
    written = lambda: sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                             if "served" not in p.parts and not p.name.endswith(".lock"))
    before = written()
    with pytest.raises(config.DataError, match=words):
        data.resolve_dataset("facades", datasets)
    after = written()
    assert after == before


def test_a_zip_bomb_is_refused_before_unpacking(tmp_path, server, monkeypatch):
    served, base = server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("facades/trainA/zeros.png", bytes(200 * 2 ** 20))
    assert len(buffer.getvalue()) < 400_000
    (served / "facades.zip").write_bytes(buffer.getvalue())
    use_hosts(monkeypatch, f"{base}/{{name}}.zip")
    datasets = tmp_path / "datasets"
    with pytest.raises(config.DataError, match="would unpack .* into 209715200 bytes"):
        data.resolve_dataset("facades", datasets)
    assert listing(datasets) == []


@pytest.mark.parametrize("pause, announce, words", [
    (0.2, None, "less than 100 bytes a second"),   # a byte a read: no read ever times out
    (0.0, None, "sends more than"),                 # an endless body
    (0.0, 10 ** 12, "announces 1000000000000 bytes"),
])
def test_a_download_that_would_never_end_is_given_up_leaving_nothing(tmp_path, monkeypatch, pause,
                                                                      announce, words):
    monkeypatch.setattr(download, "RATE_WINDOW_S", 1)
    monkeypatch.setattr(download, "MIN_RATE", 100)
    monkeypatch.setitem(download.DATASET_MIB, "facades", 1)
    datasets = tmp_path / "datasets"
    with serve_endless(pause, announce) as (base, requests):
        use_hosts(monkeypatch, f"{base}/{{name}}.zip")
        with pytest.raises(config.DataError, match=words) as error:
            within(60, data.resolve_dataset, "facades", datasets)
    assert requests == ["/facades.zip"] and "\n" not in str(error.value)
    assert listing(datasets) == []


@pytest.mark.slow
def test_ctrl_c_during_a_download_is_one_line_and_leaves_nothing(tmp_path):
    with serve_endless(pause=0.1) as (base, requests):
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--data", "facades"], cwd=tmp_path,
            env={**ENV, download.DATASET_URL_VARIABLE: f"{base}/{{name}}.zip"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not requests:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.strip() == "stopped (Ctrl-C)", err
    assert listing(tmp_path / "datasets") == []


@pytest.mark.parametrize("template", ["http://h/{}.zip", "http://h/{name}/{model}.zip",
                                      "http://h/{name.zip"])
def test_a_mirror_address_with_another_field_than_name_is_a_one_line_error(tmp_path, monkeypatch,
                                                                           capsys, template):
    monkeypatch.chdir(tmp_path)
    use_hosts(monkeypatch, template)
    assert download.DATASET_URL_VARIABLE in one_line_error(["--data", "facades"], capsys)
