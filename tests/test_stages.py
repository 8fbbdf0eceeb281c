"""The stages around SFT, end to end on the built-in tiny model: continued pretraining (pretrain.py),
preference tuning (dpo.py), the reward model (reward.py) and RL (rl.py), each run through its launcher
in scripts/ like a user would, plus their shared data code (medlora/data/pretraining.py, medlora/data/preference.py).

The tiny model is random and learns little, so every "it learns" check compares the same measurement
before and after training on the training data, with fixed seeds and learning rates high enough to move it.
"""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from medlora.data.preference import encode_pairs, load_preference_pairs, with_reply
from medlora.data.pretraining import (
    group_into_blocks,
    load_documents,
    tokenize_documents,
)
from medlora.data.templates import PromptTemplate
from medlora.data.tokenization import ConversationEncoder
from medlora.errors import MedLoRAError
from tests.conftest import ROOT, TINY, run_script, shared_dataset, stage_function

PREFERENCE_SAMPLE = ROOT / "data" / "preference" / "medical_preference_en.jsonl"
QUICK = ["--warmup_steps", 0, "--save_steps", 1000, "--logging_steps", 1]


def run_launcher(script, env_vars, *args):
    """bash scripts/<script> with stage paths as environment variables, as docs/pipeline.md shows."""
    env = dict(os.environ, PYTHON=sys.executable, **{key: str(value) for key, value in env_vars.items()})
    result = subprocess.run(["bash", f"scripts/{script}", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def settings_of(folder):
    return json.loads((folder / "medlora_run.json").read_text())


def logged(folder, key):
    return [entry[key] for entry in json.loads((folder / "training_log.json").read_text()) if key in entry]


def adapter_tensors(folder):
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as saved:
        return {key: saved.get_tensor(key) for key in saved.keys()}


# ---- continued pretraining ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pt_adapter(tmp_path_factory, tiny_model_path):
    output_dir = tmp_path_factory.mktemp("pt") / "pt"
    result = run_launcher("run_pt.sh", {"BASE_MODEL": TINY, "OUTPUT_DIR": output_dir}, "--block_size", 64,
                          "--batch_size", 8, "--micro_batch_size", 8, "--max_steps", 8, "--learning_rate", 2e-2,
                          "--val_set_size", 6, "--lora_target_modules", "all-linear", "--precision", "fp32", *QUICK)
    return output_dir, result.stdout


def test_pretraining_lowers_the_loss_and_the_validation_perplexity(pt_adapter):
    output_dir, stdout = pt_adapter
    losses = logged(output_dir, "loss")
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02
    settings = settings_of(output_dir)
    assert settings["validation_perplexity_after"] < settings["validation_perplexity_before"]
    assert "documents: 61 read, 61 used (55 train, 6 validation), 0 dropped" in stdout and "validation perplexity" in stdout


@pytest.mark.slow
def test_pretrained_adapter_reloads_with_the_validation_perplexity_it_reported(pt_adapter):
    """The saved adapter, loaded afresh, gives the validation perplexity that the run measured on the model it
    trained in memory (and handed to stage.save)."""
    from medlora.data.splits import split_validation
    from medlora.models.loading import load_for_inference
    from medlora.training.collators import PaddedCollator
    from medlora.training.loss import label_only_loss

    output_dir, _ = pt_adapter
    settings = settings_of(output_dir)
    loaded = load_for_inference(lora_weights=str(output_dir), precision="fp32")
    documents = list(load_documents(ROOT / settings["data_path"]).documents)
    _, held_out = split_validation(documents, settings["val_set_size"], settings["seed"], "documents")
    blocks = group_into_blocks(tokenize_documents(loaded.tokenizer, held_out), settings["block_size"]).blocks
    assert len(held_out) == 6 and blocks  # whole blocks: every one weighs the same in the Trainer's mean
    batch = PaddedCollator(loaded.tokenizer.pad_token_id)([{"input_ids": ids, "labels": ids} for ids in blocks])
    with torch.no_grad():
        reloaded = math.exp(label_only_loss(loaded.model, batch).item())
    after, before = settings["validation_perplexity_after"], settings["validation_perplexity_before"]
    assert reloaded == pytest.approx(after, rel=1e-4)
    assert abs(after - before) > 100 * abs(reloaded - after)  # the check can tell the tuned adapter from the base


@pytest.mark.slow
def test_pretrained_adapter_loads_for_inference_and_finetune_continues_it(pt_adapter, tmp_path):
    from medlora.models.loading import load_for_inference

    output_dir, _ = pt_adapter
    settings = settings_of(output_dir)
    assert settings["base_model"] == TINY and settings["stage"] == "pretrain"
    loaded = load_for_inference(lora_weights=str(output_dir))
    # plain text has no template of its own: inference uses the built-in base model's default (the tiny model's alpaca)
    assert loaded.template_name == "alpaca" and not loaded.run_settings.get("prompt_template_name")
    ids = loaded.tokenizer("Fever is a rise in body temperature.", return_tensors="pt").input_ids
    with torch.no_grad():
        tuned = loaded.model(input_ids=ids).logits
        with loaded.model.disable_adapter():
            base = loaded.model(input_ids=ids).logits
    assert (tuned - base).abs().max().item() > 1e-3

    sft_dir = tmp_path / "sft"
    run_launcher("run_sft.sh", {"BASE_MODEL": TINY, "LORA_WEIGHTS": output_dir, "OUTPUT_DIR": sft_dir}, "--max_steps", 1,
                 "--batch_size", 4, "--micro_batch_size", 4, "--val_set_size", 0, "--cutoff_len", 64, *QUICK)
    assert adapter_tensors(sft_dir).keys() == adapter_tensors(output_dir).keys()
    assert settings_of(sft_dir)["lora_weights"] == str(output_dir)


@pytest.mark.slow
def test_full_pretraining_writes_a_model_that_loads_as_a_base(tmp_path, tiny_model_path):
    import pretrain
    from medlora.models.loading import load_for_inference

    pretrain.pretrain(base_model=TINY, output_dir=str(tmp_path / "full"), use_lora=False, block_size=64, batch_size=8,
                      micro_batch_size=8, max_steps=2, learning_rate=1e-3, val_set_size=6, warmup_steps=0,
                      save_steps=1000)
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    tuned = load_for_inference(base_model=str(tmp_path / "full"))
    base = load_for_inference(base_model=TINY)
    ids = tuned.tokenizer("Fever is a rise in body temperature.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (tuned.model(input_ids=ids).logits - base.model(input_ids=ids).logits).abs().max().item() > 1e-3
    settings = settings_of(tmp_path / "full")
    assert settings["validation_perplexity_after"] < settings["validation_perplexity_before"]


@pytest.mark.parametrize("name", ["pretrain_fever_zh.txt", "pretrain_en_articles.txt"])
def test_shared_pretraining_text_is_cut_into_exact_blocks(name, tiny_tokenizer):
    path = shared_dataset(f"medicalgpt/{name}")
    documents = load_documents(path).documents
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    assert documents == [line for line in lines if line]
    blocks = group_into_blocks(tokenize_documents(tiny_tokenizer, documents), 128)
    # The stream, built independently: each document as the tokenizer encodes it (with BOS), then EOS.
    eos = tiny_tokenizer.eos_token_id
    stream = [token for text in documents for token in tiny_tokenizer(text).input_ids + [eos]]
    assert blocks.blocks and all(len(block) == 128 for block in blocks.blocks)
    assert [token for block in blocks.blocks for token in block] == stream[:len(blocks.blocks) * 128]
    assert blocks.dropped_tokens == len(stream) % 128 and blocks.documents == len(documents)
    assert stream.count(eos) == len(documents) and stream[-1] == eos


@pytest.mark.parametrize("name", ["pretrain_fever_zh.txt", "pretrain_en_articles.txt"])
def test_pretrain_runs_on_the_medicalgpt_text(name, tmp_path, tiny_model_path):
    import pretrain

    path = shared_dataset(f"medicalgpt/{name}")
    trainer = pretrain.pretrain(base_model=TINY, data_path=str(path), output_dir=str(tmp_path / "pt"), block_size=128,
                                batch_size=8, micro_batch_size=8, max_steps=1, val_set_size=0.05, warmup_steps=0,
                                save_steps=1000)
    assert all(len(row["input_ids"]) == 128 for row in trainer.train_dataset)
    assert math.isfinite(settings_of(tmp_path / "pt")["validation_perplexity_after"])


def test_text_records_folders_and_their_errors(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("First document.\n\n  Second document.  \n", encoding="utf-8")
    (folder / "b.jsonl").write_text('{"text": "Third."}\n\n{"text": "Fourth.", "id": 4}\n', encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    loaded = load_documents(folder)
    assert loaded.documents == ["First document.", "Second document.", "Third.", "Fourth."]
    assert list(loaded.sources.values()) == [2, 2]
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    assert load_documents(tmp_path / "c.jsonl", text_field="body").documents == ["x"]
    bad = tmp_path / "bad.jsonl"
    for content, message in [('{"text": "ok"}\n{"content": "no text"}\n', "record 2: field 'text': missing"),
                             ('{"text": 3}\n', "record 1: field 'text': expected a string, got int"),
                             ('{"text": "  "}\n', "record 1: field 'text': empty"),
                             ('{"text": "ok"}\n{"text": \n', "record 2: invalid JSON"),
                             ("", "no documents (empty file)")]:
        bad.write_text(content, encoding="utf-8")
        with pytest.raises(MedLoRAError, match="^" + re.escape(f"{bad}: {message}")):
            load_documents(bad)
    with pytest.raises(MedLoRAError, match="must be at least 2"):
        group_into_blocks([[1, 2]], 1)
    # Every bad record in one run; --skip_bad_records keeps the rest and lists the skipped ones.
    bad.write_text('{"text": "ok"}\n{"content": 1}\n{"text": ""}\n{"text": "fine"}\n', encoding="utf-8")
    with pytest.raises(MedLoRAError) as raised:
        load_documents(bad)
    assert str(raised.value).splitlines() == [
        f"{bad}: 2 bad records (nothing was written; --skip_bad_records drops them and trains on the rest):",
        f"  {bad}: record 2: field 'text': missing (choose the field with --text_field)",
        f"  {bad}: record 3: field 'text': empty"]
    kept = load_documents(bad, skip_bad_records=True)
    assert kept.documents == ["ok", "fine"]
    assert kept.describe().splitlines()[1:] == [f"  skipped: {bad}: record 2: field 'text': missing (choose the "
                                                "field with --text_field)", f"  skipped: {bad}: record 3: field 'text': empty"]


# ---- preference data ---------------------------------------------------------------------------------------
def test_medicalgpt_dpo_data_gives_500_valid_pairs_tokenized_like_sft(tiny_tokenizer):
    path = shared_dataset("medicalgpt/dpo_zh_500.jsonl")
    loaded = load_preference_pairs(path)
    assert len(loaded.pairs) == 500 and loaded.formats[str(path)] == ("sharegpt", 500)
    assert all(pair.conversation.messages[-1]["role"] == "user" for pair in loaded.pairs)
    assert sum(pair.conversation.system is not None for pair in loaded.pairs) == 84
    template = PromptTemplate.load("alpaca")
    encoded = encode_pairs(tiny_tokenizer, template, loaded.pairs, None)
    assert len(encoded.examples) == 500 and encoded.kept == list(range(500))
    encoder = ConversationEncoder(tiny_tokenizer, template)
    for example, pair in list(zip(encoded.examples, loaded.pairs))[:60]:
        # Exactly the ids finetune.py trains on for this conversation with each reply (ending with EOS).
        for reply, key in ((pair.chosen, "chosen_ids"), (pair.rejected, "rejected_ids")):
            full = encoder.encode([with_reply(pair.conversation, reply)]).examples[0].input_ids
            assert example["prompt_ids"] + example[key] == full and full[-1] == tiny_tokenizer.eos_token_id
        assert example["prompt_ids"] == encoder.encode_prompt(pair.conversation)
    cut = encode_pairs(tiny_tokenizer, template, loaded.pairs, 256)
    assert all(len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= 256
               for ex in cut.examples)
    assert len(cut.examples) + sum(cut.dropped.values()) == 500 and cut.truncated > 0


@pytest.mark.slow
def test_dpo_runs_on_the_medicalgpt_pairs(tmp_path, tiny_adapter, tiny_tokenizer):
    import dpo

    path = shared_dataset("medicalgpt/dpo_zh_500.jsonl")
    trainer = dpo.train(lora_weights=str(tiny_adapter), data_path=str(path), output_dir=str(tmp_path / "dpo"),
                        max_steps=1, batch_size=4, micro_batch_size=4, val_set_size=8, cutoff_len=256,
                        warmup_steps=0, save_steps=1000)
    # Long Chinese prompts fill the tiny tokenizer's 256 tokens: those pairs are dropped, the rest all train.
    kept = encode_pairs(tiny_tokenizer, PromptTemplate.load("alpaca"), load_preference_pairs(path).pairs, 256)
    assert len(trainer.train_dataset) + len(trainer.eval_dataset) == len(kept.examples) > 250
    assert len(trainer.eval_dataset) <= 8
    metrics = settings_of(tmp_path / "dpo")["preference_metrics"]
    assert metrics["measured_on"] == "validation" and metrics["rewards/margins"]["before"] == 0.0


def test_preference_formats_read_the_same_pair(tmp_path):
    records = {
        "sharegpt.jsonl": {"conversations": [{"from": "system", "value": "Be careful."},
                                             {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                             {"from": "human", "value": "Fever?"}], "chosen": "See a doctor.",
                           "rejected": "Ignore it."},
        "messages.jsonl": {"messages": [{"role": "system", "content": "Be careful."},
                                        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                        {"role": "user", "content": "Fever?"}], "chosen": "See a doctor.",
                           "rejected": "Ignore it."},
        "prompt.jsonl": {"system": "Be careful.", "history": [["Hi", "Hello"]], "prompt": "Fever?",
                         "chosen": "See a doctor.", "rejected": "Ignore it."},
        "reward.jsonl": {"system": "Be careful.", "history": [["Hi", "Hello"]], "question": "Fever?",
                         "response_chosen": "See a doctor.", "response_rejected": "Ignore it."},
    }
    pairs = []
    for name, record in records.items():
        (tmp_path / name).write_text(json.dumps(record) + "\n", encoding="utf-8")
        pairs += load_preference_pairs(tmp_path / name).pairs
    for pair in pairs:
        assert pair.conversation.messages == pairs[0].conversation.messages
        assert (pair.conversation.system, pair.chosen, pair.rejected) == ("Be careful.", "See a doctor.", "Ignore it.")
    mapped = tmp_path / "mapped.csv"
    mapped.write_text("q,good,bad\nFever?,See a doctor.,Ignore it.\n", encoding="utf-8")
    pair = load_preference_pairs(mapped, '{"prompt": "q", "chosen": "good", "rejected": "bad"}').pairs[0]
    assert (pair.conversation.messages[-1]["content"], pair.chosen) == ("Fever?", "See a doctor.")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Fever?", "chosen": "See a doctor."}, "field 'rejected': missing"),
    ({"prompt": "Fever?", "chosen": ["See a doctor."], "rejected": "No."},
     "field 'chosen': expected a string, got list"),
    ({"prompt": " ", "chosen": "See a doctor.", "rejected": "No."}, "field 'prompt': empty"),
    ({"prompt": "Fever?", "chosen": "Rest.", "rejected": " Rest."}, "field 'rejected': identical to 'chosen'"),
    ({"conversations": [{"from": "human", "value": "Fever?"}, {"from": "gpt", "value": "Rest."}], "chosen": "A",
      "rejected": "B"}, "field 'conversations': the last turn must be the user's"),
    ({"conversations": [{"from": "doctor", "value": "Fever?"}], "chosen": "A", "rejected": "B"},
     "field 'conversations\\[0\\].from': unknown role 'doctor'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Fever?"}], "chosen": "A",
      "rejected": "B"}, "field 'messages\\[1\\].role': expected a assistant turn"),
    ({"prompt": "Fever?", "history": [["only a question"]], "chosen": "A", "rejected": "B"},
     "field 'history\\[0\\]': expected a pair of non-empty strings"),
])
def test_bad_preference_records_name_file_record_and_field(tmp_path, record, message):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "Cough?", "chosen": "See a clinician if it lasts.", "rejected": "Never mind."}
    if "conversations" in record:  # the format is detected from a file's first record
        good = {"conversations": [{"from": "human", "value": "Cough?"}], "chosen": "A", "rejected": "B"}
    elif "messages" in record:
        good = {"messages": [{"role": "user", "content": "Cough?"}], "chosen": "A", "rejected": "B"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(MedLoRAError, match="^" + re.escape(f"{path}: record 2: ") + message):
        load_preference_pairs(path)


@pytest.mark.slow
def test_dpo_cli_stops_on_a_bad_record_with_one_line_and_writes_nothing(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "Cough?", "chosen": "See a clinician.", "rejected": "Never mind."}\n'
                    '{"prompt": "Fever?", "chosen": "Rest and fluids."}\n', encoding="utf-8")
    result = run_script("dpo.py", "--base_model", TINY, "--data_path", path, "--output_dir", tmp_path / "out",
                        check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {path}: record 2: field 'rejected': missing"
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# ---- DPO, IPO, ORPO, SimPO -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_adapter(tmp_path_factory, tiny_adapter):
    output_dir = tmp_path_factory.mktemp("dpo") / "dpo"
    result = run_launcher("run_dpo.sh", {"LORA_WEIGHTS": tiny_adapter, "OUTPUT_DIR": output_dir}, "--max_steps", 6,
                          "--batch_size", 8, "--micro_batch_size", 4, "--learning_rate", 1e-2, "--val_set_size", 0,
                          "--cutoff_len", 96, "--precision", "fp32", *QUICK)
    return output_dir, result.stdout


def test_dpo_from_the_sft_adapter_raises_reward_accuracy(dpo_adapter):
    output_dir, stdout = dpo_adapter
    metrics = settings_of(output_dir)["preference_metrics"]
    assert metrics["measured_on"] == "training"
    # The reference is a frozen copy of the SFT adapter, so before training every implicit reward is 0 ...
    assert metrics["rewards/accuracies"]["before"] == 0.0 and metrics["rewards/margins"]["before"] == 0.0
    assert metrics["loss"]["before"] == pytest.approx(math.log(2), abs=1e-5)
    assert logged(output_dir, "loss")[0] == pytest.approx(math.log(2), abs=1e-4)  # step 1 starts at the reference
    # ... and training separates chosen from rejected on the training pairs.
    assert metrics["rewards/accuracies"]["after"] >= 0.75 and metrics["rewards/margins"]["after"] > 0.02
    assert metrics["loss"]["after"] < math.log(2) - 0.01
    assert "reward accuracy 0.000 ->" in stdout and "template: alpaca; loss: dpo (beta 0.1)" in stdout


@pytest.mark.slow
def test_dpo_adapter_loads_with_no_extra_flags(dpo_adapter, tiny_adapter):
    from medlora.models.loading import load_for_inference

    output_dir, _ = dpo_adapter
    settings = settings_of(output_dir)
    assert (settings["base_model"], settings["prompt_template_name"], settings["stage"]) == (
        TINY, "alpaca", "preference")
    tuned, sft = adapter_tensors(output_dir), adapter_tensors(tiny_adapter)
    assert tuned.keys() == sft.keys() and not any(".ref." in key for key in tuned)  # TRL's reference copy is gone
    assert max((tuned[key] - sft[key]).abs().max().item() for key in sft) > 1e-4
    assert not (output_dir / "ref").exists()
    assert load_for_inference(lora_weights=str(output_dir)).template_name == "alpaca"


@pytest.mark.slow
def test_dpo_adapter_reloads_with_the_loss_the_run_reported(dpo_adapter, tiny_adapter):
    """The saved DPO adapter, loaded afresh beside its reference (the SFT adapter), gives the DPO loss on the
    training pairs that the run measured on the model it trained in memory: -log sigmoid(beta * (the policy's
    minus the reference's log-probability of the chosen reply, minus the same for the rejected one))."""
    import torch.nn.functional as F

    from medlora.models.loading import load_for_inference

    output_dir, _ = dpo_adapter
    settings = settings_of(output_dir)
    policy = load_for_inference(lora_weights=str(output_dir), precision="fp32")
    reference = load_for_inference(lora_weights=str(tiny_adapter), precision="fp32").model
    pairs = load_preference_pairs(ROOT / settings["data_path"]).pairs
    encoded = encode_pairs(policy.tokenizer, PromptTemplate.load(settings["prompt_template_name"]), pairs,
                           settings["cutoff_len"]).examples

    def reply_log_probability(model, prompt_ids, reply_ids):
        ids = torch.tensor([prompt_ids + reply_ids])
        log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        return log_probs[len(prompt_ids) - 1:].gather(1, ids[0, len(prompt_ids):, None]).sum()

    losses = []
    with torch.no_grad():
        for example in encoded:
            ratio = {reply: reply_log_probability(policy.model, example["prompt_ids"], example[f"{reply}_ids"])
                     - reply_log_probability(reference, example["prompt_ids"], example[f"{reply}_ids"])
                     for reply in ("chosen", "rejected")}
            losses.append(-F.logsigmoid(settings["beta"] * (ratio["chosen"] - ratio["rejected"])))
    reloaded = torch.stack(losses).mean().item()
    reported = settings["preference_metrics"]["loss"]
    assert reloaded == pytest.approx(reported["after"], rel=1e-4)
    assert abs(reported["after"] - reported["before"]) > 100 * abs(reloaded - reported["after"])


def test_preference_losses_match_their_formulas(tiny_model_path, tiny_tokenizer):
    """dpo/ipo (TRL) and orpo/simpo (ours) on one batch, against the papers' formulas computed from plain logits."""
    import torch.nn.functional as F
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig
    from trl.trainer.utils import use_adapter

    from medlora.models.loading import load_base_model
    from medlora.training.preference_trainer import PreferenceTrainer

    pairs = load_preference_pairs(PREFERENCE_SAMPLE).pairs[:3]
    examples = encode_pairs(tiny_tokenizer, PromptTemplate.load("alpaca"), pairs, 128).examples
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(str(tiny_model_path), torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    args = DPOConfig(output_dir="unused", beta=0.5, max_length=None, report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=3)
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                                processing_class=tiny_tokenizer, simpo_gamma=0.3)
    # Given a PeftModel, TRL keeps a frozen copy of its adapter ("ref") as the reference; move the policy off it.
    assert "ref" in model.peft_config
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".default." in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    model.eval()
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        with use_adapter(model, "ref"):
            ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["completion_mask"][:, 1:].float()
    targets = batch["input_ids"][:, 1:].unsqueeze(-1)
    token_logps = logits.log_softmax(-1).gather(-1, targets).squeeze(-1) * mask
    ref_token_logps = ref_logits.log_softmax(-1).gather(-1, targets).squeeze(-1) * mask
    sums, lengths = token_logps.sum(1), mask.sum(1)
    chosen_sum, rejected_sum = sums.chunk(2)
    ratio_chosen, ratio_rejected = (sums - ref_token_logps.sum(1)).chunk(2)
    chosen_len, rejected_len = lengths.chunk(2)
    chosen_avg, rejected_avg = chosen_sum / chosen_len, rejected_sum / rejected_len
    log_odds = (chosen_avg - rejected_avg) - (torch.log1p(-chosen_avg.exp()) - torch.log1p(-rejected_avg.exp()))
    expected = {
        "dpo": -F.logsigmoid(0.5 * (ratio_chosen - ratio_rejected)).mean(),
        "ipo": ((ratio_chosen / chosen_len - ratio_rejected / rejected_len) - 1 / (2 * 0.5)).pow(2).mean(),
        "orpo": -chosen_sum.sum() / chosen_len.sum() - 0.5 * F.logsigmoid(log_odds).mean(),
        "simpo": -F.logsigmoid(0.5 * (chosen_avg - rejected_avg) - 0.3).mean(),
    }
    for loss, value in expected.items():
        trainer.medlora_loss, trainer.loss_types = loss, ["ipo" if loss == "ipo" else "sigmoid"]
        with torch.no_grad():
            computed = trainer.compute_loss(model, dict(batch))
        assert computed.item() == pytest.approx(value.item(), rel=1e-4, abs=1e-5), loss


@pytest.mark.slow
def test_orpo_with_a_fresh_adapter_lowers_its_loss(tmp_path, tiny_model_path):
    import dpo

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(PREFERENCE_SAMPLE.read_text().splitlines(keepends=True)[:16]))
    trainer = dpo.train(base_model=TINY, data_path=str(data), output_dir=str(tmp_path / "orpo"), loss="orpo",
                        max_steps=4, batch_size=8, micro_batch_size=8, learning_rate=2e-2, val_set_size=0, cutoff_len=96,
                        lora_target_modules="all-linear", warmup_steps=0, save_steps=1000, logging_steps=1)
    metrics = settings_of(tmp_path / "orpo")["preference_metrics"]
    assert metrics["loss"]["after"] < metrics["loss"]["before"] - 0.05
    assert "ref" not in trainer.model.peft_config  # a fresh adapter's reference is the adapter switched off
    assert settings_of(tmp_path / "orpo")["lora_weights"] == ""


