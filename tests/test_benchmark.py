"""scripts/benchmark.py: the quick bench trains MedLoRA and the alpaca-lora pipeline in their own processes and
prints a table whose numbers are sane and comparable (no timing assertions: the machine is shared)."""

import importlib.util
import math
import re

import pytest
import torch

from tests.conftest import ROOT, run_script, shared_dataset

SCRIPT = ROOT / "scripts" / "benchmark.py"


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(output: str) -> dict:
    """{configuration: [cells]} from the printed training table."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("medlora", "alpaca_lora", "trl", "trl_padding_free"):
            rows.setdefault(cells[0], cells)  # the first table; the ratio table repeats peer names
    return rows


@pytest.fixture(scope="module")
def quick_run():
    shared_dataset("chatdoctor/genmedgpt_5k.json")
    shared_dataset("llama-tokenizer/tokenizer.model")
    doc = ROOT / "docs" / "BENCHMARKS.md"
    before = doc.read_bytes() if doc.exists() else None
    result = run_script(SCRIPT, "--quick", "--shapes", "cpu", "--configs", "medlora,alpaca_lora", "--no_write",
                        "--precision", "fp32")  # auto adds a bf16 table on CPUs with AMX
    after = doc.read_bytes() if doc.exists() else None
    return result.stdout, before == after


def test_quick_bench_prints_one_sane_row_per_configuration(quick_run):
    output, _ = quick_run
    rows = table_rows(output)
    assert set(rows) == {"medlora", "alpaca_lora"}
    parsed = {}
    for name, cells in rows.items():
        trained_per_s, real_per_s, padded, rss, loss, trained_tokens, steps, per_cpu_s = cells[1:9]
        parsed[name] = dict(trained_per_s=float(trained_per_s), real_per_s=float(real_per_s),
                            padded=float(padded.rstrip("%")), rss=float(rss), loss=float(loss),
                            trained_tokens=int(trained_tokens), steps=int(steps), per_cpu_s=float(per_cpu_s))
    for row in parsed.values():
        assert 0 < row["trained_per_s"] < row["real_per_s"]  # the prompt is masked: fewer trained than real tokens
        assert row["per_cpu_s"] > 0
        assert row["steps"] == 4  # 32 records, batch 8, one epoch
        assert 200 < row["rss"] < 16_000
        # A random model over 32,000 tokens starts near ln(32000) = 10.37 and barely moves in 4 steps.
        assert math.isfinite(row["loss"]) and 9.5 < row["loss"] < 11.5
    assert parsed["medlora"]["padded"] == 0.0  # padding-free batches
    assert parsed["alpaca_lora"]["padded"] > 5.0  # DataCollatorForSeq2Seq pads every row to the longest
    # Same records, same prompt masking and the same batches: both train on the same tokens, with the same loss.
    assert parsed["medlora"]["trained_tokens"] == parsed["alpaca_lora"]["trained_tokens"]
    assert abs(parsed["medlora"]["loss"] - parsed["alpaca_lora"]["loss"]) < 1e-3


def test_quick_bench_prints_ratios_and_the_targets(quick_run):
    output, doc_untouched = quick_run
    assert "Same batches in every configuration (trained tokens of each step agree): yes." in output
    assert "| MedLoRA vs | trained tok/s ratio |" in output and "| alpaca_lora | " in output
    targets = [line for line in output.splitlines() if line.startswith(("- PASS:", "- FAIL:"))]
    assert len(targets) == 3, output  # fp32: the step against the products replay, peak memory, loss within 1%
    assert any("final loss within 1% of alpaca-lora's" in line and line.startswith("- PASS") for line in targets)
    # The step holds the products and more, so it must take longer than the products replayed alone.
    replay = next(line for line in targets if "frozen products alone" in line)
    step_seconds, replay_seconds = map(float, re.search(r"\(([\d.]+) s against ([\d.]+) s", replay).groups())
    assert step_seconds > replay_seconds > 0
    assert "Measured " in output and "load average" in output and "torch " in output
    assert doc_untouched  # --no_write


def test_write_section_replaces_only_its_own_marked_section(tmp_path):
    benchmark = load_benchmark_module()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nHow to run.\n\n<!-- benchmark:cpu:begin -->\nold table\n<!-- benchmark:cpu:end -->\n"
                   "\nNotes after.\n")
    benchmark.write_section(doc, "cpu", "new table")
    assert doc.read_text() == ("# Benchmarks\n\nHow to run.\n\n<!-- benchmark:cpu:begin -->\nnew table\n"
                               "<!-- benchmark:cpu:end -->\n\nNotes after.\n")
    benchmark.write_section(doc, "cuda", "gpu table")  # no cuda section yet: appended, the cpu one kept
    assert doc.read_text().endswith("Notes after.\n\n<!-- benchmark:cuda:begin -->\ngpu table\n<!-- benchmark:cuda:end -->\n")
    assert "new table" in doc.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no staging file left behind


def test_write_section_ignores_markers_quoted_in_prose(tmp_path):
    benchmark = load_benchmark_module()
    doc = tmp_path / "BENCHMARKS.md"
    prose = "The script rewrites what lies between `<!-- benchmark:cpu:begin -->` and its end marker.\n"
    doc.write_text(f"# B\n\n{prose}\n<!-- benchmark:cpu:begin -->\nold\n<!-- benchmark:cpu:end -->\n")
    benchmark.write_section(doc, "cpu", "new")
    assert doc.read_text() == f"# B\n\n{prose}\n<!-- benchmark:cpu:begin -->\nnew\n<!-- benchmark:cpu:end -->\n"


@pytest.mark.slow
def test_bad_flags_fail_with_one_line_errors():
    result = run_script(SCRIPT, "--configs", "medlora,nosuch", "--no_write", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --configs: unknown configuration 'nosuch'")
    result = run_script(SCRIPT, "--device", "tpu", "--no_write", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --device")
    # A misspelt flag is refused before any work (fire alone would ignore it and run the whole bench).
    result = run_script(SCRIPT, "--precison", "bf16", "--no_write", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: unknown flag --precison; did you mean --precision?"
    result = run_script(SCRIPT, "--precision", "bf17", "--no_write", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --precision")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda would run the GPU bench")
def test_cuda_bench_without_a_gpu_is_a_clear_error():
    shared_dataset("chatdoctor/genmedgpt_5k.json")
    result = run_script(SCRIPT, "--device", "cuda", "--no_write", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --device cuda: no CUDA GPU is available here"


def test_gpu_shapes_are_the_published_llama_configs():
    from transformers import LlamaConfig, LlamaForCausalLM

    benchmark = load_benchmark_module()
    expected_parameters = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248}
    for name, shape in benchmark.GPU_SHAPES.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape))
        assert sum(p.numel() for p in model.parameters()) == expected_parameters[name], name
    runs = benchmark.plan_runs(["medlora", "trl", "generation"], "cuda", "llama-3.2-1b", "lora,qlora")
    assert runs == [("medlora", "llama-3.2-1b", "lora", "bf16"), ("trl", "llama-3.2-1b", "lora", "bf16"),
                    ("medlora", "llama-3.2-1b", "qlora", "bf16"), ("trl", "llama-3.2-1b", "qlora", "bf16")]


@pytest.mark.parametrize("flags, expected", [({"avx2", "avx512f"}, ["fp32"]),
                                             ({"avx512f", "avx512_bf16"}, ["fp32", "bf16"]),
                                             ({"amx_bf16"}, ["fp32", "bf16"])])
def test_cpu_bench_adds_a_bf16_table_only_where_the_cpu_makes_bf16_fast(monkeypatch, flags, expected):
    """#12: the CPU bench reports fp32 everywhere and bf16 autocast too where the CPU has AMX or AVX512-BF16;
    every configuration of one table trains in the same precision."""
    import medlora.models.loading

    benchmark = load_benchmark_module()
    monkeypatch.setattr(medlora.models.loading, "cpu_flags", lambda: flags)
    assert benchmark.bench_precisions("cpu", "auto") == expected
    assert benchmark.bench_precisions("cpu", "fp32") == ["fp32"]
    runs = benchmark.plan_runs(["medlora", "alpaca_lora", "data_prep"], "cpu", "smollm2-135m", "lora",
                               benchmark.bench_precisions("cpu", "auto"))
    assert runs == [(name, "smollm2-135m", "lora", precision) for precision in expected
                    for name in ("medlora", "alpaca_lora")] + [("data_prep", "smollm2-135m", "lora", "fp32")]
    assert benchmark.training_arguments(dict, "out", "cpu", "bf16")["bf16"] is True
    assert benchmark.training_arguments(dict, "out", "cpu", "fp32")["bf16"] is False


def test_a_clone_without_the_shared_folder_benches_the_bundled_data(tmp_path, monkeypatch, tiny_model_path):
    """#12: a user's clone has no ../shared: the bench falls back to the bundled records and the tiny model's
    tokenizer, and --data_path takes any alpaca-format file (other formats are refused naming the record)."""
    import json

    from medlora.errors import MedLoRAError

    bench = load_benchmark_module()
    monkeypatch.setattr(bench, "DATASET", tmp_path / "absent" / "genmedgpt_5k.json")
    monkeypatch.setattr(bench, "LLAMA_TOKENIZER", tmp_path / "absent" / "tokenizer.model")
    bundled = json.loads((ROOT / "data" / "sft" / "medical_chat_en.json").read_text(encoding="utf-8"))
    records = bench.read_bench_records("", 20)
    assert records == [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
                       for r in bundled[:20]]
    assert bench.bench_tokenizer_model() == tiny_model_path / "tokenizer.model"
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                     + "\n")
    with pytest.raises(MedLoRAError, match=r"chats.jsonl: record 1: the benchmark needs alpaca records"):
        bench.read_bench_records(str(chats), 20)


def test_cpu_bench_runs_both_shapes_with_the_peers_in_the_same_run():
    from medlora.errors import MedLoRAError

    benchmark = load_benchmark_module()
    runs = benchmark.plan_runs(["medlora", "alpaca_lora", "data_prep"], "cpu", "", "lora")
    assert runs == [("medlora", "cpu", "lora", "fp32"), ("alpaca_lora", "cpu", "lora", "fp32"),
                    ("medlora", "smollm2-135m", "lora", "fp32"), ("alpaca_lora", "smollm2-135m", "lora", "fp32"),
                    ("data_prep", "cpu", "lora", "fp32")]
    assert benchmark.lora_targets("smollm2-135m") == benchmark.ALL_LINEAR
    assert benchmark.lora_targets("cpu") == ["q_proj", "v_proj"]
    with pytest.raises(MedLoRAError, match="--shapes"):
        benchmark.plan_runs(["medlora"], "cpu", "nosuch", "lora")
