"""scripts/gpu_check.sh without a GPU: its dry run (what CI runs so that the script does not rot while no GPU is lent),
the report it writes on the GPU machine, `--record`, and gpu_wheels.sh's preparation of bitsandbytes."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from tests.conftest import ROOT

STEPS = ["stash", "install", "preflight", "convert", "tests", "benchmark", "report"]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("medlora_gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_check_sh(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHON=sys.executable))


def test_dry_run_lists_every_step_and_passes():
    result = gpu_check_sh("--dry_run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    listed = [line.split()[0] for line in result.stdout.splitlines() if " (at most " in line and line.startswith("  ")]
    assert listed == STEPS
    assert 'Device call K < N: command "bash scripts/gpu_check.sh", carry [".gpu/callK"]' in result.stdout
    assert 'Device call N: command "bash scripts/gpu_check.sh", carry [".gpu/callN"]' in result.stdout
    assert "tests/test_gpu.py::test_benchmark_gpu_shape_against_alpaca_lora_and_trl" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "dry run: every file, pin and test checked"


def test_wheel_pins_must_agree_with_the_requirements():
    gpu_check = gpu_check_module()
    pins = gpu_check.wheel_pins("# comment\ntransformers==5.17.0 the image's\nSafeTensors==0.8.0 why\ndill==0.4.1 why\n")
    requirements = ["transformers==5.23.0", "safetensors>=0.6", "-r requirements.txt", "# a comment", ""]
    assert gpu_check.pin_problems(pins, requirements) == [
        "gpu_wheels.txt pins transformers==5.17.0 but requirements say transformers==5.23.0"]
    with pytest.raises(SystemExit, match="gpu_wheels.txt:1: write NAME==VERSION and why it travels"):
        gpu_check.wheel_pins("transformers>=5\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the GPU tests would run")
def test_gpu_tests_are_skipped_with_their_reason_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-rs", "-q",
                             "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    reasons = re.findall(r"^SKIPPED \[(\d+)\] tests/test_gpu.py:\d+: (.*)$", result.stdout, re.M)
    assert reasons and {reason for _, reason in reasons} == {
        "needs a CUDA GPU: torch.cuda.is_available() is False here (scripts/gpu_check.sh runs these on one)"}
    skipped = sum(int(count) for count, _ in reasons)
    assert result.stdout.strip().splitlines()[-1].startswith(f"{skipped} skipped in ")  # every test, none run


def test_report_holds_the_device_the_steps_and_every_test(tmp_path):
    """The report reads what the GPU run leaves: versions.json (preflight), steps.tsv, pytest's JUnit files (made here
    by a real pytest run) and the benchmark's marked section."""
    tests = tmp_path / "test_example.py"
    tests.write_text("import pytest\n\ndef test_good(record_property):\n    record_property('difference', 0.00123456)\n\n"
                     "def test_bad():\n    assert 1 == 2, 'one is not two'\n\n"
                     "@pytest.mark.skip(reason='no bitsandbytes')\ndef test_skipped():\n    pass\n")
    subprocess.run([sys.executable, "-m", "pytest", str(tests), "-p", "no:cacheprovider", "-q",
                    f"--junitxml={tmp_path / 'gpu-tests.xml'}"], cwd=tmp_path, capture_output=True, timeout=120)
    (tmp_path / "versions.json").write_text(json.dumps({
        "date": "2026-12-07 10:00 UTC", "python": "3.12.3", "device": "NVIDIA H100 80GB HBM3, 81559 MiB, CUDA 13.0",
        "versions": {"torch": "2.11.0+cu130", "transformers": "5.23.0"}, "import_errors": {}, "cuda": True,
        "bitsandbytes": "quantizes on the GPU", "commit": "abc1234"}))
    (tmp_path / "steps.tsv").write_text("convert\tpassed\t21\ntests\tfailed (exit 1)\t95\nbenchmark\ttimed out after 200s\t200\n")
    (tmp_path / "benchmark-cuda.md").write_text("# Benchmarks\n\n<!-- benchmark:cuda:begin -->\n| table |\n"
                                                "<!-- benchmark:cuda:end -->\n")
    subprocess.run([sys.executable, "scripts/gpu_check.py", "report", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("<!-- benchmark:gpu-check:begin -->\nGPU check of 2026-12-07 10:00 UTC on NVIDIA H100 80GB "
                             "HBM3, 81559 MiB, CUDA 13.0; Python 3.12.3; torch 2.11.0+cu130, transformers 5.23.0; ")
    for row in ("| tests | failed (exit 1) | 95 |", "| benchmark | timed out after 200s | 200 |",
                "| test_good | passed |", "| difference=0.00123 |", "| test_bad | failure: AssertionError: one is not two",
                "| test_skipped | skipped: no bitsandbytes |"):
        assert row in report, row
    assert report.endswith("<!-- benchmark:gpu-check:end -->\n<!-- benchmark:cuda:begin -->\n| table |\n"
                           "<!-- benchmark:cuda:end -->\n")


def test_record_puts_each_section_into_its_place(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# B\n\n<!-- benchmark:gpu-check:begin -->\n(not run yet)\n<!-- benchmark:gpu-check:end -->\n\nBetween.\n\n"
                   "<!-- benchmark:cuda:begin -->\n(not measured yet)\n<!-- benchmark:cuda:end -->\nAfter.\n")
    results = tmp_path / "gpu_check.md"
    results.write_text("<!-- benchmark:gpu-check:begin -->\nGPU check of today\n| step |\n<!-- benchmark:gpu-check:end -->\n"
                       "<!-- benchmark:cuda:begin -->\n| bench |\n<!-- benchmark:cuda:end -->\n")
    result = gpu_check_sh("--record", results, doc)
    assert result.returncode == 0, result.stderr
    assert doc.read_text() == ("# B\n\n<!-- benchmark:gpu-check:begin -->\nGPU check of today\n| step |\n"
                               "<!-- benchmark:gpu-check:end -->\n\nBetween.\n\n<!-- benchmark:cuda:begin -->\n| bench |\n"
                               "<!-- benchmark:cuda:end -->\nAfter.\n")
    results.write_text("no sections\n")
    refused = gpu_check_sh("--record", results, doc)
    assert refused.returncode != 0 and "no marked section" in refused.stderr


def test_bitsandbytes_is_slimmed_to_the_images_cuda_library(tmp_path):
    gpu_check = gpu_check_module()
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda118.so",
             "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_rocm72.so"]
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in names:
            archive.writestr(name, b"x" * 100)
        archive.writestr("bitsandbytes-0.50.2.dist-info/METADATA", "Requires-Dist: torch<3,>=2.4\n"
                         "Requires-Dist: scipy; extra == 'test'\nRequires-Dist: pywin32; sys_platform == 'win32'\n"
                         "Requires-Dist: einops\n")
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(f"{name},sha256=x,100\n" for name in names))
    slim = tmp_path / "slim" / wheel.name
    slim.parent.mkdir()
    gpu_check.slim_wheel(wheel, slim, gpu_check.BNB_KEEP)
    with zipfile.ZipFile(slim) as archive:
        kept = [name for name in archive.namelist() if name.startswith("bitsandbytes/")]
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert kept == ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                    "bitsandbytes/libbitsandbytes_cuda130.so"]
    assert [line.split(",")[0] for line in record.splitlines()] == kept
    # torch is in the image; einops is neither carried nor there (extras and other platforms do not count)
    assert gpu_check.unmet_needs([slim], carried={"bitsandbytes"}) == ["einops (needed by bitsandbytes)"]