@pytest.mark.slow
def test_dpo_with_qlora_starts_at_its_reference(tmp_path, tiny_adapter):
    import dpo
    from medlora.models.loading import load_for_inference

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(PREFERENCE_SAMPLE.read_text().splitlines(keepends=True)[:8]))
    dpo.train(lora_weights=str(tiny_adapter), data_path=str(data), output_dir=str(tmp_path / "qlora"),
              load_in_4bit=True, max_steps=2, batch_size=4, micro_batch_size=4, learning_rate=1e-2, val_set_size=0,
              cutoff_len=96, warmup_steps=0, save_steps=1000)
    metrics = settings_of(tmp_path / "qlora")["preference_metrics"]
    # The trainable adapter stays fp32 (TRL would round it to bf16), so it starts exactly at its frozen copy.
    assert metrics["rewards/margins"]["before"] == 0.0 and metrics["rewards/margins"]["after"] != 0.0
    loaded = load_for_inference(lora_weights=str(tmp_path / "qlora"), load_in_4bit=True)
    assert loaded.template_name == "alpaca" and settings_of(tmp_path / "qlora")["load_in_4bit"] is True


# ---- reward model ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_path):
    output_dir = tmp_path_factory.mktemp("rm") / "rm"
    result = run_launcher("run_rm.sh", {"BASE_MODEL": TINY, "OUTPUT_DIR": output_dir}, "--max_steps", 6,
                          "--batch_size", 8, "--micro_batch_size", 4, "--learning_rate", 1e-2, "--val_set_size", 0,
                          "--cutoff_len", 96, "--lora_target_modules", "all-linear", *QUICK)
    return output_dir, result.stdout


