"""PyTorch `.pth` state dicts read without PyTorch, in work and memory bounded by the file.

`read_pth` takes the zip format of PyTorch >= 1.6 and the older legacy
format, through an unpickler that builds nothing but ordered dicts and
arrays, after a scan of the pickle's opcodes (nesting depth, memo); every
tensor's bytes are checked against what the file holds before they are
inflated or copied.
"""
import collections
import io
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import numpy as np

from config import UserError

# torch.save's legacy (pre-1.6) stream starts with these two pickled numbers.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?",
}
# Buffers that InstanceNorm layers carried before PyTorch 0.4; the official loader drops them.
STALE_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
CLAIMS_TOO_MUCH = "its tensors claim more bytes than the file has: the file is damaged"
# A state dict's objects nest about 6 deep (dict, tensor, its arguments, their tuples).
MAX_PICKLE_DEPTH = 200
MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")
MEMO_GETS = ("GET", "BINGET", "LONG_BINGET")
# Opcodes that put their other operands into the object beneath them, which stays.
FILLS = ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD")


class CheckpointError(UserError):
    """A .pth file that is not what was expected; one-line message."""


def rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor(_v2) as an array view, checked to stay inside its storage."""
    size, stride = tuple(size), tuple(stride)
    if (not isinstance(storage, np.ndarray) or storage.ndim != 1 or not storage.flags.c_contiguous
            or len(size) != len(stride) or min(size + stride + (offset,)) < 0):
        raise CheckpointError("a tensor in the file is malformed")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
        raise CheckpointError("a tensor reaches past the end of its data: the file is damaged")
    return np.lib.stride_tricks.as_strided(storage[offset:], size,
                                           [s * storage.itemsize for s in stride])


def text(value):
    """Python 2 pickles hold some names as bytes."""
    return value.decode("ascii") if isinstance(value, bytes) else value


class StateDictUnpickler(pickle.Unpickler):
    """Builds only ordered dicts and tensors (as NumPy arrays); refuses every other global.

    A pickle can call any importable function; this one can call only the
    two functions below, so a hostile file cannot run code. Its tensors
    together may claim no more bytes than the file holds: a stride of 0 lets
    a few bytes of data claim gigabytes, which read_pth would copy out.
    """

    def __init__(self, file, storage, file_bytes):
        super().__init__(file, encoding="utf-8")
        self.storage = storage  # (dtype, key, numel, view) -> 1-D array
        self.unclaimed = file_bytes

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return self.rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise CheckpointError(f"refusing {module}.{name}: a state dict holds only tensors, "
                              "and this file asks to run other code")

    def rebuild_tensor(self, *args):
        tensor = rebuild_tensor(*args)
        self.unclaimed -= tensor.nbytes  # of its shape, whatever its strides
        if self.unclaimed < 0:
            raise CheckpointError(CLAIMS_TOO_MUCH)
        return tensor

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or text(pid[0]) != "storage" \
                or pid[1] not in STORAGE_DTYPES.values():
            raise CheckpointError("the file refers to data of an unknown kind")
        dtype, key, numel = np.dtype(pid[1]), text(pid[2]), pid[4]
        return self.storage(dtype, key, numel, pid[5] if len(pid) > 5 else None)


def check_pickle(file):
    """Refuse, before the C unpickler builds anything, a pickle whose objects nest deeper than
    MAX_PICKLE_DEPTH or whose memo indexes reach past its own length; `file` is left where it was.

    Nesting costs the unpickler nothing, but hashing a dict key that is a
    tuple nested 200,000 deep overflows the C stack (a segfault); a memo
    index makes the unpickler allocate a table that long. The scan replays
    the opcodes on a stack of nesting depths. A list or dict filled after it
    was memoised keeps its memoised depth there; no code here recurses
    through those, and tuples, which hashing recurses through, are built whole.
    """
    start = file.tell()
    stack, marks, memo = [], [], {}
    for count, (op, arg, _) in enumerate(pickletools.genops(file)):
        if op.name in MEMO_PUTS:
            index = len(memo) if op.name == "MEMOIZE" else arg
            if index > count:
                raise CheckpointError(f"its pickle has a memo index ({index}) past its length")
            memo[index] = stack[-1]
        elif op.name in MEMO_GETS:
            stack.append(memo[arg])
        elif op.name == "MARK":
            marks.append(len(stack))
        elif op.name == "DUP":
            stack.append(stack[-1])
        elif op.name == "POP" and marks and marks[-1] == len(stack):
            marks.pop()  # POP drops the topmost mark where nothing lies above it
        else:
            taken = []
            below = len(op.stack_before)  # operands beneath a mark, or all of them
            if pickletools.markobject in op.stack_before:
                below = op.stack_before.index(pickletools.markobject)
                taken = stack[marks[-1]:]
                del stack[marks.pop():]
            if len(stack) < below:
                raise pickle.UnpicklingError("its pickle takes more than its stack holds")
            if below:
                taken = stack[-below:] + taken
                del stack[-below:]
            if op.stack_after:
                depth = (max([taken[0]] + [d + 1 for d in taken[1:]]) if op.name in FILLS
                         else max(taken, default=0) + 1)
                if depth > MAX_PICKLE_DEPTH:
                    raise CheckpointError(f"its pickle nests objects more than {MAX_PICKLE_DEPTH} "
                                          "deep, which no state dict does")
                stack.append(depth)
    file.seek(start)


def unpickle(file, storage=None, file_bytes=0):
    def no_storage(*_):
        raise CheckpointError("unexpected tensor data in the file's header")
    check_pickle(file)
    return StateDictUnpickler(file, storage or no_storage, file_bytes).load()


def read_zip(path):
    """The state dict of PyTorch >= 1.6: data.pkl plus one data/KEY entry per storage.

    torch.save stores its entries uncompressed, so together they hold no more
    bytes than the file: the sizes the zip's directory declares are checked
    against that before anything is inflated, and an entry is inflated no
    further than its declared size (a stream that goes on fails its CRC).
    """
    file_bytes = budget = Path(path).stat().st_size
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError("a zip file without exactly one data.pkl is no PyTorch checkpoint")
        prefix = pickles[0][:-len("data.pkl")]
        storages = {}

        def inflated(entry):
            nonlocal budget
            budget -= entry.file_size
            if budget < 0:
                raise CheckpointError(CLAIMS_TOO_MUCH)
            with archive.open(entry) as stream:  # read(n) inflates at most n bytes; read() all
                raw = stream.read(entry.file_size)
            if len(raw) != entry.file_size:
                raise CheckpointError(f"{entry.filename} is cut short: the file is damaged")
            return raw

        def storage(dtype, key, numel, _):
            if key not in storages:
                try:
                    entry = archive.getinfo(f"{prefix}data/{key}")
                except KeyError:
                    raise CheckpointError(f"tensor data {key} is missing from the file") from None
                if entry.file_size != numel * dtype.itemsize:  # checked before unpacking anything
                    raise CheckpointError(f"tensor data {key} has the wrong size: the file is damaged")
                storages[key] = np.frombuffer(inflated(entry), dtype)
            return storages[key]

        state_pickle = io.BytesIO(inflated(archive.getinfo(pickles[0])))
        return unpickle(state_pickle, storage, file_bytes)


def read_legacy(file, file_size):
    """The legacy stream: magic, version, system info, the state dict, storage keys, raw storages."""
    if unpickle(file) != LEGACY_MAGIC or unpickle(file) != LEGACY_PROTOCOL:
        raise CheckpointError("not a PyTorch checkpoint (no torch.save header)")
    if not unpickle(file).get("little_endian", True):
        raise CheckpointError("big-endian checkpoints are not supported")
    roots, views = {}, {}

    def storage(dtype, key, numel, view):
        # The data follows the pickle: hand out arrays now, fill them below.
        if key not in roots:
            if sum(a.nbytes for a in roots.values()) + numel * dtype.itemsize > file_size:
                raise CheckpointError(CLAIMS_TOO_MUCH)
            roots[key] = np.zeros(numel, dtype)
        if view is None:
            return roots[key]
        view_key, offset, count = text(view[0]), view[1], view[2]
        return views.setdefault(view_key, roots[key][offset:offset + count])

    state = unpickle(file, storage, file_size)
    for key in unpickle(file):
        array = roots.get(text(key))
        if array is None:
            raise CheckpointError(f"the file lists tensor data {key} that nothing uses")
        (numel,) = struct.unpack("<q", file.read(8))
        raw = file.read(array.nbytes)
        if numel != array.size or len(raw) != array.nbytes:
            raise CheckpointError("tensor data is cut short or mislabelled: the file is damaged")
        array[:] = np.frombuffer(raw, array.dtype)
    return state


def read_pth(path):
    """{name: float32 array} from a PyTorch state dict file, without PyTorch."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        if zipfile.is_zipfile(path):
            state = read_zip(path)
        else:
            with open(path, "rb") as file:
                state = read_legacy(file, path.stat().st_size)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, struct.error, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint, or is truncated "
                              f"({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {str(k): np.array(v, np.float32) for k, v in state.items()
            if not str(k).endswith(STALE_NORM_BUFFERS)}
