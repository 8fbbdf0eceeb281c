r"""Preference tuning (DPO, IPO, ORPO or SimPO) of a medical chat model with LoRA or QLoRA, on TRL.

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

from medlora import cli
from medlora.errors import MedLoRAError
from medlora.flag_groups import CHECKPOINTS, DATA, HYGIENE, LORA, MODEL, TRAINING
from medlora.flags import Flag, FlagGroup, stage_flags
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "preference")
LOSSES = {"dpo": "sigmoid", "ipo": "ipo", "orpo": None, "simpo": None}  # our name -> TRL's DPOConfig loss_type
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
logger = logging.getLogger("dpo")


@stage_flags(
    MODEL,
    DATA.but(data_path=DEFAULT_DATA, output_dir="./dpo-medlora"),
    HYGIENE,
    FlagGroup("preference loss", loss="dpo", beta=Flag(None, float | None), simpo_gamma=1.0),
    TRAINING.but(batch_size=16, micro_batch_size=2, learning_rate=5e-5, warmup_steps=10),
    LORA,
    CHECKPOINTS.but(eval_steps=100, save_steps=100),
)
def train(flags):
    """Tune a chat model on preference pairs from DATA_PATH and save the adapter to OUTPUT_DIR.

    Returns the trainer when called from Python.

    Args:
        base_model: Hub id or local folder of a causal LM. Default: the base of --lora_weights, else builtin:smollm2-135m-instruct.
        lora_weights: The SFT adapter from finetune.py to continue (and, for DPO/IPO, the frozen reference); empty for a fresh LoRA.
        data_path: A .json/.jsonl/.csv/.parquet file of preference pairs, a folder of them, or a hub dataset name.
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
    from medlora.data.preference import prepare_pairs
    from medlora.training import distributed
    from medlora.training.stage import TrainingStage

    stage = TrainingStage("preference", flags)
    if flags.loss not in LOSSES:
        raise MedLoRAError(f"--loss: unknown value {flags.loss!r}; use {', '.join(LOSSES)}")
    beta = DEFAULT_BETA[flags.loss] if flags.beta is None else float(flags.beta)
    template, loaded, train_pairs, val_pairs, model_path = distributed.run_once_and_share(
        lambda: prepare_pairs(flags, stage.template_name, stage.data_tokenizer))
    trainer, targets = build_trainer(flags, stage, model_path, beta, train_pairs, val_pairs)
    if stage.is_main:
        print_data_summary(loaded, train_pairs, val_pairs, flags, template, beta, trainer.model, stage.lora_weights)

    # Before/after metrics on the validation pairs, else on the training pairs
    measured_on = "validation" if trainer.eval_dataset is not None else "training"
    before = trainer.evaluate(trainer.eval_dataset or trainer.train_dataset)
    result = trainer.train(resume_from_checkpoint=stage.resume_from_checkpoint)
    after = trainer.evaluate(trainer.eval_dataset or trainer.train_dataset)

    model = trainer.model
    if "ref" in model.peft_config:  # TRL's frozen reference copy is not part of the result
        model.delete_adapter("ref")
    metrics = {key: {"before": before.get(f"eval_{key}"), "after": after.get(f"eval_{key}")}
               for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")}
    if stage.save(model, trainer.processing_class, trainer, resolved_base_model=model_path,
                  prompt_template_name=template.name, beta=beta, lora_target_modules=targets,
                  preference_metrics={"measured_on": measured_on, **metrics}):
        accuracy, margin = metrics["rewards/accuracies"], metrics["rewards/margins"]
        stage.done(trainer, result, f"; on the {measured_on} pairs, reward accuracy {accuracy['before']:.3f} -> "
                                    f"{accuracy['after']:.3f}, reward margin {margin['before']:.4f} -> "
                                    f"{margin['after']:.4f}; adapter in {flags.output_dir}")
    return trainer


def build_trainer(flags, stage, model_path, beta, train_pairs, val_pairs):
    """(trainer, LoRA targets): TRL's DPO trainer (with our ORPO/SimPO losses) on the policy, the continued
    adapter or a fresh LoRA."""
    from datasets import Dataset
    from trl import DPOConfig

    from medlora.models.loading import lora_for_trl_trainer
    from medlora.training.preference_trainer import (
        PreferenceTrainer,
        restore_fp32_adapter,
    )
    from medlora.training.trainer import MarkCompleteCheckpoints

    model, tokenizer = stage.load_model(model_path)
    model, peft_config, targets = lora_for_trl_trainer(model, stage.lora_weights, flags.lora_target_modules,
                                                       flags.lora_r, flags.lora_alpha, flags.lora_dropout)
    args = stage.training_arguments(DPOConfig, validation=bool(val_pairs.examples),
                                    train_examples=len(train_pairs.examples),
                                    loss_type=LOSSES[flags.loss] or "sigmoid",  # orpo and simpo replace the loss
                                    beta=beta, max_length=None)  # pairs are already cut at --cutoff_len
    val_dataset = Dataset.from_list(val_pairs.examples) if val_pairs.examples else None
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_pairs.examples),
                                eval_dataset=val_dataset, processing_class=tokenizer, peft_config=peft_config,
                                callbacks=[MarkCompleteCheckpoints()], loss=flags.loss, simpo_gamma=flags.simpo_gamma)
    restore_fp32_adapter(trainer.model)  # TRL casts QLoRA adapters to bf16; finetune.py keeps them fp32
    return trainer, targets


def print_data_summary(loaded, train_pairs, val_pairs, flags, template, beta, model, lora_weights):
    from medlora.data.preference import pair_summary_lines
    from medlora.models.loading import count_parameters

    trainable, total = count_parameters(model)
    print("\n".join([
        *pair_summary_lines(loaded, train_pairs, val_pairs, flags.cutoff_len, template,
                            f"; loss: {flags.loss} (beta {beta})"),
        f"starting from: {lora_weights or 'a fresh LoRA adapter'}",
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
    ]), flush=True)


if __name__ == "__main__":
    cli.run(train)
