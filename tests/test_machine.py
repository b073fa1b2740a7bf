"""The machine's choices: precision from the hardware; TF_CONFIG and how long to wait, checked."""
import pytest

import machine
from config import UserError
from conftest import one_line_error


def test_auto_precision_is_bfloat16_only_where_the_device_computes_it_natively(monkeypatch):
    monkeypatch.setattr(machine, "native_bfloat16", lambda: None)
    assert machine.choose_precision("auto") == ("float32", "auto: no native bfloat16 on this device")
    monkeypatch.setattr(machine, "native_bfloat16", lambda: "CPU with avx512_bf16")
    assert machine.choose_precision("auto") == ("bfloat16", "auto: native bfloat16 (CPU with avx512_bf16)")
    for precision in ("float32", "bfloat16", "float16"):
        assert machine.choose_precision(precision) == (precision, "as asked")


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx2 avx512f", None),                      # bfloat16 would be emulated: slower
    ("fpu avx512f avx512_bf16", "CPU with avx512_bf16"),  # AMD Zen 4, Intel Cooper Lake
    ("fpu avx512_bf16 amx_bf16 amx_tile", "CPU with amx_bf16, avx512_bf16"),  # Sapphire Rapids
])
def test_cpu_flags_decide_native_bfloat16(monkeypatch, tmp_path, flags, expected):
    import tensorflow as tf
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert machine.native_bfloat16(cpuinfo) == expected


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_gpu_compute_capability_decides_native_bfloat16(monkeypatch, capability, native):
    import tensorflow as tf
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda device: {"compute_capability": capability})
    assert bool(machine.native_bfloat16()) == native


@pytest.mark.parametrize("tf_config, words", [
    ("{cluster: worker}", "TF_CONFIG is not JSON (Expecting property name"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 5}}',
     "TF_CONFIG's task is worker 5, which its cluster does not list (worker 0)"),
    ('{"cluster": {"worker": ["localhost:1"]}}', "TF_CONFIG must look like"),
    ('["localhost:1"]', "TF_CONFIG must look like"),
])
def test_a_tf_config_that_cannot_work_is_a_one_line_error(tmp_path, monkeypatch, capsys, tf_config,
                                                          words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TF_CONFIG", tf_config)
    assert words in one_line_error(["--strategy", "multiworker"], capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf"])
def test_a_timeout_that_is_no_number_of_seconds_is_a_one_line_error(monkeypatch, value):
    monkeypatch.setenv(machine.TIMEOUT_VARIABLE, value)
    with pytest.raises(UserError, match="CYCLEGAN_TIMEOUT must be a number of seconds above 0"):
        machine.wait_timeout()