def test_reward_model_learns_the_preferences(reward_model):
    output_dir, stdout = reward_model
    metrics = settings_of(output_dir)["pairwise_metrics"]
    assert metrics["accuracy"]["after"] >= 0.8 and metrics["accuracy"]["after"] > metrics["accuracy"]["before"]
    assert metrics["loss"]["after"] < metrics["loss"]["before"]
    assert "pairwise accuracy" in stdout and "score head 'score' trained in full" in stdout


def test_reward_model_reloads_with_the_scores_it_trained_to(reward_model, tiny_tokenizer):
    from medlora.training.reward_model import load_reward_model, score_sequences

    output_dir, _ = reward_model
    settings = settings_of(output_dir)
    assert any(key.endswith("score.weight") for key in adapter_tensors(output_dir))  # the head is saved
    model, tokenizer, loaded_settings = load_reward_model(str(output_dir))
    assert loaded_settings == settings
    encoded = encode_pairs(tokenizer, PromptTemplate.load(settings["prompt_template_name"]),
                           load_preference_pairs(PREFERENCE_SAMPLE).pairs, settings["cutoff_len"])
    chosen = score_sequences(model, encoded.sequences("chosen"), tokenizer.pad_token_id)
    rejected = score_sequences(model, encoded.sequences("rejected"), tokenizer.pad_token_id)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    assert accuracy == pytest.approx(settings["pairwise_metrics"]["accuracy"]["after"], abs=1e-6)


