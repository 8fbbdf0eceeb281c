r"""Train a pairwise reward model (RM) on preference pairs with LoRA or QLoRA, on TRL's RewardTrainer.

    python reward.py                                      # offline: built-in tiny model, data/preference/
    python reward.py --base_model ./hf_ckpt --data_path ../shared/datasets/medicalgpt/dpo_zh_500.jsonl \
        --output_dir ./rm-medlora --prompt_template_name alpaca
    python reward.py --base_model Qwen/Qwen2.5-1.5B-Instruct --prompt_template_name chatml --load_in_4bit
    torchrun --nproc_per_node=4 reward.py --base_model ... --data_path ... --output_dir ...
    python reward.py --help                               # every flag

The model is the base with a one-output score head (AutoModelForSequenceClassification,
num_labels=1), a LoRA adapter and a fully trained head; it learns r(chosen) > r(rejected) with the
pairwise loss -log sigmoid(r_chosen - r_rejected). Data and validation are those of dpo.py; each
reply is rendered with --prompt_template_name and tokenized exactly as finetune.py does, and scored
at its last token (EOS). Pairwise accuracy on the validation pairs (or the training pairs when there
are none) is reported before and after training. The output folder (adapter with the head,
tokenizer, medlora_run.json) is what `rl.py --reward_model OUTPUT_DIR` loads.
"""

import logging

from medlora import cli
from medlora.errors import MedLoRAError
from medlora.flag_groups import CHECKPOINTS, DATA, HYGIENE, LORA, MODEL, TRAINING
from medlora.flags import stage_flags
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "preference")
SCORE_HEAD_NAMES = ("score", "classifier")  # what transformers calls the head of *ForSequenceClassification
logger = logging.getLogger("reward")


@stage_flags(
    MODEL.without("lora_weights"),
    DATA.but(data_path=DEFAULT_DATA, output_dir="./rm-medlora"),
    HYGIENE,
    TRAINING.but(batch_size=16, learning_rate=1e-4, warmup_steps=10),
    LORA,
    CHECKPOINTS.but(eval_steps=100, save_steps=100),
)
def train(flags):
    """Train a reward model on the preference pairs in DATA_PATH and save it to OUTPUT_DIR.

    Returns the trainer when called from Python.

    Args:
        base_model: Hub id or local folder of a causal LM (often the merged SFT model). The default is the built-in SmolLM2-135M-Instruct (builtin:tiny-llama: a random toy for tests).
        data_path: A .json/.jsonl/.csv/.parquet file of preference pairs, a folder of them, or a hub dataset name.
        output_dir: Where the reward adapter (with its score head), tokenizer, medlora_run.json and checkpoints go.
        field_map: JSON mapping our field names to your columns, e.g. '{"prompt": "question", "chosen": "good"}'.
        skip_bad_records: Drop invalid pairs (listed and counted by reason in the summary) instead of stopping with a list of them.
        prompt_template_name: A template in templates/, or a path to a template .json; use the policy's template. Default: a built-in model's own, else alpaca.
        batch_size: Pairs per optimizer step, all processes together.
        micro_batch_size: Pairs per forward pass on one device; accumulation makes up the rest.
        num_epochs: Passes over the training pairs.
        cutoff_len: Maximum tokens of prompt + reply; longer replies are cut, pairs whose prompt fills it are dropped.
        val_set_size: Pairs held out for validation: a count, or a fraction when below 1; 0 for none.
        seed: Seed for the split, the shuffling, the score head and LoRA initialisation.
        logging_steps: Log the loss, accuracy and margin every this many optimizer steps.
        eval_steps: Evaluate on the validation pairs every this many optimizer steps.
    """
    from medlora.data.preference import pair_summary_lines, prepare_pairs
    from medlora.models.loading import count_parameters
    from medlora.training import distributed
    from medlora.training.stage import TrainingStage

    stage = TrainingStage("reward", flags)
    template, loaded, train_pairs, val_pairs, model_path = distributed.run_once_and_share(
        lambda: prepare_pairs(flags, stage.template_name, stage.data_tokenizer))
    trainer, head, targets = build_trainer(flags, stage, model_path, train_pairs, val_pairs)
    if stage.is_main:
        trainable, total = count_parameters(trainer.model)
        print("\n".join([
            *pair_summary_lines(loaded, train_pairs, val_pairs, flags.cutoff_len, template),
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), "
            f"score head '{head}' trained in full",
        ]), flush=True)

    measured_on = "validation" if trainer.eval_dataset is not None else "training"
    before = trainer.evaluate(trainer.eval_dataset or trainer.train_dataset)
    result = trainer.train(resume_from_checkpoint=stage.resume_from_checkpoint)
    after = trainer.evaluate(trainer.eval_dataset or trainer.train_dataset)

    metrics = {key: {"before": before[f"eval_{key}"], "after": after[f"eval_{key}"]}
               for key in ("loss", "accuracy", "margin")}
    if stage.save(trainer.model, trainer.processing_class, trainer, resolved_base_model=model_path,
                  prompt_template_name=template.name, lora_target_modules=targets, score_head=head,
                  pairwise_metrics={"measured_on": measured_on, **metrics}):
        stage.done(trainer, result, f"; on the {measured_on} pairs, pairwise accuracy "
                                    f"{metrics['accuracy']['before']:.3f} -> {metrics['accuracy']['after']:.3f}, margin "
                                    f"{metrics['margin']['before']:.4f} -> {metrics['margin']['after']:.4f}; "
                                    f"reward model in {flags.output_dir}")
    return trainer


