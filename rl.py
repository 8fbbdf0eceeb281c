"""Reinforcement learning (RL) of a medical chat policy with GRPO (TRL's GRPOTrainer), LoRA or QLoRA.

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
import time

from medlora import cli
from medlora.data.templates import PromptTemplate
from medlora.errors import MedLoRAError
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "preference")
logger = logging.getLogger("rl")


def train(
    # model and data
    base_model: str = "",
    lora_weights: str = "",
    data_path: str = DEFAULT_DATA,
    output_dir: str = "./rl-medlora",
    prompt_template_name: str = "",
    skip_bad_records: bool = False,
    # reward
    reward_model: str = "",
    max_reply_chars: int = 600,
    # sampling
    num_generations: int = 4,
    max_prompt_length: int = 256,
    max_completion_length: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    beta: float = 0.0,
    # training hyperparameters
    batch_size: int = 16,
    micro_batch_size: int = 4,
    num_epochs: int = 1,
    max_steps: int = -1,
    learning_rate: float = 1e-5,
    warmup_steps: int = 0,
    eval_prompts: int = 16,
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
    # logging and checkpoints
    logging_steps: int = 10,
    save_steps: int = 100,
    save_total_limit: int = 3,
    report_to: str = "none",
    wandb_project: str = "",
    wandb_run_name: str = "",
    resume_from_checkpoint: str | bool | None = None,
):
    """Improve a chat policy with GRPO on the prompts in DATA_PATH and save the adapter to OUTPUT_DIR.

    Returns the trainer when called from Python.

    Args:
        base_model: Hub id or local folder of a causal LM. Default: the base of --lora_weights, else builtin:smollm2-135m-instruct.
        lora_weights: The policy: an SFT (or DPO) adapter to continue; empty for a fresh LoRA on --base_model.
        data_path: Prompts: a file (or folder) of SFT, preference or question records, or a .txt file with one question a line.
        output_dir: Where the adapter, tokenizer, medlora_run.json and checkpoints go.
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
    settings = dict(locals())  # the flags as given, saved in medlora_run.json
    # Imported here, not at the top, so that --help answers without loading torch and transformers.
    from medlora.data.tokenization import ConversationEncoder
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
    from medlora.training.preference_trainer import restore_fp32_adapter
    from medlora.training.reward_model import checked_reward_model, load_reward_model
    from medlora.training.rewards import (
        PromptIdsGRPOTrainer,
        load_prompts,
        mean_greedy_reward,
        model_reward,
        rule_reward,
    )
    from medlora.training.saving import save_trained_model
    from medlora.training.trainer import (
        MarkCompleteCheckpoints,
        gradient_accumulation_steps_for,
        prepare_quantized_for_training,
        resolve_report_to,
        resolve_resume_checkpoint,
        shared_training_arguments,
    )

    started = time.time()
    world_size, is_main = distributed.world_size(), distributed.is_main_process()
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    check_numeric_flags(settings)
    gradient_accumulation_steps = gradient_accumulation_steps_for(batch_size, micro_batch_size)
    if num_generations < 2 or batch_size % num_generations:
        raise MedLoRAError(f"--batch_size {batch_size} must be a multiple of --num_generations {num_generations} "
                           "(at least 2: GRPO compares the replies to one prompt)")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise MedLoRAError("--temperature must be > 0 and --top_p in (0, 1]: GRPO learns from sampled replies")
    report_to = resolve_report_to(report_to, wandb_project)
    base_model, prompt_template_name = continued_adapter_defaults(lora_weights, base_model, prompt_template_name)
    if reward_model:
        checked_reward_model(reward_model)
    resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)

    # ---- data: every prompt read and tokenized once (on rank 0), before any model is loaded ----------------
    def prepare_data():
        template = PromptTemplate.load(prompt_template_name)
        conversations = load_prompts(data_path, skip_bad_records)
        random.Random(seed).shuffle(conversations)
        model_path = resolve_base_model(base_model)
        encoder = ConversationEncoder(load_tokenizer(lora_weights or model_path, trust_remote_code), template)
        prompts = [(c, encoder.encode_prompt(c)) for c in conversations]
        kept = [(c, ids) for c, ids in prompts if len(ids) <= max_prompt_length]
        if not kept:
            raise MedLoRAError(f"{data_path}: every prompt is longer than --max_prompt_length {max_prompt_length}")
        return template, kept, len(prompts) - len(kept), model_path

    template, prompts, too_long, model_path = distributed.run_once_and_share(prepare_data)

    # ---- models ----------------------------------------------------------------------------------------------
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig

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
    if reward_model:
        reward_function = model_reward(*load_reward_model(reward_model, load_in_4bit, load_in_8bit,
                                                          precision=precision, trust_remote_code=trust_remote_code),
                                       prompts, template)
    else:
        reward_function = rule_reward(max_reply_chars, template)

    args = GRPOConfig(
        output_dir=output_dir,
        **shared_training_arguments(
            micro_batch_size=micro_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            num_epochs=num_epochs, max_steps=max_steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
            dtype=dtype, autocast_bf16=precision_plan.autocast_bf16,
            gradient_checkpointing=gradient_checkpointing, logging_steps=logging_steps,
            save_steps=save_steps, save_total_limit=save_total_limit, report_to=report_to,
            wandb_run_name=wandb_run_name, seed=seed),
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=temperature,
        top_p=top_p,
        beta=beta,
    )
    dataset = Dataset.from_dict({"prompt": [str(index) for index in range(len(prompts))],
                                 "prompt_index": list(range(len(prompts)))})
    trainer = PromptIdsGRPOTrainer(prompt_ids=[ids for _, ids in prompts], model=model, reward_funcs=reward_function,
                                   args=args, train_dataset=dataset, processing_class=tokenizer,
                                   peft_config=peft_config, callbacks=[MarkCompleteCheckpoints()])
    restore_fp32_adapter(trainer.model)  # TRL casts QLoRA adapters to bf16; finetune.py keeps them fp32
    trainable, total = count_parameters(trainer.model)
    lengths = sorted(len(ids) for _, ids in prompts)
    if is_main:
        reward_name = reward_model or f"rule (advice to see a clinician, brevity within {max_reply_chars} characters)"
        print("\n".join([
            f"prompts: {len(prompts) + too_long} read from {data_path}, {len(prompts)} used, {too_long} left out "
            f"(longer than max_prompt_length={max_prompt_length}); tokens: median {lengths[len(lengths) // 2]}, "
            f"max {lengths[-1]}",
            f"template: {template.name}; reward: {reward_name}",
            f"starting from: {lora_weights or 'a fresh LoRA adapter'}; {num_generations} replies per prompt",
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
        ]), flush=True)

    eval_set = prompts[:eval_prompts]
    before = mean_greedy_reward(trainer.model, tokenizer, eval_set, reward_function, max_completion_length)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    after = mean_greedy_reward(trainer.model, tokenizer, eval_set, reward_function, max_completion_length)

    # ---- save ----------------------------------------------------------------------------------------------
    model = trainer.model
    if "ref" in model.peft_config:  # TRL's frozen reference copy (beta > 0) is not part of the result
        model.delete_adapter("ref")
    if trainer.is_world_process_zero():
        settings.update(stage="rl", base_model=base_model, resolved_base_model=model_path,
                        prompt_template_name=template.name, lora_target_modules=targets,
                        dtype=str(dtype).replace("torch.", ""), world_size=world_size,
                        gradient_accumulation_steps=gradient_accumulation_steps,
                        mean_greedy_reward={"prompts": len(eval_set), "before": before, "after": after})
        save_trained_model(model, tokenizer, output_dir, settings, trainer.state.log_history)
        measured = (f"; mean reward of greedy replies to {len(eval_set)} prompts {before:.4f} -> {after:.4f}"
                    if eval_set else "")
        print(f"done in {time.time() - started:.0f}s: {result.global_step} steps{measured}; adapter in {output_dir}")
    return trainer


if __name__ == "__main__":
    cli.run(train)