# ---- RL ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rl_policy(tmp_path_factory, tiny_model_path):
    """An SFT adapter whose output layer is trained too (--lora_modules_to_save lm_head): LoRA alone barely
    moves the random tiny model's near-uniform next-token distribution, so RL would have nothing to shift.
    No LoRA dropout: the policy, and so the RL test's margin, do not hinge on dropout's random stream (with it,
    one stream gave greedy replies that RL moved by 0.2 and another replies it did not move)."""
    import finetune

    output_dir = tmp_path_factory.mktemp("policy") / "sft"
    finetune.train(base_model=TINY, output_dir=str(output_dir), max_steps=6, batch_size=8, micro_batch_size=8,
                   val_set_size=0, warmup_steps=0, learning_rate=1e-2, lora_target_modules="all-linear",
                   lora_modules_to_save="lm_head", cutoff_len=128, save_steps=1000, precision="fp32",
                   lora_dropout=0)
    return output_dir


def test_rl_with_the_rule_reward_raises_the_mean_reward(rl_policy, tmp_path):
    output_dir = tmp_path / "rl"
    result = run_launcher("run_rl.sh", {"LORA_WEIGHTS": rl_policy, "OUTPUT_DIR": output_dir}, "--max_steps", 8,
                          "--batch_size", 16, "--micro_batch_size", 16, "--num_generations", 8,
                          "--max_completion_length", 12, "--learning_rate", 1e-2, "--eval_prompts", 8,
                          "--precision", "fp32", *QUICK)  # margins measured in fp32, the reference on every CPU
    measured = settings_of(output_dir)["mean_greedy_reward"]
    assert measured["prompts"] == 8 and measured["after"] > measured["before"] + 0.2
    sampled = logged(output_dir, "reward")  # TRL's mean reward of the sampled replies, step by step
    assert sum(sampled[-3:]) / 3 > sum(sampled[:3]) / 3
    assert "reward: rule (advice to see a clinician" in result.stdout


