import json

import keras
import numpy as np
import pytest

import benchmark
import cyclegan
import machine
from config import make_config
from conftest import run_cli

FIGURES = ("seconds_per_iteration", "seconds_per_iteration_min", "seconds_per_iteration_max",
           "iterations_per_s", "images_per_s", "gflop_per_iteration", "achieved_gflop_s",
           "machine_gflop_s", "utilization", "pipeline_images_per_s",
           "pipeline_headroom", "peak_rss_mb", "fakes_s", "discriminator_updates_s",
           "adversarial_update_s")
PARTS = ("fakes_s", "discriminator_updates_s", "adversarial_update_s")


def test_conv_flops_are_counted_from_kernel_sizes_and_output_shapes():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)              # 2*16*16*8 * 3*3*3
    x = keras.layers.Conv2D(4, 4, strides=2, padding="same")(x)        # 2*8*8*4 * 4*4*8
    x = keras.layers.Conv2DTranspose(5, 3, strides=2, padding="same")(x)  # 2*8*8*4 * 3*3*5
    model = keras.Model(inputs, x)
    expected = 2 * (16 * 16 * 8 * 27 + 8 * 8 * 4 * 128 + 8 * 8 * 4 * 45)
    assert benchmark.conv_gflop(model, 2, 16) == pytest.approx(2 * expected / 1e9)


def test_iteration_counts_eighteen_generator_and_sixteen_discriminator_passes():
    cfg = make_config(image_size=32, filters=8)
    gan = cyclegan.CycleGAN(cfg)
    g = benchmark.conv_gflop(gan.g_ab, 1, 32)
    d = benchmark.conv_gflop(gan.d_a, 1, 32)
    assert g > 0 and d > 0
    assert benchmark.iteration_gflop(gan, cfg) == pytest.approx(18 * g + 16 * d)  # fakes: no pass


@pytest.mark.slow
def test_benchmark_command_prints_every_figure(tmp_path):
    result = run_cli("benchmark", "--image-size", 32, "--filters", 8, "--steps", 2,
                     "--pipeline-images", 8, "--json", cwd=tmp_path)
    figures = json.loads(result.stdout)
    for name in FIGURES:
        assert np.isfinite(figures[name]) and figures[name] > 0, name
    assert figures["utilization"] == pytest.approx(
        figures["achieved_gflop_s"] / figures["machine_gflop_s"])
    assert figures["pipeline_headroom"] == pytest.approx(
        figures["pipeline_images_per_s"] / figures["images_per_s"])
    assert figures["seconds_per_iteration_min"] <= figures["seconds_per_iteration"] \
        <= figures["seconds_per_iteration_max"]
    # The parts are timed inside the same steps: they and the rest add up to the mean step.
    assert figures["other_s"] >= 0
    assert sum(figures[p] for p in PARTS) + figures["other_s"] == pytest.approx(
        figures["seconds_per_iteration_mean"])
    assert figures["other_s"] < 0.2 * figures["seconds_per_iteration_mean"]
    assert 0 < figures["utilization"] < 1
    assert list(tmp_path.iterdir()) == []  # the generated image files are cleaned up
    plain = benchmark.format_figures({"a": 1.23456, "b": "CPU"})
    assert plain == "a: 1.235\nb: CPU"


def test_matmul_yardstick_is_the_best_of_several_sizes_in_the_runs_precision(monkeypatch):
    assert benchmark.matmul_gflop_s(64, "bfloat16", seconds=0.01) > 0  # the real measurement runs
    rates = {512: 100.0, 1024: 300.0, 2048: 200.0}
    asked = []
    monkeypatch.setattr(benchmark, "matmul_gflop_s",
                        lambda n, dtype: asked.append((n, dtype)) or rates[n])
    assert benchmark.machine_gflop_s("bfloat16") == 300.0
    assert asked == [(n, "bfloat16") for n in benchmark.MATMUL_SIZES]


@pytest.mark.slow
def test_compare_times_float32_and_auto_and_prints_their_ratio(tmp_path):
    result = run_cli("benchmark", "--compare", "--image-size", 32, "--filters", 8, "--steps", 2,
                     "--json", cwd=tmp_path)
    figures = json.loads(result.stdout)
    assert figures["float32"]["precision"] == "float32"
    assert figures["auto"]["precision"] == figures["auto_precision"] == \
        machine.choose_precision("auto")[0]
    assert figures["speedup_auto_vs_float32"] == pytest.approx(
        figures["float32"]["seconds_per_iteration"] / figures["auto"]["seconds_per_iteration"])
    for run in ("float32", "auto"):
        assert 0 < figures[run]["utilization"] < 1
    assert benchmark.format_figures({"g": {"a": 1.0}, "r": 2.0}) == "g.a: 1\nr: 2"
