"""Grounded answers on the built-in tiny model: the knowledge block in the prompt (the same as in
training records), fitting it into a small context without ever cutting the question, and the
sources chat.py and generate.py's batch mode show."""

import json
from dataclasses import replace

import pytest

from medlora.data.knowledge import (
    SHORTENED_MARK,
    Passage,
    knowledge_block,
    source_lines,
)
from medlora.data.records import load_conversations
from medlora.data.tokenization import ConversationEncoder
from medlora.errors import MedLoRAError
from medlora.inference.generation import ChatModel, GenerationSettings
from medlora.inference.retrieval import KnowledgeBase
from tests.conftest import ROOT, TINY

DISEASES_CSV = ROOT / "data" / "knowledge" / "diseases.csv"
QUESTION = "It burns when I urinate and I need to go very often. What could it be?"  # docs/retrieval.md's
GREEDY = GenerationSettings(temperature=0, repetition_penalty=3.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def base_inference(tiny_model_path):
    from medlora.models.loading import load_for_inference

    return load_for_inference(TINY)


@pytest.fixture(scope="module")
def knowledge():
    return KnowledgeBase.load(DISEASES_CSV)


def user(text):
    return {"role": "user", "content": text}


def test_the_block_goes_into_the_prompt_as_in_training(base_inference, tmp_path):
    chat = ChatModel(base_inference)
    passages = [Passage("Gout attacks the big toe.", "gout", "t.csv: record 1"), Passage("Rest the foot.")]
    prepared = chat.prompt_for([user("Why does my toe hurt?")], passages=passages)
    assert prepared.sources == passages
    spec = chat.template.spec
    assert prepared.text == spec["prompt_input"].format(system=spec["system_format"].format(system=chat.template.system),
                                                        instruction="Why does my toe hurt?",
                                                        input=knowledge_block(passages))
    # a training record with the same passages as `context` starts with exactly these prompt ids
    record = {"instruction": "Why does my toe hurt?", "output": "It may be gout [1].",
              "context": [{"text": "Gout attacks the big toe.", "title": "gout"}, "Rest the foot."]}
    (tmp_path / "grounded.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    conversation = load_conversations(tmp_path / "grounded.jsonl").conversations[0]
    encoder = ConversationEncoder(chat.tokenizer, chat.template)
    trained = encoder.encode([conversation]).examples[0]
    assert trained.input_ids[:len(prepared.input_ids)] == prepared.input_ids
    assert all(label == -100 for label in trained.labels[:len(prepared.input_ids)])  # the block is not trained
    # a later turn gets the block after its question
    later = chat.prompt_for([user("Hi"), {"role": "assistant", "content": "Hello."}, user("Toe?")], passages=passages)
    assert later.text.endswith("### Instruction:\nToe?\n\n" + knowledge_block(passages) + "\n\n### Response:\n")


def test_passages_are_cut_and_the_question_never(base_inference, knowledge):
    passages = knowledge.search(QUESTION, top_k=3)
    assert len(passages) == 3
    measure = ChatModel(base_inference, max_context=100_000)
    full_length = len(measure.prompt_for([user(QUESTION)], passages=passages).input_ids)
    bare_length = len(measure.prompt_for([user(QUESTION)]).input_ids)
    context = full_length + 10
    chat = ChatModel(base_inference, max_context=context)
    assert chat.prompt_for([user(QUESTION)], max_new_tokens=10, passages=passages).sources == passages
    reserve = 10 + (full_length - bare_length) // 2  # room for about half of the passages' tokens
    prepared = chat.prompt_for([user(QUESTION)], max_new_tokens=reserve, passages=passages)
    assert len(prepared.input_ids) + reserve <= context and QUESTION in prepared.text
    assert 1 <= len(prepared.sources) < 3 or prepared.sources[-1].text.endswith(SHORTENED_MARK)
    whole, last = prepared.sources[:-1], prepared.sources[-1]
    assert whole == passages[:len(whole)]  # the best ones kept whole, in order
    original = passages[len(whole)].text
    assert last.text.endswith(SHORTENED_MARK) and original.startswith(last.text[:-len(SHORTENED_MARK)])
    assert prepared.text.endswith(knowledge_block(prepared.sources) + "\n\n### Response:\n")
    # the cut is the longest that fits (shortened() may step back to a space, by at most a fifth)
    kept_chars = len(last.text) - len(SHORTENED_MARK)
    longer = replace(passages[len(whole)], text=original[:int(1.25 * kept_chars) + 2] + SHORTENED_MARK)
    assert len(measure.prompt_for([user(QUESTION)], passages=whole + [longer]).input_ids) + reserve > context

    # older exchanges go before passages
    history = [user("My knee hurts after running."), {"role": "assistant", "content": "Rest it and use ice."}]
    with_history = chat.prompt_for(history + [user(QUESTION)], max_new_tokens=reserve, passages=passages)
    assert with_history.dropped_exchanges == 1 and with_history.sources == prepared.sources

    # no room even for a shortened passage: the bare question; no room for the question: an error
    tight = chat.prompt_for([user(QUESTION)], max_new_tokens=context - bare_length, passages=passages)
    assert tight.sources == [] and tight.input_ids == measure.prompt_for([user(QUESTION)]).input_ids
    with pytest.raises(MedLoRAError, match="the message is too long"):
        chat.prompt_for([user(QUESTION)], max_new_tokens=context - bare_length + 1, passages=passages)


# chat.py and generate.py are called in this process (their main functions, as `fire` calls them):
# a subprocess would spend most of its time importing torch again.
def test_chat_cli_prints_the_cited_sources(base_inference, knowledge, capsys):
    import chat

    chat.main(base_model=TINY, knowledge_path=str(DISEASES_CSV), prompt=QUESTION, temperature=0,
              repetition_penalty=3.0, max_new_tokens=12)
    output = capsys.readouterr()
    passages = knowledge.search(QUESTION)
    expected = ChatModel(base_inference).answer([user(QUESTION)], settings=GREEDY, passages=passages)
    answer, sources = output.out.split("\nsources:\n")
    assert answer.strip() == expected
    assert sources.splitlines() == [f"  {line}" for line in source_lines(passages)]
    assert sources.splitlines()[0] == "  [1] a urinary tract infection (UTI) (diseases.csv: record 7)"
    docs = (ROOT / "docs" / "retrieval.md").read_text(encoding="utf-8")
    assert f'--prompt "{QUESTION}"' in docs and f"```\nsources:\n{sources}```" in docs  # what the docs show
    assert "knowledge: 40 passages from" in output.err


def test_batch_predictions_carry_their_sources(base_inference, knowledge, tmp_path):
    import generate

    questions = tmp_path / "questions.jsonl"
    doctor = "If you are a doctor, please answer the medical questions based on the patient's description."
    questions.write_text("".join(json.dumps(r) + "\n" for r in [  # the third as in ChatDoctor's data
        {"instruction": QUESTION}, {"instruction": "xyzzy?"}, {"instruction": doctor, "input": QUESTION}]),
        encoding="utf-8")
    predictions = tmp_path / "predictions.jsonl"
    generate.main(base_model=TINY, knowledge_path=str(DISEASES_CSV), knowledge_top_k=2, data_file=str(questions),
                  predictions_file=str(predictions), temperature=0, repetition_penalty=3.0, max_new_tokens=12)
    first, second, third = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    passages = knowledge.search(QUESTION, top_k=2)
    assert first["sources"] == [p.to_dict() for p in passages] and len(passages) == 2
    assert knowledge_block(passages) in first["prompt"]
    assert first["prediction"] == ChatModel(base_inference).answer([user(QUESTION)], settings=GREEDY,
                                                                   passages=passages)
    assert second["sources"] == [] and "Sources:" not in second["prompt"]  # nothing matched: a plain prompt
    # a record's input is searched with its instruction
    assert third["sources"] == [p.to_dict() for p in knowledge.search(f"{doctor}\n{QUESTION}", top_k=2)]
    assert third["sources"][0]["title"] == "a urinary tract infection (UTI)"


def test_a_bad_knowledge_file_stops_chat_and_generate_before_the_model_loads(tmp_path):
    import chat
    import generate

    bad = tmp_path / "kb.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n', encoding="utf-8")
    # an unknown model would be the error if the model loaded first
    for main, flags in ((chat.main, {"prompt": "hi"}), (generate.main, {})):
        with pytest.raises(MedLoRAError) as error:
            main(base_model="builtin:no-such-model", knowledge_path=str(bad), **flags)
        assert str(error.value) == f"{bad}: record 2: field 'text': missing"
    with pytest.raises(MedLoRAError, match="--knowledge_top_k 0: must be a whole number >= 1"):
        chat.main(base_model="builtin:no-such-model", knowledge_path=str(bad), knowledge_top_k=0)


def test_finetune_trains_on_grounded_records(tmp_path, tiny_model_path):
    import finetune

    grounded = ROOT / "data" / "knowledge" / "grounded_qa.jsonl"
    result = finetune.train(base_model=TINY, data_path=str(grounded), output_dir=str(tmp_path / "out"), max_steps=2,
                            batch_size=4, micro_batch_size=4, val_set_size=0, cutoff_len=2048, warmup_steps=0,
                            save_steps=1000, prompt_template_name="alpaca")
    records = [json.loads(line) for line in grounded.read_text(encoding="utf-8").splitlines()]
    assert len(result.train_report.examples) == len(records) and result.train_report.truncated == 0
    tokenizer = result.tokenizer
    texts = {tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in result.train_report.examples}
    for record in records:  # each example holds its record's block; only the answer is trained
        passages = [Passage(c["text"], c["title"]) for c in record["context"]]
        assert any(knowledge_block(passages) in text for text in texts)
    example = result.train_report.examples[0]
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != -100],
                               skip_special_tokens=True).strip()
    assert trained in {r["output"] for r in records}
