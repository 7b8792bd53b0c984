import os
import subprocess
import sys

from tests.backend_utils import end_to_end_once, same_without_native_kernel

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def quick_run(script, repeats):
    """The script's stdout in `--quick` mode (a smoke test: it runs end to
    end; its timings are not checked)."""
    return subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), "--quick", "--repeats",
         str(repeats)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout  # fmt: skip


def test_benchmark_runs_and_prints_its_tables():
    out = quick_run("sparse_dense.py", 1)
    assert out.startswith("# SparseDense benchmark")
    assert "\nCPU: " in out  # model and vector flags, for comparing machines
    assert "| 64x32 (dense) | 1 | 1 |" in out  # computes dense above the crossover
    assert "| 64x32 (dense) | 0.01 | 32 |" in out  # and below 100k weights
    assert "## Whole model" in out and "one compiled call on all images" in out
    # Where the kernel is built: its plan, and both loads timed next to scipy.
    from keras_prune.inference import native

    assert ("## Small batches: the native kernel's loads" in out) == native.available()
    if native.available():
        assert f"native kernel: yes, {native.plan().loads} loads" in out
        assert "| 64x32 | 0.01 | 1 |" in out


@end_to_end_once
def test_deploy_benchmark_runs_and_prints_every_format():
    out = quick_run("deploy.py", 2)
    assert out.startswith("# Deployment benchmark")
    assert "### fc1 keeps 0.23%, 1x4 blocks" in out
    formats = [
        ".keras (export_sparse)",
        'SavedModel (compute="tensorflow")',
        ".tflite float |",
        ".tflite int8 |",
        ".tflite float16 | refused",
    ]
    assert all(name in out for name in formats), out


@same_without_native_kernel
def test_structured_benchmark_prints_both_fractions_for_mobilenetv2():
    out = quick_run("structured.py", 1)
    assert out.startswith("# Structured pruning benchmark")
    for fraction in ("25%", "50%"):
        for batch in (1, 32):
            assert f"| MobileNetV2 96x96 | {fraction} |" in out
            assert f" | {batch} | " in out
    assert "| seed network 28x28 | 50% |" in out
