"""Preference pairs (a prompt, a chosen and a rejected reply) for DPO/ORPO/SimPO and reward models.

Formats, detected per file from the first record's fields (after --field_map):
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value"}...ending with a human turn],
             "chosen", "rejected"}                                        (MedicalGPT's DPO and reward data)
  messages  {"messages": [{"role", "content"}...ending with a user turn], "chosen", "rejected"}
  prompt    {"prompt", "chosen", "rejected", "system"?, "history"?: [[question, answer], ...]}
            (MedicalGPT's older {"question", "response_chosen", "response_rejected"} is read as this)

Pairs are tokenized by the same ConversationEncoder as finetune.py: the prompt, then the reply and
EOS, so that preference training sees exactly the tokens supervised fine-tuning saw. Every problem
is a one-line MedLoRAError naming the file, the record and the field.
"""

from collections import Counter
from dataclasses import dataclass, field

from medlora.data.records import (
    detect_by_fields,
    field_text,
    parse_turns,
    skip_reasons,
    usage_lines,
    validate_records,
)
from medlora.data.templates import Conversation
from medlora.errors import MedLoRAError

MEDICALGPT_REWARD_FIELDS = {"question": "prompt", "response_chosen": "chosen", "response_rejected": "rejected"}
DROPPED_PROMPT_TOO_LONG = "prompt fills cutoff_len"
DROPPED_SAME_AFTER_TRUNCATION = "chosen and rejected identical after truncation at cutoff_len"


@dataclass
class PreferencePair:
    conversation: Conversation  # ends with the user turn both replies answer
    chosen: str
    rejected: str

    @property
    def source(self) -> str:
        return self.conversation.source


@dataclass
class LoadedPreferences:
    pairs: list
    formats: dict = field(default_factory=dict)  # source -> (format, record count)
    skipped: Counter = field(default_factory=Counter)  # --skip_bad_records: reason -> records dropped
    skipped_records: list = field(default_factory=list)  # --skip_bad_records: "file: record N: field: reason"
    hygiene: object = None  # HygieneReport (medlora/data/hygiene.py), once checked

    def describe(self) -> str:
        return "; ".join(f"{source}: {fmt}, {count} pairs" for source, (fmt, count) in self.formats.items())


@dataclass
class EncodedPairs:
    examples: list  # {"prompt_ids", "chosen_ids", "rejected_ids"}: the replies end with EOS
    kept: list  # index into the pairs of each example
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0

    def sequences(self, which: str) -> list:
        """Whole sequences (prompt + reply) for a reward model: which is "chosen" or "rejected"."""
        return [ex["prompt_ids"] + ex[f"{which}_ids"] for ex in self.examples]


# ---- reading and validation ------------------------------------------------------------------------------
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "system", "history", "conversations", "messages")


def load_preference_pairs(data_path, field_map=None, skip_bad_records=False) -> LoadedPreferences:
    """Read and validate every record of a file, a folder of files or a hub dataset (records.validate_records)."""
    loaded = LoadedPreferences([])
    loaded.pairs, loaded.formats, loaded.skipped_records = validate_records(
        data_path, field_map, detect_preference_format, to_preference_pair, skip_bad_records, PREFERENCE_FIELDS)
    loaded.skipped = skip_reasons(loaded.skipped_records)
    return loaded


PREFERENCE_FORMATS = [("sharegpt", {"conversations"}), ("messages", {"messages"}), ("prompt", {"prompt"}),
                      ("medicalgpt_reward", {"question", "response_chosen"})]


def detect_preference_format(record: dict, source: str, number: int) -> str:
    return detect_by_fields(record, PREFERENCE_FORMATS, source, number,
                            "conversations/messages (ending with the user's turn) or prompt, with chosen and rejected")


def to_preference_pair(record: dict, fmt: str, where: str) -> PreferencePair:
    if fmt == "medicalgpt_reward":
        record, fmt = {MEDICALGPT_REWARD_FIELDS.get(key, key): value for key, value in record.items()}, "prompt"
    system = field_text(record, "system", where, required=False, allow_empty=True) or None
    if fmt == "prompt":
        messages = _history_messages(record, where)
        messages.append({"role": "user", "content": field_text(record, "prompt", where)})
    else:
        messages, system = parse_turns(record, fmt, where, system, last_role="user")
    chosen, rejected = field_text(record, "chosen", where), field_text(record, "rejected", where)
    if chosen.strip() == rejected.strip():
        raise MedLoRAError(f"{where}: field 'rejected': identical to 'chosen', so the pair teaches nothing")
    return PreferencePair(Conversation(messages, system, where), chosen, rejected)