@pytest.mark.slow
def test_rl_against_the_reward_model(reward_model, tiny_adapter, tmp_path):
    import rl
    from medlora.models.loading import load_for_inference
    from medlora.training import rewards
    from medlora.training.reward_model import load_reward_model, score_sequences

    rm_dir, _ = reward_model
    prompts = tmp_path / "questions.txt"
    prompts.write_text("I have a fever. What should I do?\n\nMy chest hurts on stairs.\nIs a cough serious?\n")
    rl.train(lora_weights=str(tiny_adapter), reward_model=str(rm_dir), data_path=str(prompts),
             output_dir=str(tmp_path / "rl"), max_steps=1, batch_size=4, micro_batch_size=4, num_generations=2,
             max_completion_length=6, eval_prompts=3, learning_rate=1e-2, save_steps=1000, logging_steps=1)
    settings = settings_of(tmp_path / "rl")
    assert settings["stage"] == "rl" and settings["prompt_template_name"] == "alpaca"
    assert math.isfinite(settings["mean_greedy_reward"]["before"]) and len(logged(tmp_path / "rl", "reward")) == 1
    assert load_for_inference(lora_weights=str(tmp_path / "rl")).template_name == "alpaca"
    # A reply's reward is the reward model's score of the conversation rendered with the reward model's template,
    # cut at the policy template's stop string.
    net, tokenizer, rm_settings = load_reward_model(str(rm_dir))
    conversation = rewards.load_prompts(prompts)[0]
    encoder = ConversationEncoder(tokenizer, PromptTemplate.load(rm_settings["prompt_template_name"]))
    ids = encoder.encode([with_reply(conversation, "Please see a doctor.")]).examples[0].input_ids
    reward = rewards.model_reward(net, tokenizer, rm_settings, [(conversation, [])], PromptTemplate.load("alpaca"))
    scored = reward(prompts=[""], completions=["Please see a doctor.\n\n### Instruction:\nmore"], completion_ids=[[]],
                    prompt_index=[0])
    assert scored[0] == pytest.approx(score_sequences(net, [ids], tokenizer.pad_token_id)[0], abs=1e-6)


