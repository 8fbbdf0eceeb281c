"""Shared fixtures: the built-in tiny model (built once per test session into a private cache) and a
small adapter trained by the real finetune.py, for the stages that load one."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
SAMPLE_SFT = ROOT / "data" / "sft"
# The base model every test names explicitly: the stages default to builtin:smollm2-135m-instruct, a real
# 135M model that is far too slow for the suite; this 1.5M-parameter random toy exercises the same code.
TINY = "builtin:tiny-llama"

# Every test, and every script a test starts, uses one private cache for the built-in models: one per test run,
# shared by the run's pytest-xdist workers (the SmolLM2 conversion then happens once; builds are atomic).
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ.setdefault("MEDLORA_CACHE", str(Path(tempfile.gettempdir()) / f"medlora-test-cache-{_RUN_ID}") if _RUN_ID
                      else tempfile.mkdtemp(prefix="medlora-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_dataset(relative: str) -> Path:
    """A file of ../shared/datasets, or a skip saying why (a user's clone has no shared folder)."""
    path = SHARED_DATASETS / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: the real seed-project datasets live beside the repo only on dev and CI machines")
    return path


def stage_function(script: str):
    """The command function of a top-level script (finetune -> finetune.train), loaded from its file: a plain
    `import evaluate` may find Hugging Face's evaluate library, which lm-eval's tests import first."""
    import importlib.util

    name = f"medlora_script_{script}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    module = sys.modules[name]
    return next(getattr(module, attribute) for attribute in ("train", "pretrain", "main") if hasattr(module, attribute))


def sigint_as_a_terminal_sends_it():
    """preexec_fn for a child that must see Ctrl-C: a shell starts background jobs (a CI runner's, `cmd &`) with
    SIGINT ignored, and children inherit that, so Python would never raise KeyboardInterrupt in them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(*args, check=True, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """Run a top-level script of the project (e.g. run_script("finetune.py", "--max_steps", "2"))."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_script(*flags, env=None):
    """(process, base URL of its API) of `python serve.py` started on a free port and answering /health."""
    import time

    import httpx

    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--log_level", "warning", *map(str, flags)],
                               cwd=ROOT, env=dict(os.environ, **(env or {})), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while True:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, "serve.py did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            time.sleep(0.5)


def stop(process):
    """Stop a server started by serve_script (SIGTERM) and return its output, which must hold no traceback."""
    process.terminate()
    output = process.communicate(timeout=60)[0]
    assert "Traceback" not in output, output[-3000:]
    return output


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from medlora.models.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from medlora.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_path))


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model_path) -> Path:
    """An adapter trained for a few steps by the real finetune.py on the bundled data (alpaca template)."""
    output_dir = tmp_path_factory.mktemp("adapter") / "lora"
    run_script("finetune.py", "--base_model", TINY, "--output_dir", output_dir, "--max_steps", 6, "--batch_size", 8,
               "--micro_batch_size", 4, "--val_set_size", 0, "--warmup_steps", 0, "--learning_rate", 1e-2,
               "--lora_target_modules", "all-linear", "--cutoff_len", 128, "--save_steps", 1000)
    return output_dir


# Fixtures that run a training stage or start a browser; a test that uses one (directly or through another
# fixture) is slow, whatever its own body does. `pytest -m "not slow"` then keeps the quick unit tests only.
SLOW_FIXTURES = {"tiny_adapter", "quick_run", "trained", "pt_adapter", "reward_model", "rl_policy", "demo", "browser"}


# The longest files start first (scripts/test.sh keeps this order with --no-loadscope-reorder): scheduled last,
# the real-model demo alone kept one worker busy for its last 8 minutes while the other sat idle.
LONGEST_FIRST = ("tests/test_real_model.py", "tests/test_stages.py", "tests/test_documented_commands.py")


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    rank = {path: index for index, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: the rest keep order
