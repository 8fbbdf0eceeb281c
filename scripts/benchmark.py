"""Benchmark MedLoRA's training path against the alpaca-lora pipeline and TRL's SFTTrainer, in one run.

    python scripts/benchmark.py                        # both CPU shapes (below); writes docs/BENCHMARKS.md
    python scripts/benchmark.py --shapes smollm2-135m  # the real SmolLM2-135M only
    python scripts/benchmark.py --quick --shapes cpu --no_write   # 32 records, prints the table only (a smoke test)
    python scripts/benchmark.py --configs medlora,alpaca_lora --no_write
    python scripts/benchmark.py --precision bf16 --shapes smollm2-135m   # bf16 autocast only (CPUs with AMX)
    python scripts/benchmark.py --device cuda          # GPU shapes: Llama-3.2-1B and Llama-3.1-8B, LoRA and QLoRA, bf16

CPU shapes: `cpu`, a random-weight LLaMA-architecture model (hidden 256, 4 layers, vocabulary 32,000, LoRA on
q_proj/v_proj), and `smollm2-135m`, the built-in real SmolLM2-135M-Instruct (30 layers, hidden 576, vocabulary
49,152, its own tokenizer, LoRA on all seven linear layers). Every configuration trains the same model on the same
records, in the same order, with the same batch size, precision, LoRA settings, learning rate and seed, each in its own
process (this script re-started with --config NAME --json_out PATH), so that peak memory is its own. Precision on
CPU: fp32, and in a second table bf16 autocast over fp32 weights where the CPU has AMX or AVX512-BF16 (every
configuration alike: MedLoRA's --precision bf16-mixed, the peers' Trainer bf16=True).

  medlora           finetune.train(...): the code finetune.py runs (label-only logits, padding-free batches)
  medlora_compile   the same with --torch_compile (decoder layers compiled; the warm-up step includes compiling,
                    reported on its own)
  alpaca_lora       alpaca-lora's finetune.py pipeline: per-record tokenization with the prompt masked by its
                    token length, DataCollatorForSeq2Seq(pad_to_multiple_of=8), plain Trainer, full logits
  trl               TRL SFTTrainer on prompt/completion records, completion-only loss, padded batches
  trl_padding_free  the same with padding_free=True
  data_prep         records/s to validate and tokenize the whole genmedgpt_5k file (load_conversations + encode)
  generation        first-token latency and tokens/s of the generation core (greedy, 64 new tokens)

Throughput counts the training loop only: from the end of the first (warm-up) optimizer step to the end
of the last, data loading and collation included, model loading and data preparation excluded.
The bench data: by default the first records of ChatDoctor's genmedgpt_5k with the original LLaMA tokenizer,
from ../shared/datasets beside the repository (development and CI machines). In a clone without that folder the
bundled data/sft/medical_chat_en.json and the built-in tiny model's SentencePiece tokenizer are used instead,
and the table says so; --data_path takes any alpaca-format file or hub dataset (instruction, input, output).
"""

import contextlib
import datetime
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from medlora.cli import run
from medlora.errors import MedLoRAError
from medlora.paths import DATA_DIR

SHARED = ROOT.parent / "shared" / "datasets"
DATASET = SHARED / "chatdoctor" / "genmedgpt_5k.json"
LLAMA_TOKENIZER = SHARED / "llama-tokenizer" / "tokenizer.model"
DOC_PATH = ROOT / "docs" / "BENCHMARKS.md"
SEED = 0
TRAINING_CONFIGS = ("medlora", "medlora_compile", "alpaca_lora", "trl", "trl_padding_free")
EXTRA_CONFIGS = ("data_prep", "generation")
OURS = ("medlora", "medlora_compile")
PEERS = TRAINING_CONFIGS[len(OURS):]
BENCH = dict(micro_batch_size=8, cutoff_len=512, learning_rate=3e-4, lora_r=8, lora_alpha=16, lora_dropout=0.05,
             lora_target_modules=["q_proj", "v_proj"], cpu_threads=2, new_tokens=64)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# CPU shapes: the model (random weights from CPU_SHAPE, or a built-in), LoRA targets, default records (full, --quick)
CPU_SHAPES = {
    "cpu": dict(model="random", lora_target_modules=["q_proj", "v_proj"], records=256, quick_records=32),
    "smollm2-135m": dict(model="builtin:smollm2-135m-instruct", lora_target_modules=ALL_LINEAR, records=80,
                         quick_records=16),
}
CPU_SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
GPU_SHAPES = {  # the published configs of the two models (weights random here)
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
}
SECTION = "<!-- benchmark:{device}:{edge} -->"


