"""The GPU checks (marker `gpu`): SmolLM2-135M-Instruct fine-tuned with LoRA in bf16 on CUDA (packed against padded
losses, the adapter reloaded), --torch_compile against eager training, QLoRA in 4 bits, the merged export,
generate.py and serve.py answering, torchrun with one process, and the benchmark's Llama-3.2-1B GPU shape against
alpaca-lora's pipeline and TRL.

    pytest -m gpu tests/test_gpu.py -rs       # on a CUDA machine; elsewhere each test says why it is skipped
    bash scripts/gpu_check.sh                 # the same, timed and reported (docs/BENCHMARKS.md, "GPU check")

Every test is skipped, with its reason, where torch sees no CUDA GPU (CI and the development machines have none).
Tolerances are stated where they are used. bf16 keeps 8 significant bits, so one rounding moves a value by up to
2^-8 of it; bf16 results are held to bounds of that order. fp32 on the GPU (PyTorch leaves TF32 off for matrix
products unless asked) is held as tightly as on the CPU.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import finetune
from tests.conftest import ROOT, SAMPLE_SFT, free_port, run_script, serve_script, stop

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False "
                                                             "here (scripts/gpu_check.sh runs these on one)"),
]

SMOLLM2 = "builtin:smollm2-135m-instruct"
BF16_ROUNDING = 2 ** -8  # the relative error of one bf16 rounding
# The run the adapter tests share: bf16 weights on the GPU, LoRA on every linear layer, padding-free batches,
# validation at the start and the end (finetune.py always evaluates both).
SFT = dict(base_model=SMOLLM2, precision="bf16", max_steps=8, batch_size=8, micro_batch_size=4, val_set_size=16,
           eval_steps=1000, warmup_steps=0, learning_rate=1e-3, cutoff_len=256, lora_target_modules="all-linear",
           logging_steps=1, save_steps=1000)
# The adapter tests run in one pytest-xdist worker (scripts/gpu_check.sh runs three), which trains it once.
ADAPTER_GROUP = pytest.mark.xdist_group("smollm2-adapter")
QUESTIONS = ["I have had a dry cough for a week. What should I do?", "What are the early signs of type 2 diabetes?"]
# The benchmark's GPU shape and configurations that fit scripts/gpu_check.sh's budget: Llama-3.1-8B does not
# (16 GB of random weights written once and read by every configuration's process).
BENCH_SHAPE, BENCH_CONFIGS = "llama-3.2-1b", "medlora,alpaca_lora,trl,trl_padding_free"
# scripts/gpu_check.sh sets it: the benchmark's table goes into this file instead of docs/BENCHMARKS.md.
BENCHMARK_DOC = "MEDLORA_BENCHMARK_DOC"


def as_flags(settings: dict) -> list:
    return [str(word) for name, value in settings.items() for word in (f"--{name}", value)]


def logged(output_dir, key) -> list:
    return [entry[key] for entry in json.loads((output_dir / "training_log.json").read_text()) if key in entry]


def on_gpu(batch: dict) -> dict:
    return {key: value.cuda() if torch.is_tensor(value) else value for key, value in batch.items()}


def run_at_once(*commands) -> list:
    """run_script for each argument list, all started together (each trains or loads on the GPU by itself)."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda command: run_script(*command), commands))


def smollm2_path() -> str:
    from medlora.models.loading import resolve_base_model

    return resolve_base_model(SMOLLM2)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """(output folder, FinetuneResult) of finetune.train with SFT's settings, in this process."""
    output_dir = tmp_path_factory.mktemp("sft") / "lora"
    return output_dir, finetune.train(output_dir=str(output_dir), **SFT)


@pytest.fixture(scope="module")
def merged_export(sft_run, tmp_path_factory):
    """The SFT adapter merged by export_hf_checkpoint.py on the GPU, in float32 (SmolLM2's own dtype)."""
    export_dir = tmp_path_factory.mktemp("export") / "hf_ckpt"
    result = run_script("export_hf_checkpoint.py", "--lora_weights", sft_run[0], "--output_dir", export_dir,
                        "--device", "cuda", "--dtype", "float32")
    return export_dir, result