def test_prompts_come_from_any_record_file(tmp_path):
    from medlora.training import rewards

    questions = tmp_path / "questions.txt"
    questions.write_text("Fever?\n\nCough?\n", encoding="utf-8")
    assert [c.messages for c in rewards.load_prompts(questions)] == [[{"role": "user", "content": "Fever?"}],
                                                                     [{"role": "user", "content": "Cough?"}]]
    from_sft = rewards.load_prompts(ROOT / "data" / "sft" / "medical_chat_en.json")
    assert from_sft and all(c.messages[-1]["role"] == "user" for c in from_sft)
    from_pairs = rewards.load_prompts(PREFERENCE_SAMPLE)
    assert len(from_pairs) == 44 and from_pairs[0].messages[-1]["role"] == "user"
    assert rewards.rule_reward(30, PromptTemplate.load("alpaca"))(
        prompts=["", "", ""], completions=["Please see your doctor.", "Rest at home.", "x" * 40 + " doctor"],
        completion_ids=[[], [], []]) == [2.0, 1.0, 1.0 + 30 / 47]


# ---- the whole pipeline ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_offline_pipeline_script_chains_every_stage(tmp_path, tiny_model_path):
    work = tmp_path / "pipeline"
    result = subprocess.run(["bash", "scripts/run_pipeline_offline.sh"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, WORK_DIR=str(work), PYTHON=sys.executable))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = {name: settings_of(work / name) for name in ("pt", "sft", "dpo", "rm", "rl")}
    assert stages["sft"]["lora_weights"] == str(work / "pt")
    assert stages["dpo"]["lora_weights"] == stages["rl"]["lora_weights"] == str(work / "sft")
    assert stages["rl"]["reward_model"] == str(work / "rm") and stages["rm"]["stage"] == "reward"
    assert all(settings["base_model"] == TINY for settings in stages.values())
    assert result.stdout.count("done in") == 5 and "pipeline done" in result.stdout
    from tests.test_evaluate import assert_png

    for name in stages:  # every training stage draws its loss curves into its run folder (issue 30)
        assert_png(work / name / "loss_curves.png", min_width=600)