def main(configs: str = ",".join(TRAINING_CONFIGS + EXTRA_CONFIGS), device: str = "cpu", quick: bool = False,
         records: int = 0, shapes: str = "", quant: str = "lora,qlora", no_write: bool = False,
         doc: str = str(DOC_PATH), keep: bool = False, data_path: str = "", precision: str = "auto",
         # worker mode (used by the script itself)
         config: str = "", json_out: str = "", bench_dir: str = "", shape: str = "cpu", quant_mode: str = "lora",
         run_precision: str = "fp32"):
    """Run the benchmark and print (and, unless --no_write, write) the results table.

    Args:
        configs: Comma-separated: medlora, medlora_compile, alpaca_lora, trl, trl_padding_free, data_prep, generation.
        device: cpu (the fixed CPU bench) or cuda (GPU shapes; needs a GPU).
        quick: 32 training records and 512 data-prep records: a smoke test, not a measurement.
        records: Training records per shape (the first N of the data); default 256 (cpu) or 80 (smollm2-135m),
            32 or 16 with --quick.
        shapes: Comma-separated; cpu: cpu, smollm2-135m (default both); cuda: llama-3.2-1b, llama-3.1-8b (default both).
        quant: With --device cuda: lora (bf16 base), qlora (4-bit NF4 base), comma-separated.
        no_write: Print the table only; leave docs/BENCHMARKS.md alone.
        doc: The Markdown file whose marked section receives the table.
        keep: Keep the temporary folder (model, data, worker logs and JSON) and print its path.
        data_path: Training records (alpaca format: instruction, input, output), a file or a hub dataset; default:
            ../shared/datasets/chatdoctor/genmedgpt_5k.json where it exists, else the bundled
            data/sft/medical_chat_en.json.
        precision: CPU precision: auto (fp32, and bf16 autocast too where the CPU has AMX or AVX512-BF16), fp32 or
            bf16 (autocast over fp32 weights); every configuration trains alike. GPU shapes always run bf16.
        config: Worker mode: run this one configuration and write its measurements to --json_out.
        json_out: Worker mode: the JSON file the measurements go to.
        bench_dir: Worker mode: the temporary folder with the bench model and data.
        shape: Worker mode: the model shape to train (cpu, smollm2-135m, or a GPU shape).
        quant_mode: Worker mode: lora or qlora.
        run_precision: Worker mode: fp32 or bf16, the precision of this one run.
    """
    if config:
        return run_worker(config, json_out, bench_dir, device, shape, quant_mode, quick, run_precision)
    names = split_names(configs)
    unknown = [name for name in names if name not in TRAINING_CONFIGS + EXTRA_CONFIGS]
    if unknown or not names:
        raise MedLoRAError(f"--configs: unknown configuration {', '.join(map(repr, unknown)) or '(none)'}; "
                           f"choose from {', '.join(TRAINING_CONFIGS + EXTRA_CONFIGS)}")
    if device not in ("cpu", "cuda"):
        raise MedLoRAError(f"--device: unknown value {device!r}; use cpu or cuda")
    if records and int(records) < 16:
        raise MedLoRAError(f"--records {records}: use at least 16 (two optimizer steps of 8)")
    runs = plan_runs(names, device, shapes, quant, bench_precisions(device, precision))
    counts = {shape: int(records) or shape_records(shape, quick) for shape in dict.fromkeys(s for _, s, _, _ in runs)}
    bench_records = read_bench_records(data_path, max(counts.values()))

    import torch
    from tqdm import tqdm

    if device == "cuda" and not torch.cuda.is_available():
        raise MedLoRAError("--device cuda: no CUDA GPU is available here")
    work = Path(tempfile.mkdtemp(prefix="medlora-bench-"))
    machine = describe_machine(device)
    results = []
    try:
        for run_shape, count in counts.items():
            data_file(work, run_shape).write_text(json.dumps(bench_records[:count], ensure_ascii=False),
                                                  encoding="utf-8")
        machine["bench_data"] = data_path or default_bench_data()
        machine["bench_tokenizer"] = "LLaMA" if LLAMA_TOKENIZER.is_file() else "the tiny model SentencePiece"
        for run_shape in dict.fromkeys(shape_name for _, shape_name, _, _ in runs):
            build_bench_model(work / run_shape, run_shape, device)
        progress = tqdm(runs, desc="benchmark", unit="run")
        for name, run_shape, run_quant, run_precision in progress:
            label = name if device == "cpu" else f"{run_shape} {run_quant} / {name}"
            progress.set_postfix_str(f"{label} ({run_shape}, {run_precision})")
            results.append(run_in_subprocess(work, label, name, run_shape, run_quant, device, quick, run_precision))
        machine["load_after"] = os.getloadavg()
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    reports = {}
    for name in counts if device == "cpu" else [next(iter(counts))]:
        for run_precision in dict.fromkeys(r["precision"] for r in results):
            key = (device if name in ("cpu", *GPU_SHAPES) else f"{device}-{name}") + (
                "-bf16" if device == "cpu" and run_precision == "bf16" else "")
            reports[key] = render_report([r for r in results if (r.get("shape") == name or device == "cuda")
                                          and r["precision"] == run_precision], machine,
                                         min(counts[name], len(bench_records)), device, name, run_precision)
    print("\n" + "\n\n".join(reports.values()))
    failed = [r["label"] for r in results if "error" in r]
    if failed:  # a partial table never replaces a complete one
        raise MedLoRAError(f"{len(failed)} configuration(s) failed: {', '.join(failed)} (their logs above); "
                           f"{doc} left unchanged")
    if not no_write:
        for key, report in reports.items():
            write_section(Path(doc), key, report)
        print(f"\nwritten to {doc} ({', '.join(reports)})")


