"""Official CycleGAN datasets fetched from their hosts: bounded downloads, checked archives,
unpacked whole or not at all."""
import os
import shutil
import stat
import string
import time
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath


import config
import report
from fileio import waiting_lock


OFFICIAL_DATASETS = (
    "apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo",
    "cezanne2photo", "ukiyoe2photo", "vangogh2photo", "maps", "cityscapes",
    "facades", "iphone2dslr_flower", "ae_photos",
)


# Tried in order: the official script's current host, then the one it used until 2023.
DATASET_URLS = (
    "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets/{name}.zip",
    "https://people.eecs.berkeley.edu/~taesung_park/CycleGAN/datasets/{name}.zip",
)


# Space-separated URL templates ({name}) used instead, e.g. a mirror or a test server.
DATASET_URL_VARIABLE = "CYCLEGAN_DATASET_URL"


# Each official archive's size in MiB, as its host lists it; a download may be half as large again.
DATASET_MIB = {
    "apple2orange": 75, "summer2winter_yosemite": 127, "horse2zebra": 112, "monet2photo": 292,
    "cezanne2photo": 267, "ukiyoe2photo": 280, "vangogh2photo": 293, "maps": 1409,
    "cityscapes": 267, "facades": 34, "iphone2dslr_flower": 325, "ae_photos": 10,
}


SIZE_MARGIN = 1.5


DOWNLOAD_TIMEOUT_S = 15       # to connect, and for each read


# A download that brings less than MIN_RATE bytes a second over RATE_WINDOW_S is given up.
MIN_RATE = 10_000


RATE_WINDOW_S = 60


# Photos barely compress, so an archive that would grow 20-fold is not a dataset.
MAX_EXPANSION = 20


MAX_UNPACKED_BYTES = 16 * 2 ** 30


def dataset_urls(name):
    templates = os.environ.get(DATASET_URL_VARIABLE, "").split() or DATASET_URLS
    return [url_from_template(template, name, DATASET_URL_VARIABLE) for template in templates]


def url_from_template(template, name, variable):
    """`template` with {name} filled in; one that holds any other {field} is a UserError."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError:  # an unmatched brace
        fields = None
    if fields != {"name"}:
        raise config.UserError(f"{variable} must hold {{name}} and no other {{...}} field, got {template!r}")
    return template.format(name=name)


def download_official(name, datasets_dir):
    """Download, check and unzip an official CycleGAN dataset into datasets_dir/name.

    The archive is kept only once whole (an earlier partial or damaged one
    is fetched again) and is unpacked beside the target, then renamed into
    place, so a kill at any moment never leaves a half dataset.
    """
    root = Path(datasets_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Two runs asking for the same dataset: the second waits, then finds it in place.
    with waiting_lock(root / f".{name}.lock"):
        if (root / name).is_dir():
            return root / name
        return fetch_and_unpack(name, root)


def fetch_and_unpack(name, root):
    """The archive (kept, or downloaded again if damaged) unpacked into root/name."""
    archive = root / f"{name}.zip"
    urls = dataset_urls(name)
    if archive.exists():
        try:
            check_archive(archive, name)
        except config.DataError:
            archive.unlink()
    if not archive.exists():
        try:
            download(urls, archive, int(DATASET_MIB[name] * SIZE_MARGIN * 2 ** 20),
                     check=lambda path: check_archive(path, name))
        except config.DataError as error:
            raise config.DataError(f"could not download {name}.zip ({error}); fetch it by hand from "
                                   f"{' or '.join(urls)} and unzip it so that {root / name}/trainA "
                                   "and trainB exist") from None
    unpack_archive(archive, root, name)
    archive.unlink()
    return root / name


def download(urls, target, max_bytes, check=None):
    """Fetch the first of `urls` that gives a good file into `target`, whole or not at all.

    Each try writes to a hidden sibling and is renamed into place only after
    `check(path)` (which raises DataError for a bad file) passes; raises
    DataError naming every URL tried and why it failed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise config.DataError(f"cannot write to {target.parent}")
    part = target.with_name(f".{target.name}.part")
    reasons = []
    for url in urls:
        try:
            fetch(url, part, max_bytes)
            if check:
                check(part)
            os.replace(part, target)
            return target
        except Exception as error:  # every failure of one URL is a reason to try the next
            reasons.append(f"{url}: {config.one_line(error)}")
        finally:
            part.unlink(missing_ok=True)
    raise config.DataError("; ".join(reasons))


def fetch(url, path, max_bytes):
    """Stream `url` into the file `path`, at most `max_bytes`, at least MIN_RATE; raises on failure.

    Our own loop rather than keras.utils.get_file, which has neither bound:
    its socket timeout applies to each read, a server that trickles a byte
    at a time never trips it, and an endless body fills the disk. read1
    returns what each read brings, so the rate is checked as bytes come.
    """
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
            open(path, "wb") as out:
        announced = int(response.headers.get("Content-Length") or 0)
        if announced > max_bytes:
            raise config.DataError(f"it announces {announced} bytes, more than the {max_bytes} expected")
        progress = report.CountProgress(announced / 2 ** 20, "MiB")
        done, window_start, window_done = 0, time.monotonic(), 0
        while chunk := response.read1(2 ** 16):
            done += len(chunk)
            if done > max_bytes:
                raise config.DataError(f"it sends more than the {max_bytes} bytes expected")
            out.write(chunk)
            progress.add(len(chunk) / 2 ** 20)
            now = time.monotonic()
            if now - window_start >= RATE_WINDOW_S:
                if done - window_done < MIN_RATE * (now - window_start):
                    raise config.DataError(f"it sends less than {MIN_RATE} bytes a second")
                window_start, window_done = now, done
        progress.finish()


def check_archive(path, name):
    """Raise DataError unless `path` is a whole zip that unpacks only files under name/."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for info in infos:
                check_archive_entry(info, name)
            unpacked = sum(info.file_size for info in infos)
            if unpacked > min(MAX_UNPACKED_BYTES, MAX_EXPANSION * path.stat().st_size):
                raise config.DataError(f"{path.name} would unpack {path.stat().st_size} bytes into "
                                       f"{unpacked} bytes, more than a dataset can; not unpacked")
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as error:
        raise config.DataError(f"{path.name} is not a complete zip archive "
                               f"({config.one_line(error)})") from None
    if damaged:
        raise config.DataError(f"{path.name} is damaged: {damaged} fails its checksum")


def check_archive_entry(info, name):
    """Only plain files and folders below name/: no absolute path, no '..', no link."""
    parts = PurePosixPath(info.filename).parts
    inside = (len(parts) > 1 or info.is_dir()) and parts[:1] == (name,)
    if not inside or ".." in parts or "\\" in info.filename or info.filename.startswith("/"):
        raise config.DataError(f"the archive for {name} holds {info.filename!r}, outside {name}/; "
                               "not unpacked")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise config.DataError(f"the archive for {name} holds a link, {info.filename!r}; not unpacked")


def unpack_archive(archive, root, name):
    """Unzip a checked archive into a staging folder, then rename root/name into place."""
    staging = root / f".{name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)
        os.replace(staging / name, root / name)
    except OSError as error:
        raise config.DataError(f"could not unpack {archive} into {root} ({config.one_line(error)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
