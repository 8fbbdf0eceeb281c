"""Quality evidence on the real built-in model: the README's demo (scripts/demo.sh) fine-tunes
SmolLM2-135M-Instruct on the bundled data, and tuning must make it better where it was tuned, not worse on
third-party medical answers, and teach it to end its answers by itself.

These tests run the demo once (a few minutes on 2 cores) and are marked slow; CI runs them."""

import json
import math
import os
import re
import subprocess

import pytest
import torch

from tests.conftest import ROOT, run_script, shared_dataset

pytestmark = pytest.mark.slow

# The demo trains 12 steps; the validation perplexity of the bundled replies must fall by at least this much.
MIN_VALIDATION_PERPLEXITY_DROP = 0.25
# Third-party answers (ChatDoctor's GenMedGPT) were never trained on: tuning may not make them less likely
# by more than measurement noise.
MAX_OUT_OF_DOMAIN_PERPLEXITY_RISE = 0.02
HELD_OUT_QUESTIONS = [
    "I have had a sore throat and a mild fever for three days, and it hurts to swallow. What should I do?",
    "My ankle is swollen and painful after I twisted it playing football yesterday. Should I see a doctor?",
    "I keep waking up at night to urinate and I am always thirsty. What could be the cause?",
]


# scripts/test.sh runs pytest with one thread per process (other tests start several processes); these tests
# run one process at a time, so they use every core, as a user's demo run does.
ALL_CORES = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "lora"
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, capture_output=True, text=True, timeout=2400,
                            env=dict(ALL_CORES, MEDLORA_DEMO_OUTPUT_DIR=str(output_dir)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir, result.stdout


def test_demo_shows_the_validation_perplexity_fall_and_both_answers(demo):
    output_dir, stdout = demo
    log = json.loads((output_dir / "training_log.json").read_text())
    evals = [entry for entry in log if "eval_loss" in entry]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    before, after = math.exp(evals[0]["eval_loss"]), math.exp(evals[-1]["eval_loss"])
    assert after < before * (1 - MIN_VALIDATION_PERPLEXITY_DROP), (before, after)
    shown = re.search(r"perplexity ([\d.]+) -> ([\d.]+)", stdout)
    assert shown and abs(float(shown.group(1)) - before) < 0.01 and abs(float(shown.group(2)) - after) < 0.01
    triage = stdout[stdout.index("triage_safety_en.jsonl (medqa, triage, 60 questions, loglik, 0-shot)"):]
    for metric in ("acc", "under_triage", "over_triage"):  # base and tuned side by side, each with its error
        assert re.search(rf"^  {metric}\s+[\d.]+ ± [\d.]+\s+[\d.]+ ± [\d.]+\s+[+-][\d.]+", triage, re.M), metric
    base_at = stdout.index("--- base model (adapter disabled) ---")
    tuned_at = stdout.index("--- tuned model ---")
    base_answer, tuned_answer = stdout[base_at:tuned_at].split("\n", 1)[1], stdout[tuned_at:].split("\n", 1)[1]
    assert len(base_answer.split()) > 10 and len(tuned_answer.split()) > 10 and base_answer != tuned_answer


@pytest.fixture
def all_cores():
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_tuned_model_ends_its_answers_with_eos(demo, all_cores):
    """Greedy, with the repetition penalty chat.py, generate.py and serve.py use by default (1.1). Without any
    penalty a 135M model falls into loops under greedy decoding ("If you are unsure, see a doctor. If you are
    unsure, ..."): measured on the demo adapter, the *base* model then ran past 256 tokens on 2 of these 3
    questions, the tuned one on 2 of 3; with the penalty the tuned model ended all three with EOS in 46-67 tokens.
    The label mask trains each reply's EOS once (tests/test_builtin_models.py)."""
    from medlora.inference.generation import ChatModel

    output_dir, _ = demo
    chat = ChatModel.load(lora_weights=str(output_dir))
    eos = chat.tokenizer.eos_token_id
    for question in HELD_OUT_QUESTIONS:
        prepared = chat.prompt_for([{"role": "user", "content": question}], None, 256)
        ids = torch.tensor([prepared.input_ids])
        with torch.no_grad():
            generated = chat.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=256,
                                            do_sample=False, repetition_penalty=1.1, eos_token_id=eos,
                                            pad_token_id=chat.tokenizer.pad_token_id)
        new_tokens = generated[0, ids.shape[1]:].tolist()
        assert eos in new_tokens, f"no EOS within 256 tokens for {question!r}"


@pytest.mark.slow
def test_evaluate_reports_base_and_tuned_perplexity_in_and_out_of_domain(demo, tmp_path):
    output_dir, _ = demo
    report_file = tmp_path / "in_domain.json"
    result = run_script("evaluate.py", "--lora_weights", output_dir, "--method", "perplexity", "--compare",
                        "--output_file", report_file, env=ALL_CORES)
    assert re.search(r"perplexity\s+[\d.]+\s+[\d.]+", result.stdout)
    in_domain = json.loads(report_file.read_text())["results"]
    assert in_domain["base"]["perplexity"]["records"] == 16  # the demo's own validation records
    assert in_domain["adapter"]["perplexity"]["perplexity"] < in_domain["base"]["perplexity"]["perplexity"] * 0.8

    genmedgpt = shared_dataset("chatdoctor/genmedgpt_5k.json")
    report_file = tmp_path / "out_of_domain.json"
    run_script("evaluate.py", "--lora_weights", output_dir, "--method", "perplexity", "--compare",
               "--perplexity_path", genmedgpt, "--limit", 40, "--output_file", report_file, env=ALL_CORES)
    out_of_domain = json.loads(report_file.read_text())["results"]
    base, tuned = (out_of_domain[name]["perplexity"]["perplexity"] for name in ("base", "adapter"))
    assert tuned <= base * (1 + MAX_OUT_OF_DOMAIN_PERPLEXITY_RISE), (base, tuned)


@pytest.mark.slow
def test_readme_multiple_choice_command_scores_every_question_on_the_demo_adapter(demo, tmp_path):
    """The README's `evaluate.py ... --data_path data/eval/medqa_style_sample.jsonl --compare` on the demo's adapter:
    the command that crashed on every SmolLM2 adapter (issue 28). Every option of every question gets a finite,
    negative log-likelihood, and tuning changed them."""
    output_dir, _ = demo
    report_file = tmp_path / "medqa.json"
    result = run_script("evaluate.py", "--lora_weights", output_dir, "--data_path",
                        "data/eval/medqa_style_sample.jsonl", "--compare", "--output_file", report_file, env=ALL_CORES)
    assert "medqa_style_sample.jsonl (medqa, 26 questions, loglik, 0-shot)" in result.stdout
    results = json.loads(report_file.read_text())["results"]
    rows = {name: results[name]["tasks"]["data/eval/medqa_style_sample.jsonl"]["questions"] for name in ("base", "adapter")}
    assert len(rows["base"]) == len(rows["adapter"]) == 26
    for base_row, tuned_row in zip(rows["base"], rows["adapter"]):
        for value in base_row["option_loglik"] + tuned_row["option_loglik"]:
            assert math.isfinite(value) and value < 0
        assert base_row["option_loglik"] != tuned_row["option_loglik"]