def split_names(value) -> list:
    """A comma-separated flag (fire turns "a,b" into a tuple)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def bench_precisions(device, precision) -> list:
    """The precisions to measure: bf16 on GPUs; on CPU fp32, and bf16 autocast where the CPU makes it fast."""
    from medlora.models.loading import BF16_CPU_FLAGS, cpu_flags

    if device == "cuda":
        return ["bf16"]
    if precision not in ("auto", "fp32", "bf16"):
        raise MedLoRAError(f"--precision: unknown value {precision!r}; use auto, fp32 or bf16")
    if precision == "auto":
        return ["fp32", "bf16"] if BF16_CPU_FLAGS & cpu_flags() else ["fp32"]
    return [precision]


def plan_runs(names, device, shapes, quant, precisions=("fp32",)) -> list:
    """(configuration, model shape, quantization, precision) for every process to start, in order. On CPU,
    data_prep and generation run once, on the first shape in the first precision."""
    shape_names, quant_modes = split_names(shapes) or list(CPU_SHAPES if device == "cpu" else GPU_SHAPES), split_names(quant)
    if device == "cpu":
        if any(s not in CPU_SHAPES for s in shape_names):
            raise MedLoRAError(f"--shapes {shapes!r}: choose from {', '.join(CPU_SHAPES)} with --device cpu")
        training = [(name, s, "lora", p) for p in precisions for s in shape_names for name in names
                    if name in TRAINING_CONFIGS]
        return training + [(name, shape_names[0], "lora", precisions[0]) for name in names
                           if name not in TRAINING_CONFIGS]
    if not shape_names or any(s not in GPU_SHAPES for s in shape_names):
        raise MedLoRAError(f"--shapes {shapes!r}: choose from {', '.join(GPU_SHAPES)}")
    if not quant_modes or any(q not in ("lora", "qlora") for q in quant_modes):
        raise MedLoRAError(f"--quant {quant!r}: choose from lora, qlora")
    skipped = [name for name in names if name not in TRAINING_CONFIGS]
    if skipped:
        print(f"note: {', '.join(skipped)} run on the CPU bench only; skipped with --device cuda")
    return [(name, s, q, "bf16") for s in shape_names for q in quant_modes for name in names
            if name in TRAINING_CONFIGS]


# ---- bench preparation (parent process) --------------------------------------------------------------------
def shape_records(shape, quick) -> int:
    settings = CPU_SHAPES.get(shape, CPU_SHAPES["cpu"])
    return settings["quick_records"] if quick else settings["records"]


def data_file(bench: Path, shape: str) -> Path:
    return bench / f"train-{shape}.json"


def default_bench_data() -> str:
    return str(DATASET if DATASET.is_file() else DATA_DIR / "sft" / "medical_chat_en.json")


def read_bench_records(data_path: str, records: int) -> list:
    """The first `records` alpaca records of --data_path (a file, a folder or a hub dataset, read by MedLoRA's
    record reader); every configuration trains on the same ones, so they must be in the format all peers read."""
    from medlora.data.records import read_sources

    data_path = data_path or default_bench_data()
    rows = [record for _, source in read_sources(data_path) for _, record in source][:records]
    bad = next((number for number, row in enumerate(rows, 1)
                if not (isinstance(row, dict) and isinstance(row.get("instruction"), str)
                        and isinstance(row.get("output"), str))), None)
    if bad is not None:
        raise MedLoRAError(f"{data_path}: record {bad}: the benchmark needs alpaca records (instruction, input, "
                           "output), which every compared pipeline reads")
    if len(rows) < 16:
        raise MedLoRAError(f"{data_path}: {len(rows)} records; the benchmark needs at least 16")
    return [{"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
            for row in rows]


def bench_tokenizer_model() -> Path:
    """The original LLaMA tokenizer where ../shared has it, else the built-in tiny model's SentencePiece model."""
    if LLAMA_TOKENIZER.is_file():
        return LLAMA_TOKENIZER
    from medlora.models.tiny_model import ensure_tiny_model

    return ensure_tiny_model() / "tokenizer.model"


def build_bench_model(folder: Path, shape: str, device: str) -> None:
    """A built-in model's cached folder (linked), or a random-weight (seed 0) LLaMA-architecture model with the
    original LLaMA tokenizer, saved like a hub checkpoint so that every configuration loads the very same weights."""
    builtin = CPU_SHAPES.get(shape, {}).get("model", "random")
    if builtin != "random":
        from medlora.models.loading import resolve_base_model

        folder.symlink_to(Path(resolve_base_model(builtin)).resolve(), target_is_directory=True)
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True)
    shutil.copy(bench_tokenizer_model(), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # writes tokenizer.json: workers load it fast
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, **(CPU_SHAPE if shape == "cpu" else GPU_SHAPES[shape]))
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the workers need the GPU memory


