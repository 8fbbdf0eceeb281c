"""Reward models written by reward.py: the folder check, loading on its base, and scoring token sequences
(rl.py's model reward and reward.py's accuracy before/after)."""

from medlora.errors import MedLoRAError


def checked_reward_model(reward_model: str):
    """The --reward_model folder, refused at once unless reward.py wrote it."""
    from medlora.run_folder import RunFolder

    folder = RunFolder.adapter(reward_model, flag="--reward_model", allow_hub=False)
    if folder.stage != "reward":
        raise MedLoRAError(f"--reward_model {reward_model}: not a reward model folder written by reward.py")
    return folder


def load_reward_model(reward_model: str, load_in_4bit=False, load_in_8bit=False, device=None, precision="auto",
                      trust_remote_code=False):
    """A reward model written by reward.py: (model, tokenizer, run settings); the base comes from medlora_run.json."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from medlora.models.loading import (
        choose_dtype,
        fit_embeddings_to_tokenizer,
        load_base_model,
        load_tokenizer,
        resolve_base_model,
    )
    settings = checked_reward_model(reward_model).settings
    tokenizer = load_tokenizer(reward_model, trust_remote_code)
    with suppress_seqcls_warning():  # the base has an LM head and no score head yet: expected, not worth a warning
        model = load_base_model(resolve_base_model(settings["base_model"]), choose_dtype(precision), load_in_4bit,
                                load_in_8bit, trust_remote_code, device, auto_class=AutoModelForSequenceClassification,
                                num_labels=1)
    fit_embeddings_to_tokenizer(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    model = PeftModel.from_pretrained(model, reward_model)
    model.eval()
    return model, tokenizer, settings


def score_sequences(model, sequences: list, pad_token_id: int, batch_size: int = 8) -> list:
    """The reward model's scalar score of each token sequence (right-padded batches, no gradient)."""
    import torch

    device = next(model.parameters()).device
    scores = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention_mask[row, :len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scores += logits[:, 0].float().cpu().tolist()
    return scores