# ---- every flag documented (tests/test_readme_commands.py checks every script's --help) ------------------------
@pytest.mark.parametrize("script", ["pretrain", "dpo", "reward", "rl"])
def test_every_flag_has_its_own_help_line(script):
    from medlora.flags import docstring_args, flag_descriptions

    function = stage_function(script)
    assert all(flag_descriptions(function).values()), script
    # A stage documents its own meaning of a flag, or leaves it to the shared description: never a copy of it.
    assert not [name for name, text in docstring_args(function).items() if function.flag_help.get(name) == text]
    assert sys.modules[function.__module__].__doc__.lstrip().startswith(
        ("Continued", "Preference", "Train", "Reinforcement"))


@pytest.mark.slow
def test_pretrain_under_torchrun_matches_one_process(tmp_path):
    """Every stage shares finetune.py's torchrun path; continued pretraining stands in for them here."""
    from tests.conftest import ROOT, run_script

    flags = ["--base_model", TINY, "--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2",
             "--block_size", "64", "--lora_dropout", "0", "--learning_rate", "1e-2", "--warmup_steps", "0",
             "--logging_steps", "1"]
    run_script("pretrain.py", "--output_dir", tmp_path / "one", *flags)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                "pretrain.py", "--output_dir", str(tmp_path / "two"), *flags]
    result = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done in") == 1
    losses = [[e["loss"] for e in json.loads((tmp_path / run / "training_log.json").read_text()) if "loss" in e]
              for run in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 2
    assert losses[0][0] == pytest.approx(losses[1][0], abs=1e-5)  # same weights, same global batch
    # After one AdamW step the float summation order of the gradients differs a little.
    assert losses[0][1] == pytest.approx(losses[1][1], rel=1e-3)