def run_in_subprocess(work, label, name, shape, quant, device, quick, precision) -> dict:
    json_out, log = work / f"{label.replace(' / ', '-').replace(' ', '-')}-{shape}-{precision}.json", work / "logs"
    log.mkdir(exist_ok=True)
    log_file = log / json_out.with_suffix(".log").name
    command = [sys.executable, str(Path(__file__).resolve()), "--config", name, "--json_out", str(json_out),
               "--bench_dir", str(work), "--device", device, "--shape", shape, "--quant_mode", quant,
               "--run_precision", precision]
    if quick:
        command.append("--quick")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(work / "hf-datasets"),
               PYTHONUNBUFFERED="1")
    if device == "cpu":
        # Idle OpenMP threads sleep instead of spinning, so that CPU time measures work even on a busy machine.
        env.update(OMP_NUM_THREADS=str(BENCH["cpu_threads"]), OMP_WAIT_POLICY="PASSIVE")
    started = time.time()
    with open(log_file, "w") as handle:
        process = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if process.returncode != 0 or not json_out.is_file():
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        print(f"\n{label} failed (exit {process.returncode}); last lines of its log:\n" + "\n".join(tail))
        return dict(label=label, config=name, shape=shape, quant=quant, precision=precision,
                    error=f"exit {process.returncode}")
    result = json.loads(json_out.read_text())
    result.update(label=label, wall_s=time.time() - started)
    return result


