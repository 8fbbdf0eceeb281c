"""The flags that several stages share, each declared once: name, default, type and description.

A stage composes the groups it needs with `@stage_flags(...)` (medlora/flags.py), changing a default with
`.but(...)` or leaving flags out with `.without(...)`, and adds its own. One name per concept in every script.
"""

from medlora.flags import Flag, FlagGroup

MODEL = FlagGroup(
    "model",
    base_model=Flag("", str, "Hub id, local folder, or a built-in model: builtin:smollm2-135m-instruct "
                             "(SmolLM2-135M-Instruct, real weights, Apache-2.0) or builtin:tiny-llama (random toy for "
                             "tests); see docs/models.md. Default: the base the adapter was trained on, else "
                             "builtin:smollm2-135m-instruct."),
    lora_weights=Flag("", str, "A LoRA adapter folder written by a MedLoRA stage (or a hub adapter id); empty: the base "
                               "model alone."),
    prompt_template_name=Flag("", str, "A template in templates/ or a template .json; default: the adapter's "
                                       "(medlora_run.json), else the base model's own (chat for SmolLM2), else alpaca. "
                                       "Alias: --prompt_template."),
    precision=Flag("auto", str, "auto (GPU: bf16, else fp16; CPU: bf16 autocast where it has AMX, else "
                                "fp32), fp32, bf16, bf16-mixed (bf16 autocast, fp32 weights) or fp16."),
    load_in_4bit=Flag(False, bool, "QLoRA: load the base in 4-bit NF4 with double quantization (bitsandbytes). "
                                   "Alias: --load_4bit."),
    load_in_8bit=Flag(False, bool, "Load the base in 8-bit (bitsandbytes). Alias: --load_8bit."),
    trust_remote_code=Flag(False, bool, "Run the model repository's own Python code (only for repositories you "
                                        "trust)."),
)

DEVICE = FlagGroup(
    "device",
    device=Flag("", str, "cuda, cuda:1, mps or cpu; default: the first available of these."),
)

DATA = FlagGroup(
    "data",
    data_path=Flag("", str, "A .json/.jsonl/.csv/.parquet file, a folder of them, or a hub dataset name."),
    output_dir=Flag("", str, "Where the adapter, tokenizer, medlora_run.json and checkpoints go."),
    field_map=Flag("", str, "JSON mapping our field names to your columns, e.g. "
                            "'{\"input\": \"question\", \"output\": \"answer\"}'."),
    skip_bad_records=Flag(False, bool, "Drop invalid records (listed and counted by reason in the summary) instead "
                                       "of stopping with a list of them."),
)

HYGIENE = FlagGroup(
    "data hygiene (docs/data_hygiene.md); everything is counted in the data summary, the flags change the data",
    dedup=Flag(False, bool, "Drop exact duplicates (after case and whitespace folding) and near duplicates (Jaccard "
                            ">= 0.8 of word 5-shingles, MinHash) of an earlier record; the first copy stays."),
    contamination_check=Flag("data/eval", str, "Evaluation question files (a file, a folder or a comma-separated "
                                                "list, as evaluate.py reads them) that training records must not "
                                                "share a 13-word sequence with; 'none' to skip. Relative paths: "
                                                "from the current folder, else from the MedLoRA folder."),
    decontaminate=Flag(False, bool, "Drop the training records that share text with an evaluation question."),
    scrub_pii=Flag(False, bool, "Replace e-mail addresses, phone numbers, URLs, IP addresses and ID-like numbers "
                                "in every field with typed placeholders ([EMAIL], [PHONE], ...)."),
)

TRAINING = FlagGroup(
    "training hyperparameters",
    batch_size=Flag(32, int, "Examples per optimizer step, all processes together."),
    micro_batch_size=Flag(4, int, "Examples per forward pass on one device; gradient accumulation makes up "
                                  "--batch_size."),
    num_epochs=Flag(1, int, "Passes over the training examples."),
    max_steps=Flag(-1, int, "If > 0, stop after this many optimizer steps (overrides num_epochs)."),
    learning_rate=Flag(3e-4, float, "Peak learning rate (linear warmup, then linear decay)."),
    warmup_ratio=Flag(0.05, float, "Fraction of the optimizer steps spent in linear warmup."),
    warmup_steps=Flag(None, int | None, "Optimizer steps of linear warmup, 0 for none; when given it overrides "
                                        "--warmup_ratio."),
    cutoff_len=Flag(512, int, "Maximum tokens per example; longer ones are truncated (and dropped if nothing "
                              "trained is left)."),
    val_set_size=Flag(0.05, float, "Examples held out for validation: a count, or a fraction when below 1; 0 for "
                                   "none."),
    seed=Flag(42, int, "Seed for the split, the shuffling, sampling, LoRA initialisation and dropout."),
    gradient_checkpointing=Flag(False, bool, "Recompute activations in the backward pass (non-reentrant): less "
                                             "memory, slower (about one more forward pass per step)."),
)

