"""evaluate.py --method perplexity: base and tuned side by side on the adapter's own held-out records."""

import json
import math

import pytest

from tests.conftest import TINY, run_script


@pytest.mark.slow
@pytest.mark.parametrize("hygiene", [[], ["--dedup", "--decontaminate", "--scrub_pii"]])
def test_method_perplexity_defaults_to_the_adapters_validation_records(tmp_path, hygiene):
    """With --dedup the English sample loses 3 near duplicates before the split, so the validation records are
    found again only if evaluate.py applies the run's hygiene flags too."""
    adapter = tmp_path / "lora"
    # One validation batch (4 records, micro-batch 4): the Trainer's eval loss is then the plain token mean.
    run_script("finetune.py", "--base_model", TINY, "--output_dir", adapter, "--max_steps", 2, "--batch_size", 4,
               "--micro_batch_size", 4, "--val_set_size", 4, "--learning_rate", 1e-2, "--cutoff_len", 128,
               "--save_steps", 1000, "--eval_steps", 1000, "--precision", "fp32",  # evaluate.py scores in fp32
               "--data_path", "data/sft/medical_chat_en.json", *hygiene)
    final_eval = [entry for entry in json.loads((adapter / "training_log.json").read_text()) if "eval_loss" in entry][-1]
    report_file = tmp_path / "report.json"
    result = run_script("evaluate.py", "--lora_weights", adapter, "--method", "perplexity", "--compare",
                        "--output_file", report_file)
    assert "validation records of lora" in result.stdout and "medqa" not in result.stdout
    results = json.loads(report_file.read_text())["results"]
    scored = results["adapter"]["perplexity"]
    assert results["base"]["tasks"] == {} and scored["records"] + scored["dropped"] == 4  # dropped: cut at cutoff_len
    # The same records, encoded the same way, as finetune.py's own final validation.
    assert abs(results["adapter"]["perplexity"]["mean_nll"] - final_eval["eval_loss"]) < 1e-4
    assert results["base"]["perplexity"]["perplexity"] != results["adapter"]["perplexity"]["perplexity"]
    assert math.isclose(results["adapter"]["perplexity"]["perplexity"], math.exp(final_eval["eval_loss"]), rel_tol=1e-4)

    if not hygiene:
        run_script("evaluate.py", "--lora_weights", adapter, "--method", "perplexity", "--limit", 2,
                   "--output_file", tmp_path / "limited.json")
        limited = json.loads((tmp_path / "limited.json").read_text())["results"]["adapter"]["perplexity"]
        assert limited["records"] + limited["dropped"] == 2


@pytest.mark.slow
def test_method_perplexity_without_validation_records_is_one_clear_error(tiny_adapter):
    result = run_script("evaluate.py", "--lora_weights", tiny_adapter, "--method", "perplexity", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --method perplexity needs --perplexity_path")
