"""Exact label masks: which tokens are trained, where EOS goes, and how truncation is counted."""

import pytest

from medlora.data.templates import Conversation, PromptTemplate
from medlora.data.tokenization import (
    DROPPED_BY_TRUNCATION,
    IGNORE_INDEX,
    ConversationEncoder,
)

ALPACA = Conversation([{"role": "user", "content": "My child has a rash.", "input": "Age 4, no fever."},
                       {"role": "assistant", "content": "It is likely eczema; see a pediatrician if it spreads."}])
MULTI = Conversation([{"role": "user", "content": "I feel dizzy when I stand up."},
                      {"role": "assistant", "content": "Do you drink enough water?"},
                      {"role": "user", "content": "Not really."},
                      {"role": "assistant", "content": "Drink more, stand up slowly, and see a doctor if it persists."}])


def runs(labels):
    """Contiguous runs of trained positions, as (start, end) index pairs."""
    spans, start = [], None
    for position, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, position))
            start = None
    return spans


def encode(tokenizer, conversation, template="alpaca", **options):
    options = {"cutoff_len": 2048, "train_on_inputs": False, "add_eos_token": True, **options}
    encoder = ConversationEncoder(tokenizer, PromptTemplate.load(template), **options)
    report = encoder.encode([conversation])
    return report, encoder


@pytest.mark.parametrize("template", ["alpaca", "chatdoctor", "chatml", "llama3", "chat"])
@pytest.mark.parametrize("conversation", [ALPACA, MULTI], ids=["alpaca-record", "multi-turn"])
def test_labels_cover_exactly_the_replies_and_their_eos(tiny_tokenizer, template, conversation):
    report, encoder = encode(tiny_tokenizer, conversation, template)
    (example,) = report.examples
    ids, labels = example.input_ids, example.labels
    assert ids[0] == tiny_tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    replies = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
    trained_runs = runs(labels)
    assert len(trained_runs) == len(replies)
    rendered = PromptTemplate.load(template).render(conversation, tiny_tokenizer)
    for (start, end), reply, (span_start, span_end) in zip(trained_runs, replies, rendered.assistant_spans):
        assert labels[start:end] == ids[start:end]
        # The run is the reply text (and the template's closing text), then exactly one EOS.
        assert ids[end - 1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(ids[start:end - 1]).strip() == rendered.text[span_start:span_end].strip()
        assert reply in tiny_tokenizer.decode(ids[start:end - 1])
    # Everything outside the runs is prompt: it decodes to the rendered text minus the replies.
    untrained = [t for t, label in zip(ids, labels) if label == IGNORE_INDEX]
    assert tiny_tokenizer.eos_token_id not in untrained[1:] or template == "chat"


def test_train_on_inputs_trains_every_token(tiny_tokenizer):
    report, _ = encode(tiny_tokenizer, MULTI, train_on_inputs=True)
    (example,) = report.examples
    assert example.labels == example.input_ids


def test_without_add_eos_token_no_eos_is_added(tiny_tokenizer):
    with_eos, _ = encode(tiny_tokenizer, MULTI)
    without, _ = encode(tiny_tokenizer, MULTI, add_eos_token=False)
    ids_with, ids_without = with_eos.examples[0].input_ids, without.examples[0].input_ids
    assert tiny_tokenizer.eos_token_id not in ids_without
    assert ids_with.count(tiny_tokenizer.eos_token_id) == 2
    assert [t for t in ids_with if t != tiny_tokenizer.eos_token_id] == ids_without


def test_generation_prompt_is_the_training_prefix(tiny_tokenizer):
    """The ids a prompt gets at generation time are those the model saw before each reply in training."""
    report, encoder = encode(tiny_tokenizer, MULTI)
    ids, labels = report.examples[0].input_ids, report.examples[0].labels
    second_reply_start = runs(labels)[1][0]
    prompt = encoder.encode_prompt(Conversation(MULTI.messages[:3]))
    assert prompt == ids[:second_reply_start]


def test_truncation_inside_the_reply_keeps_the_record_without_eos(tiny_tokenizer):
    full, _ = encode(tiny_tokenizer, ALPACA)
    length = len(full.examples[0].input_ids)
    first_trained = runs(full.examples[0].labels)[0][0]
    cut = first_trained + 3
    report, _ = encode(tiny_tokenizer, ALPACA, cutoff_len=cut)
    assert report.truncated == 1 and not report.dropped and cut < length
    (example,) = report.examples
    assert example.input_ids == full.examples[0].input_ids[:cut]
    assert example.labels == full.examples[0].labels[:cut]
    assert tiny_tokenizer.eos_token_id not in example.input_ids


def test_truncation_that_leaves_no_reply_token_drops_and_counts(tiny_tokenizer):
    full, _ = encode(tiny_tokenizer, ALPACA)
    first_trained = runs(full.examples[0].labels)[0][0]
    report, _ = encode(tiny_tokenizer, ALPACA, cutoff_len=first_trained)
    assert report.examples == [] and report.truncated == 0  # dropped, not counted as kept-and-cut
    assert report.dropped == {DROPPED_BY_TRUNCATION: 1}
    assert report.source_lengths == [len(full.examples[0].input_ids)]


def test_report_statistics(tiny_tokenizer):
    encoder = ConversationEncoder(tiny_tokenizer, PromptTemplate.load("alpaca"), cutoff_len=2048)
    report = encoder.encode([ALPACA, MULTI, ALPACA])
    lengths = [len(e.input_ids) for e in report.examples]
    assert report.source_lengths == lengths and report.tokens == sum(lengths)
    assert report.percentiles()[100] == max(lengths) and report.percentiles()[5] == min(lengths)
    # Percentiles describe the data as it is: a cut record counts with its whole length.
    cut = ConversationEncoder(tiny_tokenizer, PromptTemplate.load("alpaca"), cutoff_len=min(lengths) - 1).encode(
        [ALPACA, MULTI, ALPACA])
    assert cut.source_lengths == lengths and cut.percentiles()[100] == max(lengths)
    assert cut.truncated + sum(cut.dropped.values()) == 3 and cut.tokens < sum(lengths)
    assert report.trained_tokens == sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in report.examples)
