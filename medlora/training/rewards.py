"""Prompts and rewards for rl.py (GRPO).

load_prompts         conversations ending with the user's turn, from any file the other stages read
rule_reward          +1 for advising a clinician, up to +1 for brevity
model_reward         a reward model's score (reward.py), on the conversation in its own template
mean_greedy_reward   the mean reward of the policy's greedy replies, reported before and after training
PromptIdsGRPOTrainer TRL's GRPOTrainer on prompts tokenized exactly as finetune.py tokenizes them
"""

import re
from pathlib import Path

import torch
from trl import GRPOTrainer

from medlora.data.preference import load_preference_pairs, with_reply
from medlora.data.records import SUPPORTED_SUFFIXES, read_file_records, read_text, skipped_lines
from medlora.data.templates import Conversation, PromptTemplate
from medlora.data.tokenization import ConversationEncoder
from medlora.errors import MedLoRAError
from medlora.inference.generation import StopStrings
from medlora.inference.predictions import read_predictions_checked
from medlora.training.reward_model import score_sequences

ADVICE = re.compile(r"\b(doctors?|physicians?|clinicians?|GP|nurses?|pharmacists?|midwife|emergency|"
                    r"medical (?:attention|advice|help|care)|health ?care provider)\b|医生|就医|就诊|医院|急诊",
                    re.IGNORECASE)


def load_prompts(data_path, skip_bad_records: bool = False) -> list:
    """Conversations ending with the user's turn, from a .txt file (one question a line), preference
    files, or any record file finetune.py or generate.py reads; a folder is read file by file.

    Every record of every file is checked before any is refused, so one run lists all the bad ones
    (records.refuse_bad_records); with skip_bad_records they are dropped, and the lines saying which are
    printed with the data summary."""
    path = Path(str(data_path)).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (*SUPPORTED_SUFFIXES, ".txt"))
        if not files:
            raise MedLoRAError(f"{path}: folder has no .txt or {'/'.join(SUPPORTED_SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    else:
        raise MedLoRAError(f"{data_path}: no such file or folder")
    conversations, skipped = [], []
    for file in files:
        if file.suffix == ".txt":
            lines = [(n, line.strip()) for n, line in enumerate(read_text(file).splitlines(), 1)]
            found = [Conversation([{"role": "user", "content": text}], None, f"{file}: line {n}")
                     for n, text in lines if text]
            problems = []  # (an empty line is no prompt, not a bad one)
        elif (records := read_file_records(file)) and isinstance(records[0][1], dict) and "chosen" in records[0][1]:
            loaded = load_preference_pairs(file, skip_bad_records=skip_bad_records)
            found, problems = [pair.conversation for pair in loaded.pairs], loaded.skipped_records
        else:
            records, problems = read_predictions_checked(file, skip_bad_records, rest="trains on the rest")
            found = [Conversation(r.messages, r.system, r.source) for r in records]
        if not found:
            raise MedLoRAError(f"{file}: no prompts (empty file)")
        skipped += problems
        conversations += found
    for line in skipped_lines(data_path, "prompt records", skipped):
        print(line, flush=True)
    return conversations


# ---- rewards ---------------------------------------------------------------------------------------------
def rule_reward(max_reply_chars: int, template):
    """+1 when the reply advises seeing a clinician; + min(1, max_reply_chars / reply characters) for brevity.

    A reply that runs on past the template's stop string counts with everything it generated."""
    stops = StopStrings(template.stop)

    def advice_and_brevity(prompts, completions, completion_ids, **kwargs):
        rewards = []
        for text in completions:
            advice = ADVICE.search(stops.cut(text)[0]) is not None
            rewards.append(float(advice) + min(1.0, max_reply_chars / max(len(text.strip()), 1)))
        return rewards

    return advice_and_brevity


def model_reward(reward_net, reward_tokenizer, reward_settings, policy_prompts, policy_template):
    """The reward model's score of each conversation with the reply, rendered with the reward model's template."""
    encoder = ConversationEncoder(reward_tokenizer, PromptTemplate.load(reward_settings["prompt_template_name"]))
    cutoff_len = reward_settings.get("cutoff_len") or None
    stops = StopStrings(policy_template.stop)

    def reward_model_score(prompts, completions, completion_ids, prompt_index, **kwargs):
        conversations = [with_reply(policy_prompts[index][0], stops.cut(text)[0].strip() or text)
                         for index, text in zip(prompt_index, completions, strict=True)]
        sequences = [example.input_ids[:cutoff_len] for example in encoder.encode(conversations).examples]
        return score_sequences(reward_net, sequences, reward_tokenizer.pad_token_id)

    return reward_model_score


def mean_greedy_reward(model, tokenizer, prompts, reward_function, max_new_tokens, batch_size=8) -> float | None:
    """Mean reward of the policy's greedy replies (deterministic, so before and after compare fairly)."""
    if not prompts:
        return None
    was_training, rewards = model.training, []
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, ids) in enumerate(batch):  # left padding: generation continues every row at the end
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        with torch.no_grad():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=eos)
        completion_ids = []
        for row in output[:, width:].tolist():
            completion_ids.append(row[:row.index(eos) + 1] if eos in row else row)
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards += reward_function(prompts=[""] * len(batch), completions=completions, completion_ids=completion_ids,
                                   prompt_index=list(range(start, start + len(batch))))
    model.train(was_training)
    return sum(rewards) / len(rewards)


class PromptIdsGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose prompts are token ids made by ConversationEncoder.encode_prompt, the exact ids
    finetune.py trained on (the dataset's "prompt" column holds each prompt's index)."""

    def __init__(self, *args, prompt_ids, **kwargs):
        self.medlora_prompt_ids = prompt_ids
        super().__init__(*args, **kwargs)

    def _tokenize_prompts(self, prompts):
        return [list(self.medlora_prompt_ids[int(index)]) for index in prompts], None, {}