# ---- worker mode: one configuration per process --------------------------------------------------------------
def run_worker(config, json_out, bench_dir, device, shape, quant, quick, precision):
    if config == "medlora":
        from medlora.training.malloc import restart_with_lean_malloc

        restart_with_lean_malloc()  # what `python finetune.py` does first (re-executes this worker once)
    import torch

    if device == "cpu":
        torch.set_num_threads(BENCH["cpu_threads"])
    bench = Path(bench_dir)
    model_dir = bench / shape
    if config == "data_prep":
        result = measure_data_prep(model_dir, bench, limit=512 if quick else None)
    elif config == "generation":
        result = measure_generation(model_dir, data_file(bench, shape), device, repeats=1 if quick else 3)
    else:
        result = measure_training(config, model_dir, bench, device, shape, quant, precision)
    result.update(config=config, shape=shape, quant=quant, precision=precision,
                  max_rss_mib=result.get("max_rss_mib") or max_rss_mib())
    if device == "cuda":
        result["max_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(json_out).write_text(json.dumps(result, indent=1))


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_records(bench: Path, shape: str) -> list:
    """The training records in the order every configuration sees them: finetune.py's seeded shuffle."""
    records = json.loads(data_file(bench, shape).read_text(encoding="utf-8"))
    random.Random(SEED).shuffle(records)
    return records


def training_arguments(cls, output_dir, device, precision, **overrides):
    """The settings every configuration shares (finetune.py sets the same ones through its flags). bf16 on CPU is
    the Trainer's autocast over fp32 weights, as MedLoRA's --precision bf16-mixed."""
    bf16 = precision == "bf16"
    return cls(output_dir=str(output_dir), per_device_train_batch_size=BENCH["micro_batch_size"],
               gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=BENCH["learning_rate"],
               warmup_steps=0, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", eval_strategy="no",
               report_to=[], seed=SEED, data_seed=SEED, bf16=bf16, fp16=False, gradient_checkpointing=False,
               use_cpu=device == "cpu",
               **overrides)


def lora_targets(shape) -> list:
    return list(CPU_SHAPES.get(shape, {}).get("lora_target_modules", BENCH["lora_target_modules"]))


def lora_config(shape):
    from peft import LoraConfig

    return LoraConfig(r=BENCH["lora_r"], lora_alpha=BENCH["lora_alpha"], lora_dropout=BENCH["lora_dropout"],
                      target_modules=lora_targets(shape), bias="none", task_type="CAUSAL_LM")


def load_peer_model(model_dir, device, quant):
    """The base model as a peer loads it: same dtype, same 4-bit settings as MedLoRA."""
    import torch
    from peft import prepare_model_for_kbit_training

    from medlora.models.loading import load_base_model

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_base_model(str(model_dir), dtype, load_in_4bit=quant == "qlora", device=device)
    if quant == "qlora":  # gradient checkpointing stays off everywhere, as in finetune.py
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


class TrainingMeter:
    """Counts the tokens of every collated batch and times optimizer steps, inside any Trainer."""

    def __init__(self):
        from transformers import TrainerCallback

        step_ends = self.step_ends = []  # (wall clock, process CPU time) at the end of every optimizer step
        step_begins = self.step_begins = []  # wall clock at the start of every optimizer step
        self.batches = []  # (positions, non-pad tokens, trained tokens) of every collated batch

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                step_begins.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                step_ends.append((time.perf_counter(), time.process_time()))

        self.callback = Callback()

    def counting(self, collator):
        def collate(examples):
            batch = collator(examples)
            labels = batch["labels"]
            total = batch["input_ids"].numel()
            real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else total
            self.batches.append((total, real, int((labels[:, 1:] != -100).sum())))
            return batch

        return collate

    @contextlib.contextmanager
    def attached_to_every_trainer(self):
        """finetune.train builds its own Trainer: hook the meter into Trainer.train for the duration."""
        import transformers

        original = transformers.Trainer.train

        def train(trainer, *args, **kwargs):
            trainer.add_callback(self.callback)
            trainer.data_collator = self.counting(trainer.data_collator)
            return original(trainer, *args, **kwargs)

        transformers.Trainer.train = train
        try:
            yield
        finally:
            transformers.Trainer.train = original

    def summary(self) -> dict:
        steps = len(self.step_ends)
        if steps < 2 or len(self.batches) != steps:
            raise RuntimeError(f"expected one batch per optimizer step and 2+ steps, got {len(self.batches)} "
                               f"batches for {steps} steps")
        seconds, cpu_seconds = (end - start for start, end in zip(self.step_ends[0], self.step_ends[-1]))
        _, real, trained = (sum(column) for column in zip(*self.batches[1:]))  # the warm-up step excluded
        positions, non_pad, trained_per_batch = (list(column) for column in zip(*self.batches))
        return dict(steps=steps, measured_seconds=seconds, trained_tokens_per_s=trained / seconds,
                    cpu_seconds=cpu_seconds, trained_tokens_per_cpu_s=trained / cpu_seconds,
                    real_tokens_per_s=real / seconds, padded_fraction=1 - sum(non_pad) / sum(positions),
                    trained_tokens=sum(trained_per_batch), real_tokens=sum(non_pad),
                    batch_positions=positions, batch_trained_tokens=trained_per_batch,
                    step_seconds=[end[0] - begin for begin, end in zip(self.step_begins, self.step_ends)])


def measure_training(config, model_dir, bench, device, shape, quant, precision) -> dict:
    import torch

    meter = TrainingMeter()
    output_dir = bench / "runs" / f"{config}-{model_dir.name}-{quant}-{precision}"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with meter.attached_to_every_trainer():
        if config in OURS:
            trainer = train_medlora(model_dir, bench, output_dir, device, shape, quant, precision,
                                    torch_compile=config == "medlora_compile")
        elif config == "alpaca_lora":
            trainer = train_alpaca_lora(model_dir, bench, output_dir, device, shape, quant, precision)
        else:
            trainer = train_trl(model_dir, bench, output_dir, device, shape, quant, precision,
                                padding_free=config == "trl_padding_free")
    history = trainer.state.log_history
    result = meter.summary()
    if config in OURS and device == "cpu":  # max_rss is taken before: the replay's inputs are not training's
        result["max_rss_mib"] = max_rss_mib()
        result["replay_step_seconds"] = replay_frozen_products(trainer.model, meter.batches, precision)
    result.update(final_loss=next(h["train_loss"] for h in history if "train_loss" in h),
                  last_step_loss=[h["loss"] for h in history if "loss" in h][-1],
                  train_runtime_s=next(h["train_runtime"] for h in history if "train_runtime" in h))
    return result


def replay_frozen_products(model, batches, precision) -> list:
    """Seconds per step of the work no LoRA trainer can avoid: the frozen layers' matrix products on the step's
    tokens, forward and backward (input gradients only: frozen weights get none), and the output layer's for the
    labelled positions, nothing else, on warm inputs, in the training's precision. The step against this replay
    says how much of the step is everything else (LoRA branches, attention, norms, the loss, the optimizer)."""
    import torch

    output = model.get_output_embeddings().weight
    frozen = [p for name, p in model.named_parameters()
              if not p.requires_grad and p.ndim == 2 and "embed" not in name and p is not output]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    inputs = {}

    def random(rows, columns):
        if (rows, columns) not in inputs:
            inputs[rows, columns] = torch.randn(rows, columns, dtype=output.dtype)
        return inputs[rows, columns]

    seconds = []
    with torch.no_grad(), autocast:
        for positions, _, trained in batches:
            products = [(weight, positions) for weight in frozen] + [(output, trained)]
            for weight, rows in products:  # the inputs made before the clock starts
                random(rows, weight.shape[1]), random(rows, weight.shape[0])
            started = time.perf_counter()
            for weight, rows in products:
                torch.nn.functional.linear(random(rows, weight.shape[1]), weight)  # forward: x W^T
                torch.matmul(random(rows, weight.shape[0]), weight)  # backward: dY W
            seconds.append(time.perf_counter() - started)
    return seconds


def train_medlora(model_dir, bench, output_dir, device, shape, quant, precision, torch_compile=False):
    import finetune

    result = finetune.train(
        base_model=str(model_dir), data_path=str(data_file(bench, shape)), output_dir=str(output_dir),
        prompt_template_name="alpaca", batch_size=BENCH["micro_batch_size"],
        micro_batch_size=BENCH["micro_batch_size"], num_epochs=1, learning_rate=BENCH["learning_rate"],
        warmup_steps=0, cutoff_len=BENCH["cutoff_len"], val_set_size=0, seed=SEED, lora_r=BENCH["lora_r"],
        lora_alpha=BENCH["lora_alpha"], lora_dropout=BENCH["lora_dropout"],
        lora_target_modules=",".join(lora_targets(shape)),
        precision="bf16" if device == "cuda" else "bf16-mixed" if precision == "bf16" else "fp32",
        load_in_4bit=quant == "qlora", logging_steps=1, save_steps=10**9, torch_compile=torch_compile)
    return result.trainer


def train_alpaca_lora(model_dir, bench, output_dir, device, shape, quant, precision):
    """alpaca-lora's finetune.py, re-implemented step by step (tloen/alpaca-lora). Its unseeded
    `data.shuffle()` is replaced by finetune.py's seeded shuffle so that every configuration sees the
    same batches; its torch.compile and 8-bit loading are left out (see docs/BENCHMARKS.md)."""
    import transformers
    from datasets import Dataset
    from peft import get_peft_model

    from medlora.data.templates import PromptTemplate

    cutoff_len = BENCH["cutoff_len"]
    prompter = PromptTemplate.load("alpaca")  # generate_prompt is alpaca-lora's Prompter.generate_prompt
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token_id = 0  # unk. we want this to be different from the eos token
    tokenizer.padding_side = "left"  # Allow batched inference

    def tokenize(prompt, add_eos_token=True):
        result = tokenizer(prompt, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
        if (result["input_ids"][-1] != tokenizer.eos_token_id and len(result["input_ids"]) < cutoff_len
                and add_eos_token):
            result["input_ids"].append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = result["input_ids"].copy()
        return result

    def generate_and_tokenize_prompt(data_point):
        full_prompt = prompter.generate_prompt(data_point["instruction"], data_point["input"], data_point["output"])
        tokenized_full_prompt = tokenize(full_prompt)
        user_prompt = prompter.generate_prompt(data_point["instruction"], data_point["input"])
        tokenized_user_prompt = tokenize(user_prompt, add_eos_token=True)
        user_prompt_len = len(tokenized_user_prompt["input_ids"]) - 1  # add_eos_token: the EOS is not the prompt's
        tokenized_full_prompt["labels"] = [-100] * user_prompt_len + tokenized_full_prompt["labels"][user_prompt_len:]
        return tokenized_full_prompt

    transformers.set_seed(SEED)
    model = load_peer_model(model_dir, device, quant)
    model = get_peft_model(model, lora_config(shape))
    train_data = Dataset.from_list(bench_records(bench, shape)).map(generate_and_tokenize_prompt)
    trainer = transformers.Trainer(
        model=model, train_dataset=train_data,
        args=training_arguments(transformers.TrainingArguments, output_dir, device, precision, optim="adamw_torch"),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt",
                                                          padding=True),
    )
    model.config.use_cache = False
    trainer.train()
    return trainer


def train_trl(model_dir, bench, output_dir, device, shape, quant, precision, padding_free):
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from medlora.data.templates import PromptTemplate

    template = PromptTemplate.load("alpaca")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = tokenizer.unk_token  # as alpaca-lora and MedLoRA: a pad token that is not EOS
    rows = [{"prompt": template.generate_prompt(r["instruction"], r["input"]), "completion": r["output"] +
             tokenizer.eos_token} for r in bench_records(bench, shape)]
    transformers.set_seed(SEED)
    args = training_arguments(SFTConfig, output_dir, device, precision, packing=False, padding_free=padding_free,
                              completion_only_loss=True,
                              max_length=None if padding_free else BENCH["cutoff_len"])  # TRL: padding-free needs None
    trainer = SFTTrainer(model=load_peer_model(model_dir, device, quant), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora_config(shape))
    trainer.train()
    return trainer


def measure_data_prep(model_dir, bench, limit=None) -> dict:
    from medlora.data.records import load_conversations
    from medlora.data.templates import PromptTemplate
    from medlora.data.tokenization import ConversationEncoder
    from medlora.models.loading import load_tokenizer

    path = Path(default_bench_data())  # the whole file
    if limit:  # --quick: a slice of the file
        path = bench / "data-prep-slice.json"
        path.write_text(json.dumps(json.loads(Path(default_bench_data()).read_text(encoding="utf-8"))[:limit]),
                        encoding="utf-8")
    tokenizer = load_tokenizer(str(model_dir))
    encoder = ConversationEncoder(tokenizer, PromptTemplate.load("alpaca"), BENCH["cutoff_len"])
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        conversations = load_conversations(str(path)).conversations
        loaded = time.perf_counter()
        report = encoder.encode(conversations)
        timings.append((time.perf_counter() - started, loaded - started))
    total, validate = min(timings)
    return dict(records=len(conversations), records_per_s=len(conversations) / total, seconds=total,
                validate_seconds=validate, tokens=report.tokens, trained_tokens=report.trained_tokens)


def measure_generation(model_dir, train_file, device, repeats) -> dict:
    """The generation core's own streaming path (medlora.generation.ChatModel), timed by a forward hook:
    one forward per new token, the first one being the prefill."""
    from medlora.inference.generation import ChatModel, GenerationSettings

    chat = ChatModel.load(base_model=str(model_dir), prompt_template_name="alpaca", device=device,
                          precision="fp32" if device == "cpu" else "bf16")
    record = json.loads(Path(train_file).read_text(encoding="utf-8"))[0]
    messages = [{"role": "user", "content": record["instruction"], "input": record["input"]}]
    settings = GenerationSettings(temperature=0, max_new_tokens=BENCH["new_tokens"], repetition_penalty=1.0)
    forward_ends = []
    chat.model.register_forward_hook(lambda *_: forward_ends.append(time.perf_counter()))
    chat.answer(messages, settings=GenerationSettings(temperature=0, max_new_tokens=4, repetition_penalty=1.0))
    runs = []
    for _ in range(repeats):
        forward_ends.clear()
        started = time.perf_counter()
        chat.answer(messages, settings=settings)
        finished = time.perf_counter()
        tokens = len(forward_ends)
        runs.append(dict(first_token_s=forward_ends[0] - started, new_tokens=tokens,
                         decode_tokens_per_s=(tokens - 1) / (forward_ends[-1] - forward_ends[0]),
                         tokens_per_s=tokens / (finished - started)))
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    median["prompt_tokens"] = len(chat.prompt_for(messages, max_new_tokens=BENCH["new_tokens"]).input_ids)
    median["api"] = "medlora.inference.generation.ChatModel.answer (greedy, streamed through TextIteratorStreamer)"
    return median


# ---- report ------------------------------------------------------------------------------------------------
def describe_machine(device) -> dict:
    import peft
    import torch
    import transformers
    import trl

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    from medlora.models.loading import cpu_flags

    vector = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in cpu_flags()]
    return dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), cpu=cpu, cores=os.cpu_count(), gpu=gpu,
                cpu_flags=", ".join(vector) or "none of avx2, avx512f, avx512_bf16, amx_bf16",
                versions=f"torch {torch.__version__}, transformers {transformers.__version__}, "
                         f"peft {peft.__version__}, trl {trl.__version__}", load_before=os.getloadavg())


