r"""Reinforcement learning (RL) of a medical chat policy with GRPO (TRL's GRPOTrainer), LoRA or QLoRA.

    python rl.py --lora_weights ./lora-medlora            # rule reward, prompts from data/preference/
    python rl.py --lora_weights ./lora-medlora --reward_model ./rm-medlora --data_path prompts.jsonl \
        --output_dir ./rl-medlora --num_generations 8 --max_completion_length 256
    python rl.py --lora_weights ./lora-medlora --reward_model ./rm-medlora --load_in_4bit
    torchrun --nproc_per_node=4 rl.py --lora_weights ./lora-medlora --reward_model ./rm-medlora ...
    python rl.py --help                                   # every flag

For every prompt the policy samples --num_generations replies; each is scored, and replies better
than their group's average are made more likely (GRPO). The reward is a reward model from reward.py
(--reward_model), which scores the conversation rendered with its own prompt template, or, without
one, a rule: +1 when the reply advises seeing a doctor (or another clinician, or emergency care),
plus up to 1 for brevity (1 within --max_reply_chars characters, less the longer the reply runs). Prompts come
from any file finetune.py, dpo.py or generate.py reads (the user turns; a record's own answer is
ignored) or a .txt file with one question a line, and are tokenized exactly as finetune.py does.
The mean reward of greedy replies to the first --eval_prompts prompts is reported before and after.
The output folder is an adapter that chat.py, generate.py and evaluate.py load with no other flag.
"""

import logging
import random

from medlora import cli
from medlora.data.templates import PromptTemplate
from medlora.errors import MedLoRAError
from medlora.flag_groups import CHECKPOINTS, DATA, LORA, MODEL, TRAINING
from medlora.flags import FlagGroup, stage_flags
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "preference")
logger = logging.getLogger("rl")


@stage_flags(
    MODEL,
    DATA.but(data_path=DEFAULT_DATA, output_dir="./rl-medlora").without("field_map"),
    FlagGroup("reward", reward_model="", max_reply_chars=600),
    FlagGroup("sampling", num_generations=4, max_prompt_length=256, max_completion_length=128, temperature=1.0,
              top_p=1.0, beta=0.0),
    TRAINING.but(batch_size=16, learning_rate=1e-5, warmup_steps=0).without("cutoff_len", "val_set_size"),
    FlagGroup("evaluation", eval_prompts=16),
    LORA,
    CHECKPOINTS.without("eval_steps"),
)
def train(flags):
    """Improve a chat policy with GRPO on the prompts in DATA_PATH and save the adapter to OUTPUT_DIR.

    Returns the trainer when called from Python.

    Args:
        base_model: Hub id or local folder of a causal LM. Default: the base of --lora_weights, else builtin:smollm2-135m-instruct.
        lora_weights: The policy: an SFT (or DPO) adapter to continue; empty for a fresh LoRA on --base_model.
        data_path: Prompts: a file (or folder) of SFT, preference or question records, or a .txt file with one question a line.
        prompt_template_name: The policy's template in templates/, or a .json path. Default: the adapter's, else alpaca.
        skip_bad_records: Drop invalid prompt records (listed and counted by reason in the summary) instead of stopping with a list of them.
        reward_model: A reward model folder from reward.py; empty for the rule reward (advice to see a clinician, brevity).
        max_reply_chars: Rule reward: replies up to this many characters get the full brevity point.
        num_generations: Replies sampled per prompt (the GRPO group); --batch_size must be a multiple of it.
        max_prompt_length: Prompts longer than this many tokens are left out.
        max_completion_length: Most tokens generated per reply.
        temperature: Sampling temperature of the replies (> 0: GRPO always samples).
        top_p: Nucleus sampling of the replies; 1 disables it.
        beta: KL penalty towards the starting policy (0: none, and no reference copy is kept).
        batch_size: Replies per optimizer step, all processes together (prompts x num_generations).
        micro_batch_size: Replies per forward pass on one device; accumulation makes up the rest.
        num_epochs: Passes over the prompts.
        eval_prompts: How many prompts the before/after mean reward (greedy replies) is measured on; 0 to skip.
        seed: Seed for the prompt order, the sampling, LoRA initialisation and dropout.
        lora_r: LoRA rank of a fresh adapter.
        lora_alpha: LoRA scaling numerator of a fresh adapter.
        lora_dropout: Dropout on the LoRA input of a fresh adapter.
        lora_target_modules: Module names (comma-separated or a list), or all-linear, for a fresh adapter.
        load_in_4bit: QLoRA: load the policy's base in 4-bit NF4 (and the reward model's too).
        load_in_8bit: Load the policy's base (and the reward model's) in 8-bit.
        logging_steps: Log the reward, reply length and loss every this many optimizer steps.
    """
    from medlora.training import distributed
    from medlora.training.rewards import mean_greedy_reward
    from medlora.training.stage import TrainingStage
    from medlora.training.trainer import undo_training_changes

    stage = TrainingStage("rl", flags)
    if flags.num_generations < 2 or flags.batch_size % flags.num_generations:
        raise MedLoRAError(f"--batch_size {flags.batch_size} must be a multiple of --num_generations "
                           f"{flags.num_generations} (at least 2: GRPO compares the replies to one prompt)")
    if flags.temperature <= 0 or not 0 < flags.top_p <= 1:
        raise MedLoRAError("--temperature must be > 0 and --top_p in (0, 1]: GRPO learns from sampled replies")
    if flags.reward_model:
        from medlora.training.reward_model import checked_reward_model

        checked_reward_model(flags.reward_model)
    template, prompts, too_long, model_path = distributed.run_once_and_share(lambda: prepare_prompts(flags, stage))
    trainer, reward_function, targets = build_trainer(flags, stage, model_path, template, prompts)
    if stage.is_main:
        print_data_summary(flags, template, prompts, too_long, trainer.model, stage.lora_weights)

    eval_set = prompts[:flags.eval_prompts]
    greedy_reward = lambda: mean_greedy_reward(trainer.model, trainer.processing_class, eval_set,  # noqa: E731
                                               reward_function, flags.max_completion_length)
    before = greedy_reward()
    result = trainer.train(resume_from_checkpoint=stage.resume_from_checkpoint)
    undo_training_changes(trainer)  # "after" in the precision "before" was measured in
    after = greedy_reward()

    model = trainer.model
    if "ref" in model.peft_config:  # TRL's frozen reference copy (beta > 0) is not part of the result
        model.delete_adapter("ref")
    if stage.save(model, trainer.processing_class, trainer, resolved_base_model=model_path,
                  prompt_template_name=template.name, lora_target_modules=targets,
                  mean_greedy_reward={"prompts": len(eval_set), "before": before, "after": after}):
        measured = (f"; mean reward of greedy replies to {len(eval_set)} prompts {before:.4f} -> {after:.4f}"
                    if eval_set else "")
        stage.done(trainer, result, f"{measured}; adapter in {flags.output_dir}")
    return trainer


