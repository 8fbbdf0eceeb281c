"""Conversations to token ids and label masks, the same way for training and for generation prompts.

Each conversation is rendered by its template to one text and tokenized whole (batched, fast
tokenizer, character offsets), so the ids are exactly what the model sees when it is later given the
same text as a prompt. Offsets mark which tokens belong to the assistant's replies: those are the
trained tokens; every other label is -100 unless `train_on_inputs`. The EOS id is added after each
reply (when `add_eos_token` and the reply does not already end with it), so the tuned model learns to stop.
"""

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from medlora.data.templates import Conversation, PromptTemplate
from medlora.errors import MedLoRAError

IGNORE_INDEX = -100
DROPPED_BY_TRUNCATION = "no trained token left after truncation at cutoff_len"


@dataclass
class EncodedExample:
    input_ids: list
    labels: list


@dataclass
class EncodingReport:
    examples: list
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    truncated: int = 0  # kept examples that were cut at cutoff_len (dropped ones are counted in `dropped`)
    source_lengths: list = field(default_factory=list)  # every record's token length before truncation

    def percentiles(self, points=(5, 50, 95, 100)) -> dict:
        """Token lengths of the records as they are, before truncation (what --cutoff_len should be judged by)."""
        ordered = sorted(self.source_lengths)
        if not ordered:
            return {}
        return {p: ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] for p in points}

    @property
    def tokens(self) -> int:
        """Tokens of the kept examples, after truncation."""
        return sum(len(example.input_ids) for example in self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(1 for label in ex.labels[1:] if label != IGNORE_INDEX) for ex in self.examples)


def special_prefix_ids(tokenizer) -> list:
    """The ids the tokenizer puts before text by default (BOS for LLaMA and Gemma, none for Qwen or GPT-2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


class ConversationEncoder:
    def __init__(self, tokenizer, template: PromptTemplate, cutoff_len: int | None = None,
                 train_on_inputs: bool = False, add_eos_token: bool = True):
        self.tokenizer = tokenizer
        self.template = template
        self.cutoff_len = cutoff_len
        self.train_on_inputs = train_on_inputs
        self.add_eos_token = add_eos_token and tokenizer.eos_token_id is not None
        self.prefix_ids = special_prefix_ids(tokenizer)
        if not getattr(tokenizer, "is_fast", True):
            raise MedLoRAError(f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; "
                               "MedLoRA needs a fast (tokenizers-backed) tokenizer")

    def encode(self, conversations: list, batch_size: int = 1000) -> EncodingReport:
        """Training examples for every conversation; records left with no trained token are dropped and counted."""
        report = EncodingReport([])
        for start in range(0, len(conversations), batch_size):
            for input_ids, labels in self._encode_batch(conversations[start:start + batch_size]):
                report.source_lengths.append(len(input_ids))
                if self.cutoff_len and len(input_ids) > self.cutoff_len:
                    input_ids, labels = input_ids[: self.cutoff_len], labels[: self.cutoff_len]
                    if all(label == IGNORE_INDEX for label in labels[1:]):
                        report.dropped[DROPPED_BY_TRUNCATION] += 1
                        continue
                    report.truncated += 1
                report.examples.append(EncodedExample(input_ids, labels))
        return report

    def encode_prompt(self, conversation: Conversation) -> list:
        """Ids of a conversation that ends with a user turn: the prompt that generation continues."""
        if conversation.messages[-1]["role"] != "user":
            raise ValueError("a generation prompt must end with a user message")
        return next(self._encode_batch([conversation]))[0]

    def _end_at_eos(self, text: str, start: int, end: int) -> int:
        """A reply the chat template closes with the EOS text and then a newline (ChatML: "<|im_end|>\n") is
        trained up to its EOS: generation stops there, so the newline belongs to the next turn's prompt, and
        no second EOS is added after it."""
        eos_text = self.tokenizer.eos_token
        if eos_text:
            closing = text.rfind(eos_text, start, end)
            if closing >= 0 and not text[closing + len(eos_text):end].strip():
                return closing + len(eos_text)
        return end

    def encode_final_reply(self, conversations: list) -> list:
        """[(input_ids, positions)] per conversation: its ids and the positions of the tokens of its last reply's
        own text (without the template's closing text or EOS), what multiple-choice scoring sums log-probabilities
        over, as lm-evaluation-harness scores a continuation. Labels play no part: they depend on add_eos_token
        and on how the template closes a reply."""
        results = []
        for conversation, (item, prefix, ids, offsets) in zip(conversations, self._tokenize(conversations)):
            reply = conversation.messages[-1]["content"].strip()
            span_start, span_end = item.assistant_spans[-1] if item.assistant_spans else (0, 0)
            start = item.text.find(reply, span_start, span_end)
            if conversation.messages[-1]["role"] != "assistant" or not reply or start < 0:
                raise MedLoRAError(f"{conversation.source or 'a conversation'}: template '{self.template.name}' "
                                   "does not render the last reply's text as given, so it cannot be scored")
            first, last = _token_range(offsets, [s for s, _ in offsets], start, start + len(reply))
            results.append((prefix + ids, [len(prefix) + position for position in range(first, last)]))
        return results

    def _tokenize(self, conversations):
        """(rendered conversation, special prefix ids, token ids, character offsets) per conversation."""
        rendered = [self.template.render(c, self.tokenizer) for c in conversations]
        encodings = self.tokenizer([r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True)
        bos = self.tokenizer.bos_token
        for item, ids, offsets in zip(rendered, encodings["input_ids"], encodings["offset_mapping"]):
            # Chat templates often write the BOS text themselves; do not add a second one.
            prefix = [] if bos and item.text.startswith(bos) else self.prefix_ids
            yield item, prefix, ids, offsets

    def _encode_batch(self, conversations):
        eos_text, eos_id = self.tokenizer.eos_token, self.tokenizer.eos_token_id
        for item, prefix, ids, offsets in self._tokenize(conversations):
            starts = [start for start, _ in offsets]
            trained = [False] * len(ids)
            eos_positions = []
            for span_start, span_end in item.assistant_spans:
                span_end = self._end_at_eos(item.text, span_start, span_end)
                first, last = _token_range(offsets, starts, span_start, span_end)
                for position in range(first, last):
                    trained[position] = True
                if self.add_eos_token and not item.text[span_start:span_end].endswith(eos_text):
                    eos_positions.append(last)
            input_ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
            insert_at = iter(eos_positions + [None])
            next_eos = next(insert_at)
            for position, (token, is_trained) in enumerate(zip(ids, trained)):
                while next_eos == position:
                    input_ids.append(eos_id)
                    labels.append(eos_id)
                    next_eos = next(insert_at)
                input_ids.append(token)
                labels.append(token if (is_trained or self.train_on_inputs) else IGNORE_INDEX)
            while next_eos is not None:  # EOS after a reply that ends the text
                input_ids.append(eos_id)
                labels.append(eos_id)
                next_eos = next(insert_at)
            if self.train_on_inputs:
                labels = list(input_ids)
            yield input_ids, labels


def _token_range(offsets: list, starts: list, start: int, end: int) -> tuple:
    """(first, last): the tokens that cover characters start..end, a token straddling the start included
    (starts: each token's first character, offsets' first column)."""
    first = bisect_left(starts, start)
    while first > 0 and offsets[first - 1][1] > start:
        first -= 1
    return first, bisect_left(starts, end)  # tokens starting inside the span