def ratio(a, b) -> float:
    return a / b if b else float("nan")


SHAPE_TITLES = {"cpu": "random-weight LLaMA architecture (hidden 256, 4 layers, vocabulary 32,000)",
                "smollm2-135m": "SmolLM2-135M-Instruct, real weights (builtin:smollm2-135m-instruct: 30 layers, "
                                "hidden 576, vocabulary 49,152, its own tokenizer)"}


def render_report(results, machine, records, device, shape="cpu", precision="fp32") -> str:
    load = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    threads = f", CPU flags {machine['cpu_flags']}, CPU training on {BENCH['cpu_threads']} threads"
    lines = [f"Measured {machine['date']} on {machine['gpu'] or machine['cpu']} "
             f"({machine['cores']} cores{threads if device == 'cpu' else ''}); "
             f"{machine['versions']}; load average (1, 5, 15 min) {load(machine['load_before'])} before, "
             f"{load(machine.get('load_after', machine['load_before']))} after.",
             f"Data: {machine.get('bench_data', default_bench_data())} ({records} records), tokenizer: "
             f"{machine.get('bench_tokenizer', 'LLaMA')}.", ""]
    if shape == "smollm2-135m":  # a built-in model brings its own tokenizer
        lines[1] = lines[1].split(", tokenizer: ")[0] + ", tokenizer: SmolLM2's own."
    training = [r for r in results if r["config"] in TRAINING_CONFIGS]
    memory = "peak CUDA MiB" if device == "cuda" else "peak RSS MiB"
    precision = "bf16 autocast over fp32 weights" if device == "cpu" and precision == "bf16" else precision
    model = f"Model: {SHAPE_TITLES[shape]}. " if device == "cpu" else ""
    lines += [f"{model}Training: the first {records} records of the data (alpaca prompt, prompt masked, cutoff "
              f"{BENCH['cutoff_len']}), one epoch, micro-batch {BENCH['micro_batch_size']}, {precision}, LoRA r="
              f"{BENCH['lora_r']} on {'/'.join(lora_targets(shape))}, lr {BENCH['learning_rate']} without "
              f"warmup, seed {SEED}. Tokens/s count the training loop after its first step.",
              "", f"| configuration | trained tok/s | real tok/s | padded | {memory} | final loss | trained tokens | "
              "steps | trained tok per CPU-s | slowest step / median |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in training:
        if "error" in r:
            lines.append(f"| {r['label']} | failed ({r['error']}) | | | | | | | | |")
            continue
        per_cpu_second = f"{r['trained_tokens_per_cpu_s']:.0f}" if device == "cpu" else "-"
        lines.append(f"| {r['label']} | {r['trained_tokens_per_s']:.0f} | {r['real_tokens_per_s']:.0f} | "
                     f"{100 * r['padded_fraction']:.1f}% | {peak_memory(r, device):.0f} | {r['final_loss']:.4f} | "
                     f"{r['trained_tokens']} | {r['steps']} | {per_cpu_second} | "
                     f"{max(r['step_seconds']) / statistics.median(r['step_seconds']):.2f} |")
    groups = {}
    for r in training:
        if "error" not in r:
            groups.setdefault((r["shape"], r["quant"]), {})[r["config"]] = r
    for (shape, quant), group in groups.items():
        suffix = "" if device == "cpu" else f" ({shape} {quant})"
        same = len({tuple(r["batch_trained_tokens"]) for r in group.values()}) == 1
        lines += ["", f"Same batches in every configuration{suffix} (trained tokens of each step agree): "
                      f"{'yes' if same else 'NO: the comparison is not like for like'}."]
        lines += ratio_lines(group, device, suffix)
    for r in results:
        if r["config"] == "data_prep" and "error" not in r:
            lines += ["", f"Data preparation (load_conversations + ConversationEncoder.encode, LLaMA tokenizer): "
                      f"{r['records']} records in {r['seconds']:.2f} s = **{r['records_per_s']:.0f} records/s** "
                      f"(validation {r['validate_seconds']:.2f} s; {r['tokens']} tokens)."]
        if r["config"] == "generation" and "error" not in r:
            lines += ["", f"Generation on the bench model ({r['api']}; prompt {r['prompt_tokens']} tokens, "
                      f"{r['new_tokens']:.0f} new tokens, median of runs): first token **{1000 * r['first_token_s']:.0f} ms**, "
                      f"decoding **{r['decode_tokens_per_s']:.1f} tokens/s**, {r['tokens_per_s']:.1f} tokens/s overall."]
    return "\n".join(lines)


def peak_memory(result, device) -> float:
    return result["max_cuda_allocated_mib"] if device == "cuda" else result["max_rss_mib"]


def replay_lines(group) -> list:
    """MedLoRA's timed steps (the warm-up excluded), with and without --torch_compile, against the same steps'
    frozen products alone; in fp32 the target of issue 32 (the step within 1.35x of them)."""
    lines = []
    for name in OURS:
        ours = group.get(name, {})
        replay = ours.get("replay_step_seconds")
        if not replay:
            continue
        over = ratio(sum(ours["step_seconds"][1:]), sum(replay[1:]))
        line = (f"{name}: the training step against the frozen products alone, replayed on the same tokens: "
                f"{over:.2f}x ({sum(ours['step_seconds'][1:]):.1f} s against {sum(replay[1:]):.1f} s for the timed "
                "steps)")
        if name == "medlora_compile":
            line += f"; its first step, compiling included, took {ours['step_seconds'][0]:.1f} s"
        lines.append(f"- {'PASS' if over <= 1.35 else 'FAIL'}: {line}, target <= 1.35x" if ours["precision"] == "fp32"
                     else f"- {line}")
    return lines


def ratio_lines(group, device, suffix) -> list:
    """MedLoRA against each peer, and the targets of issue 32 (checked on the CPU bench)."""
    ours = group.get("medlora")
    peers = {name: group[name] for name in PEERS if name in group}
    if ours and not peers:
        return ["", "Target (issue 32):", "", *replay_lines(group)] if replay_lines(group) else []
    if not ours or not peers:
        return []
    lines = ["", f"| MedLoRA vs{suffix} | trained tok/s ratio | per CPU-s ratio | peak memory ratio | "
             "final loss: peer | MedLoRA - peer |", "|---|---:|---:|---:|---:|---:|"]
    for name, peer in peers.items():
        lines.append(f"| {name} | {ratio(ours['trained_tokens_per_s'], peer['trained_tokens_per_s']):.2f}x | "
                     f"{cpu_ratio(ours, peer, device)} | "
                     f"{ratio(peak_memory(ours, device), peak_memory(peer, device)):.2f}x | {peer['final_loss']:.4f} | "
                     f"{100 * ratio(ours['final_loss'] - peer['final_loss'], peer['final_loss']):+.2f}% |")
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines += ["", f"Targets{suffix} (issue 32):", ""]
    alpaca = peers.get("alpaca_lora")
    lines += replay_lines(group)
    if device != "cpu" or ours["precision"] != "fp32":
        slowest = min(ratio(ours["trained_tokens_per_s"], peer["trained_tokens_per_s"]) for peer in peers.values())
        lines.append(f"- {verdict(slowest > 1)}: trained tokens/s ahead of every peer (the closest: {slowest:.2f}x)")
    lowest_peer = min(peak_memory(p, device) for p in peers.values())
    lines.append(f"- {verdict(peak_memory(ours, device) < lowest_peer)}: peak memory below every peer's "
                 f"({peak_memory(ours, device):.0f} MiB vs lowest peer {lowest_peer:.0f} MiB)")
    if alpaca:
        gap = abs(ratio(ours["final_loss"] - alpaca["final_loss"], alpaca["final_loss"]))
        lines.append(f"- {verdict(gap <= 0.01)}: final loss within 1% of alpaca-lora's ({100 * gap:.2f}%)")
    return lines


def cpu_ratio(ours, peer, device) -> str:
    if device != "cpu":
        return "-"
    return f"{ratio(ours['trained_tokens_per_cpu_s'], peer['trained_tokens_per_cpu_s']):.2f}x"


def write_section(doc: Path, device: str, report: str) -> None:
    """Replace the marked section for this device in the Markdown file, keeping everything else. The markers
    count only on lines of their own, so prose that quotes them is left alone."""
    begin, end = (SECTION.format(device=device, edge=edge) for edge in ("begin", "end"))
    lines = doc.read_text(encoding="utf-8").splitlines() if doc.is_file() else ["# Benchmarks"]
    block = [begin, report, end]
    if begin in lines and end in lines[lines.index(begin):]:
        first = lines.index(begin)
        last = lines.index(end, first)
        lines[first:last + 1] = block
    else:
        lines += ["", *block]
    doc.parent.mkdir(parents=True, exist_ok=True)
    staging = doc.with_name(doc.name + ".tmp")
    staging.write_text("\n".join(lines) + "\n", encoding="utf-8")
    staging.replace(doc)


if __name__ == "__main__":
    run(main)  # flags checked before any work: a misspelt one would otherwise start the whole bench