def prepare_prompts(flags, stage) -> tuple:
    """(template, [(conversation, prompt ids)], prompts left out as too long, base model path): every prompt
    read and tokenized (on rank 0), before any model is loaded."""
    from medlora.data.tokenization import ConversationEncoder
    from medlora.training.rewards import load_prompts

    template = PromptTemplate.load(stage.template_name)
    conversations = load_prompts(flags.data_path, flags.skip_bad_records)
    random.Random(flags.seed).shuffle(conversations)
    model_path, tokenizer = stage.data_tokenizer()
    encoder = ConversationEncoder(tokenizer, template)
    prompts = [(c, encoder.encode_prompt(c)) for c in conversations]
    kept = [(c, ids) for c, ids in prompts if len(ids) <= flags.max_prompt_length]
    if not kept:
        raise MedLoRAError(f"{flags.data_path}: every prompt is longer than --max_prompt_length "
                           f"{flags.max_prompt_length}")
    return template, kept, len(prompts) - len(kept), model_path


def build_trainer(flags, stage, model_path, template, prompts) -> tuple:
    """(trainer, reward function, LoRA targets): TRL's GRPO trainer on the policy (the continued adapter or a
    fresh LoRA), with the reward model or the rule reward."""
    from datasets import Dataset
    from trl import GRPOConfig

    from medlora.models.loading import lora_for_trl_trainer
    from medlora.training.preference_trainer import restore_fp32_adapter
    from medlora.training.reward_model import load_reward_model
    from medlora.training.rewards import PromptIdsGRPOTrainer, model_reward, rule_reward
    from medlora.training.trainer import MarkCompleteCheckpoints

    model, tokenizer = stage.load_model(model_path)
    model, peft_config, targets = lora_for_trl_trainer(model, stage.lora_weights, flags.lora_target_modules,
                                                       flags.lora_r, flags.lora_alpha, flags.lora_dropout)
    if flags.reward_model:
        reward_function = model_reward(*load_reward_model(flags.reward_model, flags.load_in_4bit, flags.load_in_8bit,
                                                          precision=flags.precision,
                                                          trust_remote_code=flags.trust_remote_code),
                                       prompts, template)
    else:
        reward_function = rule_reward(flags.max_reply_chars, template)
    args = stage.training_arguments(GRPOConfig, validation=None, train_examples=len(prompts) * flags.num_generations,
                                    num_generations=flags.num_generations,
                                    max_completion_length=flags.max_completion_length,
                                    temperature=flags.temperature, top_p=flags.top_p, beta=flags.beta)
    dataset = Dataset.from_dict({"prompt": [str(index) for index in range(len(prompts))],
                                 "prompt_index": list(range(len(prompts)))})
    trainer = PromptIdsGRPOTrainer(prompt_ids=[ids for _, ids in prompts], model=model, reward_funcs=reward_function,
                                   args=args, train_dataset=dataset, processing_class=tokenizer,
                                   peft_config=peft_config, callbacks=[MarkCompleteCheckpoints()])
    restore_fp32_adapter(trainer.model)  # TRL casts QLoRA adapters to bf16; finetune.py keeps them fp32
    return trainer, reward_function, targets


def print_data_summary(flags, template, prompts, too_long, model, lora_weights):
    from medlora.models.loading import count_parameters

    trainable, total = count_parameters(model)
    lengths = sorted(len(ids) for _, ids in prompts)
    reward_name = flags.reward_model or (f"rule (advice to see a clinician, brevity within {flags.max_reply_chars} "
                                         "characters)")
    print("\n".join([
        f"prompts: {len(prompts) + too_long} read from {flags.data_path}, {len(prompts)} used, {too_long} left out "
        f"(longer than max_prompt_length={flags.max_prompt_length}); tokens: median {lengths[len(lengths) // 2]}, "
        f"max {lengths[-1]}",
        f"template: {template.name}; reward: {reward_name}",
        f"starting from: {lora_weights or 'a fresh LoRA adapter'}; {flags.num_generations} replies per prompt",
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
    ]), flush=True)


if __name__ == "__main__":
    cli.run(train)