def build_trainer(flags, stage, model_path, train_pairs, val_pairs) -> tuple:
    """(trainer, score head name, LoRA targets): TRL's RewardTrainer on the base with a one-output score head
    (trained in full) and a fresh LoRA adapter."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from medlora.models.loading import (
        resolve_lora_targets,
        trainable_parameters_to_fp32,
    )
    from medlora.training.trainer import MarkCompleteCheckpoints

    with suppress_seqcls_warning():  # "lm_head unused, score head new" is expected here, not worth a warning
        model, tokenizer = stage.load_model(model_path, auto_class=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    head = [name for name in SCORE_HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]
    if not head:
        raise MedLoRAError(f"{model_path}: the {type(model).__name__} score head is not named "
                           f"{' or '.join(SCORE_HEAD_NAMES)}; this architecture is not supported as a reward model")
    targets = resolve_lora_targets(model, flags.lora_target_modules)
    if isinstance(targets, list):
        targets = [name for name in targets if name not in head]
    model = get_peft_model(model, LoraConfig(r=flags.lora_r, lora_alpha=flags.lora_alpha,
                                             lora_dropout=flags.lora_dropout, target_modules=targets, bias="none",
                                             task_type="SEQ_CLS", modules_to_save=head))
    trainable_parameters_to_fp32(model)
    as_dataset = lambda encoded: Dataset.from_dict(  # noqa: E731
        {"chosen_ids": encoded.sequences("chosen"), "rejected_ids": encoded.sequences("rejected")})
    val_dataset = as_dataset(val_pairs) if val_pairs.examples else None
    args = stage.training_arguments(RewardConfig, validation=val_dataset is not None,
                                    train_examples=len(train_pairs.examples),
                                    max_length=None)  # pairs are already cut at --cutoff_len
    trainer = RewardTrainer(model=model, args=args, train_dataset=as_dataset(train_pairs), eval_dataset=val_dataset,
                            processing_class=tokenizer, callbacks=[MarkCompleteCheckpoints()])
    trainable_parameters_to_fp32(trainer.model)  # TRL casts QLoRA adapters (and the head) to bf16; keep fp32
    return trainer, head[0], targets


if __name__ == "__main__":
    cli.run(train)
