"""Files written whole or not at all, never through a link; locks; the checks of user outputs."""
import shutil
import subprocess
import sys
import time

import pytest

import fileio
from config import UserError
from conftest import ENV, ROOT, run_cli, tiny_data, write_images
from fileio import FileLock, atomic_path, atomic_write, checked_output, user_output


def test_atomic_write_replaces_the_file_only_once_written(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text("old")
    with atomic_write(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old" and tmp.suffix == ".json"
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def test_atomic_write_keeps_the_old_file_and_no_temporary_one_on_error(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["losses.csv"]


def test_a_link_planted_at_the_temporary_name_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    path = tmp_path / "config.json"
    atomic_path(path).symlink_to(victim)
    with atomic_write(path) as tmp:
        tmp.write_text("settings")
    assert victim.read_text() == "mine"
    assert path.read_text() == "settings" and not path.is_symlink()


def test_a_failed_clean_up_never_hides_the_first_error(tmp_path, monkeypatch):
    def fails(path):
        raise OSError("clean-up failed too")
    with pytest.raises(RuntimeError, match="the real problem"):
        with atomic_write(tmp_path / "model") as tmp:
            tmp.mkdir()
            monkeypatch.setattr(fileio, "remove", fails)
            raise RuntimeError("the real problem")


def test_an_unwritable_place_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write") as error:
        with atomic_write(tmp_path / "file" / "out.png") as tmp:
            tmp.write_text("x")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("make, overwrite, words", [
    (lambda p: p.mkdir(), True, "is a folder"),
    (lambda p: p.symlink_to(p.parent / "elsewhere.png"), True, "is a link"),
    (lambda p: p.write_text("earlier"), False, "already exists; pass --overwrite"),
])
def test_user_outputs_refuse_folders_links_and_earlier_files(tmp_path, make, overwrite, words):
    path = tmp_path / "out.png"
    make(path)
    with pytest.raises(UserError, match=words):
        with user_output(path, overwrite=overwrite) as tmp:
            tmp.write_text("new")
    assert not list(tmp_path.glob(".*tmp*"))
    assert not (tmp_path / "elsewhere.png").exists()


def test_user_outputs_check_the_ending_and_never_replace_a_folder_output(tmp_path):
    with pytest.raises(UserError, match="must end in .h5 or .keras"):
        checked_output(tmp_path / "g.onnx", (".h5", ".keras"))
    (tmp_path / "saved").mkdir()
    with pytest.raises(UserError, match="already exists; choose another"):
        checked_output(tmp_path / "saved", ("",), overwrite=True)
    with user_output(tmp_path / "deep" / "er" / "g.h5", (".h5",)) as tmp:
        tmp.write_text("model")
    assert (tmp_path / "deep" / "er" / "g.h5").read_text() == "model"


def test_a_lock_is_never_taken_through_a_link_and_a_held_one_names_its_holder(tmp_path):
    (tmp_path / "target").write_text("precious")
    (tmp_path / "link.lock").symlink_to(tmp_path / "target")
    with pytest.raises(UserError, match="is a link"):
        FileLock(tmp_path / "link.lock", "busy")
    assert (tmp_path / "target").read_text() == "precious"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import fileio;"
            "lock = fileio.FileLock(sys.argv[2], 'busy'); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path / "run.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
            FileLock(tmp_path / "run.lock", "in use by pid {pid}")
        started = time.monotonic()
        with pytest.raises(UserError, match="still busy"):
            FileLock(tmp_path / "run.lock", "still busy", wait=0.5)
        assert time.monotonic() - started < 30  # the wait has a deadline
    finally:
        holder.kill()
        holder.wait()
    FileLock(tmp_path / "run.lock", "busy").release()  # the kernel dropped the dead holder's lock


def read_only_run(folder, *args, cwd):
    """The CLI with `folder` mounted read-only, in a private mount namespace of its own."""
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    command = ["unshare", "-rm", "sh", "-c", script, str(folder)]
    if shutil.which("unshare") is None:
        pytest.skip("no unshare on this machine")
    probe = subprocess.run(command + ["touch", str(folder / "probe")], capture_output=True)
    if b"Read-only" not in probe.stderr:
        pytest.skip("no private read-only mounts on this machine")
    return subprocess.run(command + [sys.executable, str(ROOT / "main.py"), *map(str, args)],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_outputs_on_a_read_only_mount_are_one_line_errors(tmp_path):
    fixture = ROOT / "tests" / "fixtures" / "official" / "resnet_2blocks_ngf8.zip.pth"
    run_cli("convert", "--pth", fixture, "--output", tmp_path / "g.h5", cwd=tmp_path)
    write_images(tmp_path / "in", 1, size=32)
    tiny_data(tmp_path / "data")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    commands = [
        ("translate", "--generator", tmp_path / "g.h5", "--input", tmp_path / "in",
         "--output", read_only / "out"),
        ("convert", "--pth", fixture, "--output", read_only / "g.h5"),
        ("export", "--generator", tmp_path / "g.h5", "--format", "keras",
         "--output", read_only / "g.keras"),
        ("evaluate", "--generators", tmp_path / "g.h5", tmp_path / "g.h5", "--data",
         tmp_path / "data", "--image-size", 32, "--no-fid", "--results-dir", read_only),
    ]
    for args in commands:
        result = read_only_run(read_only, *args, cwd=tmp_path)
        assert result.returncode == 2, (args[0], result.stderr)
        errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
        assert len(errors) == 1 and errors[0].startswith("error: cannot write"), (args[0], errors)
    assert list(read_only.iterdir()) == []


def test_a_failed_write_of_any_library_names_its_cause_and_bugs_pass(tmp_path):
    from fileio import cannot_write, writing
    full = RuntimeError("file write failed: errno = 28, error message = 'No space left on device'")
    assert "(the disk is full)" in str(cannot_write(tmp_path / "g.h5", full))  # h5py's words
    assert "read-only" in str(cannot_write(tmp_path / "g.h5", OSError(30, "Read-only file system")))
    with pytest.raises(UserError, match="name is too long"):
        with writing(tmp_path):
            (tmp_path / ("x" * 300)).write_text("")
    if fileio.free_bytes(tmp_path) > fileio.NEARLY_FULL_BYTES:  # a bug on a roomy disk is a bug
        with pytest.raises(TypeError):
            with atomic_write(tmp_path / "page.html"):
                raise TypeError("a bug")


def on_full_disk(folder, script, size):
    """Run the shell `script` with $DISK a tmpfs of `size` bytes, in a private mount namespace
    of its own ($PY main.py: the CLI); returns the result and a copy of what $DISK held."""
    disk, copy = folder / "disk", folder / "disk_after"
    disk.mkdir(parents=True)
    copy.mkdir()
    mount = 'mount -t tmpfs -o size="$SIZE" tmpfs "$DISK" && '
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--mount", "sh", "-c", mount + "true"], capture_output=True,
            env={**ENV, "DISK": str(disk), "SIZE": "1m"}).returncode != 0:
        pytest.skip("no private tmpfs mounts on this machine")
    env = {**ENV, "DISK": str(disk), "SIZE": str(size), "COPY": str(copy),
           "PY": f"{sys.executable} {ROOT / 'main.py'}"}
    result = subprocess.run(["unshare", "--mount", "sh", "-c",
                             mount + f'({script}); code=$?; cp -a "$DISK"/. "$COPY"; exit $code'],
                            env=env, capture_output=True, text=True, timeout=900)
    return result, copy


def assert_one_line_error(result, words):
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write"), errors
    assert words in errors[0], errors


@pytest.mark.slow
def test_convert_and_export_onto_a_nearly_full_disk_are_one_line_and_keep_earlier_files(tmp_path):
    """h5py's failed writes once crashed the process at exit (rc 139); TensorFlow's SavedModel
    writer raises its own ResourceExhaustedError."""
    fixture = ROOT / "tests" / "fixtures" / "official" / "resnet_2blocks_ngf8.zip.pth"
    script = (f'$PY convert --pth {fixture} --output "$DISK/first.h5" >/dev/null || exit 9; '
              f'$PY convert --pth {fixture} --output "$DISK/second.h5" || exit $?; exit 0')
    # One 300 KB .h5 fits, not two.
    converted, copy = on_full_disk(tmp_path / "convert", script, 400_000)
    assert_one_line_error(converted, "second.h5 (the disk is full")
    assert sorted(p.name for p in copy.iterdir()) == ["first.h5"]  # no temporary file left
    h5 = tmp_path / "g.h5"
    shutil.copy(copy / "first.h5", h5)
    run_cli("export", "--generator", h5, "--format", "keras", "--output", tmp_path / "g.keras",
            cwd=tmp_path)  # the earlier .h5 is whole
    script = (f'echo mine > "$DISK/notes.txt"; '
              f'$PY export --generator {h5} --format saved_model --output "$DISK/served"')
    exported, copy = on_full_disk(tmp_path / "export", script, 100_000)
    assert_one_line_error(exported, "served (the disk is full")
    assert [p.name for p in copy.iterdir()] == ["notes.txt"]
    assert (copy / "notes.txt").read_text() == "mine\n"


@pytest.mark.slow
def test_a_full_disk_at_an_epochs_h5_saves_is_one_line_and_keeps_the_earlier_models(tmp_path):
    """Epoch 1 writes its models; the disk is then made too small for epoch 2's."""
    tiny_data(tmp_path / "data")
    run = (f'$PY --data {tmp_path / "data"} --image-size 32 --filters 16 --disc-filters 8 '
           f'--res-blocks 1 --name run --results-dir "$DISK" --log-dir {tmp_path / "logs"}')
    script = (f'{run} --epochs 1 >/dev/null || exit 9; cp -a "$DISK/run/models" {tmp_path}/; '
              # room for epoch 2's sample grid and half a generator: its .h5 cannot be written
              'grid=$(stat -c %s "$DISK/run/samples/epoch_0001.png"); '
              'h5=$(stat -c %s "$DISK/run/models/generatorAToB.h5"); '
              'used=$(df -B1 --output=used "$DISK" | tail -1); '
              'mount -o remount,size=$((used + grid + h5 / 2)) "$DISK" || exit 8; '
              f'{run} --epochs 2 --resume')
    result, copy = on_full_disk(tmp_path / "train", script, 64 * 2 ** 20)
    assert_one_line_error(result, "generatorAToB.h5 (the disk is full")
    assert "Traceback" not in result.stderr
    assert not [p for p in copy.rglob("*") if ".tmp" in p.name]
    for model in (tmp_path / "models").iterdir():
        assert (copy / "run" / "models" / model.name).read_bytes() == model.read_bytes()
    assert (copy / "run" / "samples" / "epoch_0002.png").is_file()  # what came before it is kept


@pytest.mark.slow
def test_a_full_disk_under_the_log_folder_is_not_called_out_of_memory(tmp_path):
    """TensorFlow's event writer raises ResourceExhaustedError, as running out of memory does."""
    tiny_data(tmp_path / "data")
    script = (f'$PY --data {tmp_path / "data"} --image-size 32 --filters 8 --disc-filters 8 '
              f'--res-blocks 1 --epochs 1 --results-dir {tmp_path / "results"} --log-dir "$DISK"')
    result, _ = on_full_disk(tmp_path / "logs", script, 16_384)
    assert_one_line_error(result, "(the disk is full)")
    assert "out of memory" not in result.stderr
