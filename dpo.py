"""Preference tuning (DPO, IPO, ORPO or SimPO) of a medical chat model with LoRA or QLoRA, on TRL.

    python dpo.py --lora_weights ./lora-medlora           # continue the SFT adapter on data/preference/
    python dpo.py --lora_weights ./lora-medlora --data_path ../shared/datasets/medicalgpt/dpo_zh_500.jsonl \
        --output_dir ./dpo-medlora --loss dpo --beta 0.1
    python dpo.py --base_model ./hf_ckpt --prompt_template_name alpaca --loss orpo   # merged model, fresh LoRA
    python dpo.py --base_model meta-llama/Llama-3.1-8B-Instruct --prompt_template_name llama3 --load_in_4bit
    torchrun --nproc_per_node=4 dpo.py --lora_weights ./lora-medlora --data_path ... --output_dir ...
    python dpo.py --help                                  # every flag

Data: {"conversations": [... ending with the human turn], "chosen", "rejected"} (MedicalGPT) or
{"prompt", "chosen", "rejected"}; every record is validated before the model loads. Prompts are
rendered with the SFT adapter's prompt template (from its medlora_run.json) and tokenized exactly as
finetune.py tokenizes them. Starting from --lora_weights, that adapter keeps training, and the DPO/IPO
reference is a frozen copy of it (TRL adds it beside the trainable one: adapter-sized, not a second
model); with a fresh LoRA the reference is the model with the adapter disabled. ORPO and SimPO need
no reference. The reward accuracy and margin on the validation pairs (or the training pairs when
there are none) are reported before and after training. The output folder is an adapter that
chat.py, generate.py and evaluate.py load with --lora_weights and no other flag.
"""

import logging
import time

from medlora import cli
from medlora.data.records import usage_lines
from medlora.data.templates import PromptTemplate
from medlora.errors import MedLoRAError
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "preference")
LOSSES = {"dpo": "sigmoid", "ipo": "ipo", "orpo": None, "simpo": None}  # our name -> TRL's DPOConfig loss_type
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
logger = logging.getLogger("dpo")