def _history_messages(record: dict, where: str) -> list:
    history = record.get("history") or []
    if not isinstance(history, list):
        raise MedLoRAError(f"{where}: field 'history': expected a list of [question, answer] pairs")
    messages = []
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(text, str) and text.strip() for text in pair)):
            raise MedLoRAError(f"{where}: field 'history[{index}]': expected a pair of non-empty strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


# ---- tokenization ----------------------------------------------------------------------------------------
def with_reply(conversation: Conversation, reply: str) -> Conversation:
    return Conversation(conversation.messages + [{"role": "assistant", "content": reply}], conversation.system,
                        conversation.source)


def encode_pairs(tokenizer, template, pairs: list, cutoff_len: int | None, add_eos_token: bool = True) -> EncodedPairs:
    """Token ids of every pair, exactly as finetune.py tokenizes the same conversation with that reply.

    The prompt is the common prefix of the prompt and both whole sequences (a token may straddle the
    boundary between prompt and reply). Sequences longer than cutoff_len lose the end of their reply;
    pairs whose prompt alone fills cutoff_len are dropped and counted.
    """
    from medlora.data.tokenization import ConversationEncoder

    encoder = ConversationEncoder(tokenizer, template, None, train_on_inputs=False, add_eos_token=add_eos_token)
    prompts = encoder.encode([pair.conversation for pair in pairs]).examples
    chosen = encoder.encode([with_reply(pair.conversation, pair.chosen) for pair in pairs]).examples
    rejected = encoder.encode([with_reply(pair.conversation, pair.rejected) for pair in pairs]).examples
    report = EncodedPairs([], [])
    for index, (prompt, good, bad) in enumerate(zip(prompts, chosen, rejected, strict=True)):
        prompt_len = min(common_prefix_length(prompt.input_ids, good.input_ids),
                         common_prefix_length(prompt.input_ids, bad.input_ids))
        if cutoff_len and prompt_len >= cutoff_len:
            report.dropped[DROPPED_PROMPT_TOO_LONG] += 1
            continue
        good_ids, bad_ids = good.input_ids[prompt_len:], bad.input_ids[prompt_len:]
        if cutoff_len and prompt_len + max(len(good_ids), len(bad_ids)) > cutoff_len:
            report.truncated += 1
            good_ids, bad_ids = good_ids[:cutoff_len - prompt_len], bad_ids[:cutoff_len - prompt_len]
            if good_ids == bad_ids:
                report.dropped[DROPPED_SAME_AFTER_TRUNCATION] += 1
                continue
        report.examples.append({"prompt_ids": prompt.input_ids[:prompt_len], "chosen_ids": good_ids,
                                "rejected_ids": bad_ids})
        report.kept.append(index)
    return report


def common_prefix_length(a: list, b: list) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


# ---- TRL glue ----------------------------------------------------------------------------------------------


# ---- reward models ---------------------------------------------------------------------------------------




def prepare_pairs(flags, template_name: str, data_tokenizer) -> tuple:
    """What dpo.py and reward.py train on, before any model loads: (template, LoadedPreferences, training
    EncodedPairs, validation EncodedPairs, resolved base model path). flags: the stage's data and hygiene flags
    (data_path, field_map, skip_bad_records, val_set_size, seed, cutoff_len, dedup, ...); data_tokenizer() gives
    (base model path, tokenizer), called once the records are known to be good."""
    from medlora.data.hygiene import clean_pairs
    from medlora.data.splits import split_validation
    from medlora.data.templates import PromptTemplate

    template = PromptTemplate.load(template_name)
    loaded = load_preference_pairs(flags.data_path, flags.field_map, flags.skip_bad_records)
    loaded.pairs, loaded.hygiene = clean_pairs(loaded.pairs, flags)
    training_pairs, held_out_pairs = split_validation(loaded.pairs, flags.val_set_size, flags.seed, "pairs")
    model_path, tokenizer = data_tokenizer()
    train_pairs = encode_pairs(tokenizer, template, training_pairs, flags.cutoff_len)
    val_pairs = encode_pairs(tokenizer, template, held_out_pairs, flags.cutoff_len)
    if not train_pairs.examples:
        raise MedLoRAError(f"{flags.data_path}: no training pair is left after truncation at --cutoff_len "
                           f"{flags.cutoff_len}")
    return template, loaded, train_pairs, val_pairs, model_path


def pair_summary_lines(loaded: LoadedPreferences, train_pairs: EncodedPairs, val_pairs: EncodedPairs, cutoff_len: int,
                       template, stage_note: str = "") -> list:
    """The data summary of a preference stage: pairs read, used and dropped (by reason), lengths, truncation."""
    dropped = loaded.skipped + loaded.hygiene.dropped + train_pairs.dropped + val_pairs.dropped
    lengths = sorted(len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
                     for ex in train_pairs.examples)
    return [
        f"data: {loaded.describe()}",
        *usage_lines("pairs", loaded.hygiene.checked + sum(loaded.skipped.values()), len(train_pairs.examples),
                     len(val_pairs.examples), dropped, loaded.skipped_records),
        *loaded.hygiene.lines(),
        f"template: {template.name}{stage_note}",
        f"tokens per training pair: median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
        f"truncated at cutoff_len={cutoff_len}: {train_pairs.truncated + val_pairs.truncated} pairs",
    ]