@ADAPTER_GROUP
def test_lora_sft_in_bf16_trains_on_the_gpu_and_reloads_to_the_same_logits(sft_run, record_property):
    from medlora.models.loading import load_for_inference

    output_dir, result = sft_run
    settings = json.loads((output_dir / "medlora_run.json").read_text())
    assert settings["dtype"] == "bfloat16" and settings["packing"] is True
    model = result.model.eval()
    embeddings = model.get_input_embeddings().weight
    assert embeddings.device.type == "cuda" and embeddings.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters() if p.requires_grad)
    losses, validation = logged(output_dir, "loss"), logged(output_dir, "eval_loss")
    assert len(losses) == SFT["max_steps"] and all(math.isfinite(loss) for loss in losses)
    assert validation[-1] < validation[0], validation

    input_ids = result.tokenizer(QUESTIONS[0], return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        in_memory = model(input_ids=input_ids).logits.float()
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits.float()
        reloaded = load_for_inference(lora_weights=str(output_dir), device="cuda", precision="bf16")
        from_disk = reloaded.model(input_ids=input_ids).logits.float()
    # The same weights through the same kernels: at most one bf16 rounding of the largest logit apart.
    tolerance = BF16_ROUNDING * in_memory.abs().max().item()
    reload_difference = (in_memory - from_disk).abs().max().item()
    adapter_change = (in_memory - base).abs().max().item()
    record_property("reload_max_logit_difference", reload_difference)
    record_property("adapter_max_logit_change", adapter_change)
    assert reload_difference <= tolerance
    assert adapter_change > tolerance  # the adapter really changed the model


@pytest.mark.parametrize("dtype, relative_tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "bf16"])
def test_packed_and_padded_batches_give_the_same_loss_on_the_gpu(dtype, relative_tolerance, record_property):
    """tests/test_finetune.py's check on SmolLM2 on CUDA: padded rows, one packed row with transformers' dense
    block mask, one packed row with MedLoRA's per-record attention, and transformers' own full-logits loss agree.
    fp32: within 1e-4 of the loss, as on the CPU. bf16: within 1% of it, since the three paths run different
    attention kernels, each rounding to 8 bits at every one of the 30 layers."""
    from peft import LoraConfig, get_peft_model

    from medlora.data.records import load_conversations
    from medlora.data.templates import PromptTemplate
    from medlora.data.tokenization import ConversationEncoder
    from medlora.models.builtin import default_template_for
    from medlora.models.loading import load_base_model, load_tokenizer
    from medlora.models.packed_attention import use_packed_attention
    from medlora.training.collators import PackedCollator, PaddedCollator
    from medlora.training.trainer import label_only_loss

    tokenizer = load_tokenizer(smollm2_path())
    conversations = load_conversations(SAMPLE_SFT).conversations[:6]
    template = PromptTemplate.load(default_template_for(SMOLLM2))
    report = ConversationEncoder(tokenizer, template, 256).encode(conversations)
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in report.examples]
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(smollm2_path(), dtype, device="cuda"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    padded_batch = on_gpu(PaddedCollator(tokenizer.pad_token_id)(examples))
    with torch.no_grad():
        padded = label_only_loss(model, padded_batch).item()
        others = {"packed, dense mask": label_only_loss(model, on_gpu(PackedCollator()(examples))).item(),
                  "transformers' own loss": model(**padded_batch).loss.item()}
        assert use_packed_attention(model, 256)
        others["packed, per-record attention"] = label_only_loss(model, on_gpu(PackedCollator()(examples))).item()
        others["padded, per-record attention"] = label_only_loss(model, padded_batch).item()
    differences = {name: abs(loss - padded) for name, loss in others.items()}
    record_property("padded_loss", padded)
    record_property("max_relative_difference", max(differences.values()) / padded)
    assert math.isfinite(padded)
    assert all(difference <= relative_tolerance * padded for difference in differences.values()), differences


def test_torch_compile_trains_as_eager_training_does_on_the_gpu(tmp_path, record_property):
    """--torch_compile on CUDA (PEFT's forward compiled, inductor's own dropout there; tests/test_compile.py checks
    the CPU path exactly): without dropout the same run, the logged losses within 2% of eager's, since the fused
    bf16 kernels round differently at each of the 30 layers and the runs drift apart a little over three steps."""
    settings = SFT | {"max_steps": 3, "val_set_size": 0, "lora_dropout": 0.0}
    eager = finetune.train(output_dir=str(tmp_path / "eager"), **settings)
    compiled = finetune.train(output_dir=str(tmp_path / "compiled"), torch_compile=True, **settings)
    losses = [logged(tmp_path / name, "loss") for name in ("eager", "compiled")]
    record_property("losses_eager_compiled", losses)
    record_property("seconds_eager_compiled", [run.trainer.state.log_history[-1]["train_runtime"]
                                               for run in (eager, compiled)])
    assert len(losses[1]) == 3 and all(math.isfinite(loss) for loss in losses[1])
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    assert not any("forward" in module.__dict__ for module in compiled.model.modules())


def test_qlora_trains_a_4bit_smollm2_on_the_gpu(tmp_path, record_property):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (it did not travel)")
    from medlora.models.loading import load_for_inference

    output_dir = tmp_path / "qlora"
    result = finetune.train(output_dir=str(output_dir), **(SFT | dict(max_steps=3, val_set_size=0, load_in_4bit=True)))
    layer = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cuda"
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)
    losses = logged(output_dir, "loss")
    record_property("losses", losses)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert json.loads((output_dir / "medlora_run.json").read_text())["load_in_4bit"] is True

    reloaded = load_for_inference(lora_weights=str(output_dir), load_in_4bit=True, device="cuda")
    input_ids = reloaded.tokenizer(QUESTIONS[0], return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        tuned = reloaded.model(input_ids=input_ids).logits.float()
        with reloaded.model.disable_adapter():
            base = reloaded.model(input_ids=input_ids).logits.float()
    assert torch.isfinite(tuned).all() and (tuned - base).abs().max().item() > 0


@ADAPTER_GROUP
def test_merged_export_equals_base_plus_adapter_on_the_gpu(sft_run, merged_export, record_property):
    from transformers import AutoModelForCausalLM

    from medlora.export.merge import RELATIVE_TOLERANCE
    from medlora.models.loading import load_tokenizer
    from tests.test_export import base_plus_adapter, logits_of

    export_dir, result = merged_export
    assert "in float32 on cuda" in result.stdout
    note = json.loads((export_dir / "medlora_export.json").read_text())
    assert note["dtype"] == "float32" and note["max_logit_difference"] <= note["logit_tolerance"]

    tokenizer = load_tokenizer(str(sft_run[0]))
    expected, base = base_plus_adapter(smollm2_path(), sft_run[0], tokenizer, device="cuda")
    exported = logits_of(AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).cuda().eval(), tokenizer)
    # The export's own float32 tolerance: 1e-4 of the largest logit.
    tolerance = RELATIVE_TOLERANCE[torch.float32] * max(1.0, expected.abs().max().item())
    difference = (exported - expected).abs().max().item()
    record_property("export_max_logit_difference", difference)
    assert difference <= tolerance
    assert (expected - base).abs().max().item() > 100 * tolerance  # the check means something


@ADAPTER_GROUP
def test_generate_py_answers_on_the_gpu_as_the_merged_export_does(sft_run, merged_export, tmp_path):
    """Greedy batch answers of the adapter and of its export, both in float32 on the GPU, are the same text."""
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in QUESTIONS))
    template = json.loads((sft_run[0] / "medlora_run.json").read_text())["prompt_template_name"]
    common = ["--data_file", questions, "--max_new_tokens", 16, "--device", "cuda", "--precision", "fp32"]
    adapter, export = run_at_once(
        ["generate.py", "--lora_weights", sft_run[0], "--predictions_file", tmp_path / "adapter.jsonl", *common],
        ["generate.py", "--base_model", merged_export[0], "--prompt_template", template,
         "--predictions_file", tmp_path / "export.jsonl", *common])
    assert "on cuda" in adapter.stderr and "on cuda" in export.stderr
    answers = {name: [json.loads(line)["prediction"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
               for name in ("adapter", "export")}
    assert len(answers["adapter"]) == 2 and all(answer.strip() for answer in answers["adapter"])
    assert answers["export"] == answers["adapter"]


@ADAPTER_GROUP
def test_serve_py_answers_on_the_gpu_as_the_generation_core_does(sft_run):
    """serve.py (bf16 on the GPU) streams the greedy answer it gives whole, and that is the generation core's."""
    import httpx

    from medlora.inference.generation import ChatModel, GenerationSettings

    messages = [{"role": "user", "content": QUESTIONS[0]}]
    request = dict(model="medic", messages=messages, temperature=0, max_tokens=16)
    process, base_url = serve_script("--lora_weights", f"medic={sft_run[0]}", "--repetition_penalty", 1.1)
    try:
        assert {"medic", SMOLLM2} <= {model["id"] for model in httpx.get(f"{base_url}/models").json()["data"]}
        whole = httpx.post(f"{base_url}/chat/completions", json=request, timeout=120).json()
        streamed = ""
        with httpx.stream("POST", f"{base_url}/chat/completions", json=request | {"stream": True}, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed += "".join(choice["delta"].get("content") or "" for choice in json.loads(line[6:])["choices"])
    finally:
        output = stop(process)
    assert "on cuda" in output
    answer = whole["choices"][0]["message"]["content"]
    assert answer.strip() and streamed == answer
    reference = ChatModel.load(None, str(sft_run[0]), device="cuda").answer(
        messages, settings=GenerationSettings(temperature=0, repetition_penalty=1.1, max_new_tokens=16))
    assert answer == reference


def test_torchrun_with_one_process_trains_as_plain_python_does(tmp_path):
    """`torchrun --nproc_per_node=1 finetune.py` and `python finetune.py`, same flags, side by side on the GPU: the
    same losses within 1% (bf16; the GPU's backward kernels may sum in another order from run to run)."""
    flags = as_flags(SFT | dict(max_steps=3, val_set_size=0))
    plain = [sys.executable, "finetune.py", "--output_dir", str(tmp_path / "plain"), *flags]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
                "finetune.py", "--output_dir", str(tmp_path / "torchrun"), *flags]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda command: subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                                                timeout=600), (plain, torchrun)))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert results[1].stdout.count("done in") == 1
    assert json.loads((tmp_path / "torchrun" / "medlora_run.json").read_text())["world_size"] == 1
    one, launched = logged(tmp_path / "plain", "loss"), logged(tmp_path / "torchrun", "loss")
    assert len(one) == len(launched) == 3
    assert all(abs(a - b) <= 1e-2 * a for a, b in zip(one, launched)), (one, launched)