def train(
    # model and data
    base_model: str = "",
    lora_weights: str = "",
    data_path: str = DEFAULT_DATA,
    output_dir: str = "./dpo-medlora",
    field_map: str = "",
    skip_bad_records: bool = False,
    prompt_template_name: str = "",
    # preference loss
    loss: str = "dpo",
    beta: float | None = None,
    simpo_gamma: float = 1.0,
    # training hyperparameters
    batch_size: int = 16,
    micro_batch_size: int = 2,
    num_epochs: int = 1,
    max_steps: int = -1,
    learning_rate: float = 5e-5,
    warmup_steps: int = 10,
    cutoff_len: int = 512,
    val_set_size: float = 0.05,
    seed: int = 42,
    # lora hyperparameters (a fresh adapter only: --lora_weights keeps its own)
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list | None = None,
    # model loading
    precision: str = "auto",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    # logging, evaluation, checkpoints
    logging_steps: int = 10,
    eval_steps: int = 100,
    save_steps: int = 100,
    save_total_limit: int = 3,
    report_to: str = "none",
    wandb_project: str = "",
    wandb_run_name: str = "",
    resume_from_checkpoint: str | bool | None = None,
):
    """Tune a chat model on preference pairs from DATA_PATH and save the adapter to OUTPUT_DIR.

    Returns the trainer when called from Python.

    Args:
        base_model: Hub id or local folder of a causal LM. Default: the base of --lora_weights, else builtin:smollm2-135m-instruct.
        lora_weights: The SFT adapter from finetune.py to continue (and, for DPO/IPO, the frozen reference); empty for a fresh LoRA.
        data_path: A .json/.jsonl/.csv/.parquet file of preference pairs, a folder of them, or a hub dataset name.
        output_dir: Where the adapter, tokenizer, medlora_run.json and checkpoints go.
        field_map: JSON mapping our field names to your columns, e.g. '{"prompt": "question", "chosen": "good"}'.
        skip_bad_records: Drop invalid pairs (listed and counted by reason in the summary) instead of stopping with a list of them.
        prompt_template_name: A template in templates/, or a path to a template .json. Default: the adapter's, else alpaca.
        loss: dpo (sigmoid DPO), ipo, orpo (odds ratio + SFT loss, no reference) or simpo (length-normalised, no reference).
        beta: Strength of the preference term. Default: 0.1 for dpo, ipo and orpo (ORPO's lambda), 2.0 for simpo.
        simpo_gamma: SimPO's target reward margin gamma (used with --loss simpo only).
        batch_size: Pairs per optimizer step, all processes together.
        micro_batch_size: Pairs per forward pass on one device; accumulation makes up the rest.
        num_epochs: Passes over the training pairs.
        cutoff_len: Maximum tokens of prompt + reply; longer replies are cut, pairs whose prompt fills it are dropped.
        val_set_size: Pairs held out for validation: a count, or a fraction when below 1; 0 for none.
        lora_r: LoRA rank of a fresh adapter.
        lora_alpha: LoRA scaling numerator of a fresh adapter.
        lora_dropout: Dropout on the LoRA input of a fresh adapter.
        lora_target_modules: Module names (comma-separated or a list), or all-linear, for a fresh adapter.
        logging_steps: Log the loss and reward metrics every this many optimizer steps.
        eval_steps: Evaluate on the validation pairs every this many optimizer steps.
    """
    settings = dict(locals())  # the flags as given, saved in medlora_run.json
    # Imported here, not at the top, so that --help answers without loading torch and transformers.
    from medlora.data.preference import encode_pairs, load_preference_pairs
    from medlora.data.splits import split_validation
    from medlora.flags import check_numeric_flags
    from medlora.models.loading import (
        continued_adapter_defaults,
        count_parameters,
        fit_embeddings_to_tokenizer,
        load_base_model,
        load_tokenizer,
        lora_for_trl_trainer,
        resolve_base_model,
        resolve_precision,
    )
    from medlora.training import distributed
    from medlora.training.preference_trainer import (
        PreferenceTrainer,
        restore_fp32_adapter,
    )
    from medlora.training.saving import save_trained_model
    from medlora.training.trainer import (
        MarkCompleteCheckpoints,
        gradient_accumulation_steps_for,
        prepare_quantized_for_training,
        resolve_report_to,
        resolve_resume_checkpoint,
        shared_training_arguments,
        training_loss_change,
    )

    started = time.time()
    world_size, is_main = distributed.world_size(), distributed.is_main_process()
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    if loss not in LOSSES:
        raise MedLoRAError(f"--loss: unknown value {loss!r}; use {', '.join(LOSSES)}")
    beta = DEFAULT_BETA[loss] if beta is None else float(beta)
    check_numeric_flags(settings)
    gradient_accumulation_steps = gradient_accumulation_steps_for(batch_size, micro_batch_size)
    report_to = resolve_report_to(report_to, wandb_project)
    base_model, prompt_template_name = continued_adapter_defaults(lora_weights, base_model, prompt_template_name)
    resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)

    # ---- data: every pair validated and tokenized once (on rank 0), before any model is loaded -------------
    def prepare_data():
        template = PromptTemplate.load(prompt_template_name)
        loaded = load_preference_pairs(data_path, field_map, skip_bad_records)
        pairs = loaded.pairs
        training_pairs, held_out_pairs = split_validation(pairs, val_set_size, seed, "pairs")
        model_path = resolve_base_model(base_model)
        tokenizer = load_tokenizer(lora_weights or model_path, trust_remote_code)
        train_pairs = encode_pairs(tokenizer, template, training_pairs, cutoff_len)
        val_pairs = encode_pairs(tokenizer, template, held_out_pairs, cutoff_len)
        if not train_pairs.examples:
            raise MedLoRAError(f"{data_path}: no training pair is left after truncation at --cutoff_len {cutoff_len}")
        skipped = (loaded.skipped, loaded.skipped_records)
        return template, loaded.describe(), len(pairs), skipped, train_pairs, val_pairs, model_path

    template, data_description, pairs_read, skipped, train_pairs, val_pairs, model_path = (
        distributed.run_once_and_share(prepare_data))

    # ---- model ---------------------------------------------------------------------------------------------
    import transformers
    from datasets import Dataset
    from trl import DPOConfig

    transformers.set_seed(seed)
    precision_plan = resolve_precision(precision)
    dtype = precision_plan.weights
    tokenizer = load_tokenizer(lora_weights or model_path, trust_remote_code)
    model = load_base_model(model_path, dtype, load_in_4bit, load_in_8bit, trust_remote_code)
    fit_embeddings_to_tokenizer(model, tokenizer)
    if load_in_4bit or load_in_8bit:
        model = prepare_quantized_for_training(model, gradient_checkpointing)
    model, peft_config, targets = lora_for_trl_trainer(model, lora_weights, lora_target_modules, lora_r, lora_alpha,
                                                       lora_dropout)

    args = DPOConfig(
        output_dir=output_dir,
        **shared_training_arguments(
            micro_batch_size=micro_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            num_epochs=num_epochs, max_steps=max_steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
            dtype=dtype, autocast_bf16=precision_plan.autocast_bf16,
            gradient_checkpointing=gradient_checkpointing, logging_steps=logging_steps,
            save_steps=save_steps, save_total_limit=save_total_limit, report_to=report_to,
            wandb_run_name=wandb_run_name, seed=seed, validation=bool(val_pairs.examples), eval_steps=eval_steps),
        loss_type=LOSSES[loss] or "sigmoid",  # orpo and simpo replace the loss below
        beta=beta,
        max_length=None,  # pairs are already cut at --cutoff_len
    )
    train_dataset = Dataset.from_list(train_pairs.examples)
    val_dataset = Dataset.from_list(val_pairs.examples) if val_pairs.examples else None
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=val_dataset,
                                processing_class=tokenizer, peft_config=peft_config, callbacks=[MarkCompleteCheckpoints()],
                                loss=loss, simpo_gamma=simpo_gamma)
    restore_fp32_adapter(trainer.model)  # TRL casts QLoRA adapters to bf16; finetune.py keeps them fp32
    trainable, total = count_parameters(trainer.model)
    if is_main:
        print_data_summary(data_description, pairs_read, skipped, train_pairs, val_pairs, cutoff_len, template, loss, beta,
                           trainable, total, lora_weights)

    # Before/after metrics on the validation pairs, else on the training pairs
    measured_on = "validation" if val_dataset is not None else "training"
    before = trainer.evaluate(val_dataset or train_dataset)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    after = trainer.evaluate(val_dataset or train_dataset)

    # ---- save ----------------------------------------------------------------------------------------------
    model = trainer.model
    if "ref" in model.peft_config:  # TRL's frozen reference copy is not part of the result
        model.delete_adapter("ref")
    if trainer.is_world_process_zero():
        metrics = {key: {"before": before.get(f"eval_{key}"), "after": after.get(f"eval_{key}")}
                   for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")}
        settings.update(stage="preference", base_model=base_model, resolved_base_model=model_path,
                        prompt_template_name=template.name, beta=beta, lora_target_modules=targets,
                        dtype=str(dtype).replace("torch.", ""), world_size=world_size,
                        gradient_accumulation_steps=gradient_accumulation_steps,
                        preference_metrics={"measured_on": measured_on, **metrics})
        save_trained_model(model, tokenizer, output_dir, settings, trainer.state.log_history)
        accuracy, margin = metrics["rewards/accuracies"], metrics["rewards/margins"]
        print(f"done in {time.time() - started:.0f}s: {result.global_step} steps, "
              f"{training_loss_change(trainer.state.log_history)}; on the {measured_on} pairs, reward accuracy {accuracy['before']:.3f} -> "
              f"{accuracy['after']:.3f}, reward margin {margin['before']:.4f} -> {margin['after']:.4f}; "
              f"adapter in {output_dir}")
    return trainer


def print_data_summary(data_description, read, skipped, train_pairs, val_pairs, cutoff_len, template, loss, beta,
                       trainable, total, lora_weights):
    reasons, skipped_records = skipped
    dropped = reasons + train_pairs.dropped + val_pairs.dropped
    lengths = sorted(len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
                     for ex in train_pairs.examples)
    print("\n".join([
        f"data: {data_description}",
        *usage_lines("pairs", read + sum(reasons.values()), len(train_pairs.examples), len(val_pairs.examples),
                     dropped, skipped_records),
        f"template: {template.name}; loss: {loss} (beta {beta})",
        f"tokens per training pair: median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
        f"truncated at cutoff_len={cutoff_len}: {train_pairs.truncated + val_pairs.truncated} pairs",
        f"starting from: {lora_weights or 'a fresh LoRA adapter'}",
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
    ]), flush=True)


if __name__ == "__main__":
    cli.run(train)