SPEED = FlagGroup(
    "speed",
    torch_compile=Flag(False, bool, "Compile the decoder layers for training (torch.compile, one compilation for "
                                    "all layers, attention eager): fp32 steps on SmolLM2 13-18% faster on a 2-core "
                                    "Xeon after 16-50 s of compiling at the start (measured 2026-12-07, "
                                    "docs/BENCHMARKS.md); pays on runs of more than a few minutes. Needs a C++ "
                                    "compiler."),
)

LORA = FlagGroup(
    "lora hyperparameters",
    lora_r=Flag(8, int, "LoRA rank (of a fresh adapter)."),
    lora_alpha=Flag(16, int, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."),
    lora_dropout=Flag(0.05, float, "Dropout on the LoRA input."),
    lora_target_modules=Flag(None, str | list | None, "Module names (comma-separated or a list), or all-linear; "
                                                      "default: the architecture's usual attention projections."),
)

CHECKPOINTS = FlagGroup(
    "logging, evaluation, checkpoints",
    logging_steps=Flag(10, int, "Log the training metrics every this many optimizer steps."),
    eval_steps=Flag(200, int, "Evaluate on the validation split every this many optimizer steps."),
    save_steps=Flag(200, int, "Write a resumable checkpoint every this many optimizer steps."),
    save_total_limit=Flag(3, int, "Keep at most this many checkpoints."),
    report_to=Flag("none", str, "none, tensorboard (logs under output_dir/runs) or wandb."),
    wandb_project=Flag("", str, "Weights & Biases project; setting it turns on wandb reporting."),
    wandb_run_name=Flag("", str, "Weights & Biases run name."),
    wandb_watch=Flag("", str, "Weights & Biases model watching: false, gradients or all."),
    wandb_log_model=Flag("", str, "Upload checkpoints to Weights & Biases: false or true."),
    resume_from_checkpoint=Flag(None, str | bool | None, "A checkpoint folder to resume from, or True for the newest "
                                                         "complete one in output_dir."),
    overwrite_output_dir=Flag(False, bool, "Train into an output_dir that already holds a finished run (refused "
                                           "otherwise, unless resuming)."),
)

GENERATION = FlagGroup(
    "generation",
    temperature=Flag(0.7, float | None, "Sampling temperature; 0 for greedy decoding (then top_p and top_k do not "
                                        "apply)."),
    top_p=Flag(0.9, float, "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."),
    top_k=Flag(40, int, "Sample among the k most likely tokens; 0 for no limit."),
    num_beams=Flag(1, int, "Beam search with this many beams (> 1: the answer is printed at once, not streamed)."),
    max_new_tokens=Flag(256, int, "At most this many tokens per answer."),
    repetition_penalty=Flag(1.1, float, "Penalty (> 1) on tokens already in the conversation; 1 for none."),
    system=Flag(None, str | None, "System prompt; default: the template's."),
)

KNOWLEDGE = FlagGroup(
    "knowledge",
    knowledge_path=Flag("", str, "A .csv/.jsonl/.json/.txt/.md file or a folder of them to answer from "
                                 "(docs/retrieval.md)."),
    knowledge_top_k=Flag(3, int, "Passages put into the prompt for each question."),
)

EXPORT = FlagGroup(
    "export",
    base_model=Flag("", str, "Hub id, local folder or builtin:NAME to merge into; empty: the base the adapter was "
                             "trained on (its medlora_run.json, else adapter_config.json)."),
    lora_weights=Flag("./lora-medlora", str, "The adapter folder a MedLoRA stage wrote."),
    output_dir=Flag("", str, "Where the export is written; refused when not empty unless --force."),
    force=Flag(False, bool, "Replace a non-empty output_dir."),
    device=Flag("cpu", str, "Where to merge and check: cpu, or cuda when the model fits in GPU memory."),
    dtype=Flag("auto", str, "auto (the base checkpoint's own dtype), float16, bfloat16 or float32."),
    trust_remote_code=MODEL.flags["trust_remote_code"],
)
