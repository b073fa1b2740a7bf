"""Shared fixtures and helpers: the project on sys.path, small image datasets made on the
spot, running the CLI, reading what a run wrote (TensorBoard events, the results page)."""
import contextlib
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# Modules that each spend minutes in training subprocesses, slowest first.
SLOW_MODULES = ("test_resume.py", "test_distribute.py", "test_cli.py", "test_notebook.py")
# Module fixtures that train a run first (about a minute): every test using one is slow.
SLOW_FIXTURES = ("trained_run", "cut_run", "float32_run")


def pytest_configure(config):
    # `-m "not slow"`: the quick subset, a few minutes (README).
    config.addinivalue_line("markers", "slow: trains in real processes or for many steps")
    # Keras's own numpy-2 deprecation notice, raised inside keras, hundreds of times.
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation:DeprecationWarning")
    # Under pytest-xdist --dist loadfile, hand out modules in collection order
    # (slowest first, below) rather than by test count, which would leave the
    # two slowest modules, with two tests each, for last.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    for item in items:
        if set(SLOW_FIXTURES) & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    slow_first = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: slow_first.get(item.path.name, len(SLOW_MODULES)))


def write_images(folder, count, size=40, seed=0, colour=None):
    """`count` random PNGs of size x size in `folder`; returns their paths."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if colour is not None:
            pixels[:] = colour
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def tiny_dataset(tmp_path):
    """trainA/trainB/testA/testB with a handful of 40x40 images each."""
    root = tmp_path / "tiny"
    for i, (sub, count) in enumerate((("trainA", 5), ("trainB", 3), ("testA", 2), ("testB", 2))):
        write_images(root / sub, count, seed=i)
    return root


def tiny_data(folder):
    """A minimal dataset: 4 A, 3 B, one test image each, 40 px."""
    for i, (sub, count) in enumerate((("trainA", 4), ("trainB", 3), ("testA", 1), ("testB", 1))):
        write_images(folder / sub, count, size=40, seed=i)


def within(seconds, function, *args):
    """function(*args), run in a thread: a call that does not return in `seconds` (a hang)
    fails the test instead of holding it forever."""
    import threading
    outcome = {}

    def call():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # handed to the test below
            outcome["error"] = error
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} did not return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --- Running the command line -----------------------------------------------

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def run_cli(*args, cwd, check=True):
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)],
                            cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def one_line_error(args, capsys, code=2):
    """Run main.main in this process; returns its stderr after checking it is one error line."""
    import main
    assert main.main([str(a) for a in args]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err


# --- Reading what a run wrote ------------------------------------------------

def read_tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return events


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [v for k, v in attrs if k in ("href", "src")]


def page_links(page):
    """Every href/src of the page, each checked to be a relative link to an existing file."""
    parser = Links()
    parser.feed(page.read_text())
    for target in parser.targets:
        assert not urlparse(target).scheme and not target.startswith("/"), target
        assert (page.parent / unquote(target)).is_file(), target
    return parser.targets


@contextlib.contextmanager
def loopback_server(handler):
    """A threaded HTTP server on 127.0.0.1 answering with `handler`; yields its base address."""
    import http.server
    import threading
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def serve_folder(folder):
    """An HTTP server on 127.0.0.1 serving `folder`; yields (base address, paths requested)."""
    import http.server
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            requests.append(self.path)

    with loopback_server(Handler) as address:
        yield address, requests


@contextlib.contextmanager
def serve_endless(pause=0.0, announce=None):
    """An HTTP server on 127.0.0.1 whose answers never end: a byte every `pause` seconds (a
    trickle) or zeros as fast as they go; `announce` is the Content-Length it claims.
    Yields its base address and the paths requested."""
    import http.server
    import threading
    import time
    requests, stop = [], threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            if announce:
                self.send_header("Content-Length", str(announce))
            self.end_headers()
            try:
                while not stop.is_set():
                    self.wfile.write(b"\0" if pause else bytes(2 ** 16))
                    self.wfile.flush()
                    time.sleep(pause)
            except OSError:  # the client gave up
                pass

        def log_message(self, *args):
            pass

    with loopback_server(Handler) as address:
        try:
            yield address, requests
        finally:
            stop.set()  # before the server closes: it waits for its answers to end