def test_benchmark_gpu_shape_against_alpaca_lora_and_trl():
    """scripts/benchmark.py --device cuda on Llama-3.2-1B (random weights), LoRA on a bf16 base and, where
    bitsandbytes is installed, QLoRA on a 4-bit one: MedLoRA, alpaca-lora's pipeline and both TRL configurations
    train on the same batches. The table goes to $MEDLORA_BENCHMARK_DOC when set (scripts/gpu_check.sh), else
    nowhere (--no_write)."""
    for module in ("trl", "datasets"):
        pytest.importorskip(module, reason=f"{module} is not installed: the benchmark's peers need it")
    quant = "lora,qlora" if importlib.util.find_spec("bitsandbytes") else "lora"
    doc = os.environ.get(BENCHMARK_DOC)
    result = run_script("scripts/benchmark.py", "--device", "cuda", "--shapes", BENCH_SHAPE, "--quant", quant,
                        "--configs", BENCH_CONFIGS, *(["--doc", doc] if doc else ["--no_write"]), timeout=900)
    for mode in quant.split(","):
        assert f"Same batches in every configuration ({BENCH_SHAPE} {mode}): yes" in result.stdout, result.stdout[-3000:]
        for config in BENCH_CONFIGS.split(","):
            assert f"| {BENCH_SHAPE} {mode} / {config} | " in result.stdout
