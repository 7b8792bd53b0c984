import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sparse_dense.py")


def test_benchmark_runs_and_prints_its_tables():
    """A smoke test: the script runs end to end; its timings are not checked."""
    result = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    out = result.stdout
    assert out.startswith("# SparseDense benchmark")
    assert "\nCPU: " in out  # model and vector flags, for comparing machines
    assert "| 64x32 (dense) | 1 | 1 |" in out  # computes dense above the crossover
    assert "| 64x32 (dense) | 0.01 | 32 |" in out  # and below 100k weights
    assert "## Whole model" in out and "one compiled call on all images" in out


DEPLOY = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "deploy.py")


def test_deploy_benchmark_runs_and_prints_every_format():
    """A smoke test: the script runs end to end; its timings are not checked."""
    result = subprocess.run(
        [sys.executable, DEPLOY, "--quick", "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    out = result.stdout
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
