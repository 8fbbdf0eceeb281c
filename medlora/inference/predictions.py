"""generate.py's batch mode: answer every record of a file without the UI.

read_prediction_records   the questions, from any format medlora.records reads; a record's own last
                          reply is kept as the reference answer and never shown to the model
write_predictions         one JSON line per record, written atomically, with a progress bar; with a
                          knowledge base, each question's passages go into its prompt and the line
                          gets `sources` (the passages as numbered in the prompt)
"""

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medlora.data.records import (
    SUPPORTED_SUFFIXES,
    detect_format,
    read_file_records,
    refuse_bad_records,
    rename_fields,
    to_conversation,
)
from medlora.errors import MedLoRAError
from medlora.inference.generation import ChatModel, GenerationSettings, final_text


@dataclass
class PredictionRecord:
    number: int  # as records.read_file_records numbers them (JSON Lines: the line number)
    messages: list  # ending with the user's turn
    system: str | None
    reference: str | None  # the record's own answer, when it has one
    source: str


def read_prediction_records(data_file, skip_bad_records: bool = False) -> list:
    """Questions to answer, in any format medlora.records reads: alpaca records (output optional),
    messages/sharegpt records ending with the user's turn, or plain strings (one question each). A record that ends with an assistant reply
    keeps it as the reference answer, which is not shown to the model. Every record is checked before any is
    refused, so one run lists all the bad ones; with skip_bad_records they are dropped (read_predictions_checked
    also says which)."""
    return read_predictions_checked(data_file, skip_bad_records, rest=None)[0]


def read_predictions_checked(data_file, skip_bad_records: bool = False, rest: str | None = None) -> tuple:
    """(records, the problems of the records skipped) of read_prediction_records; rest: what the caller does
    with the good records under --skip_bad_records (None: generate.py, which has no such flag)."""
    path = Path(str(data_file)).expanduser()
    if not path.is_file():
        raise MedLoRAError(f"--data_file {data_file}: no such file")
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise MedLoRAError(f"--data_file {data_file}: unsupported file type; use {', '.join(SUPPORTED_SUFFIXES)}")
    # A plain list of questions (data/sample_questions.json) is a list of instructions.
    raw = [(number, {"instruction": record} if isinstance(record, str) else record)
           for number, record in read_file_records(path)]
    if not raw:
        raise MedLoRAError(f"{path}: no records (empty file)")
    records, problems, fmt = [], [], None
    for number, record in raw:
        where = f"{path}: record {number}"
        try:
            record = rename_fields(record, {}, str(path), number)
            fmt = fmt or detect_format(record, str(path), number)
            record, has_reference = with_reply_slot(record, fmt, where)
            conversation = to_conversation(record, fmt, where)
        except MedLoRAError as problem:
            problems.append(str(problem))
            continue
        reply = conversation.messages.pop()
        records.append(PredictionRecord(number, conversation.messages, conversation.system,
                                        reply["content"] if has_reference else None, where))
    refuse_bad_records(path, problems, skip_bad_records, kept=len(records), rest=rest)
    return records, problems


def with_reply_slot(record: dict, fmt: str, where: str) -> tuple:
    """The record with a placeholder reply where it has none, so records.to_conversation validates it
    like a training record; and whether the record had its own reply."""
    placeholder = "(to be predicted)"
    if fmt == "alpaca":
        if record.get("output") in (None, ""):
            return {**record, "output": placeholder}, False
        return record, True
    key, role_key, content_key, assistant = (("conversations", "from", "value", "gpt") if fmt == "sharegpt"
                                             else ("messages", "role", "content", "assistant"))
    turns = record.get(key)
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict):
        return record, True  # to_conversation explains what is wrong
    if str(turns[-1].get(role_key)).lower() in ("user", "human"):
        return {**record, key: turns + [{role_key: assistant, content_key: placeholder}]}, False
    return record, True


def write_predictions(chat: ChatModel, records: list, predictions_file, settings: GenerationSettings,
                      knowledge=None) -> dict:
    """Answer every record and write one JSON line per record, atomically: a temporary file in the same
    folder, renamed over predictions_file only when every answer is written. knowledge: a
    retrieval.KnowledgeBase searched with each record's question."""
    from tqdm import tqdm

    started = time.time()
    from medlora.inference.retrieval import search_text

    prompts = [chat.prompt_for(r.messages, r.system, settings.max_new_tokens, r.source,
                               passages=knowledge.search(search_text(r.messages[-1])) if knowledge else None)
               for r in records]
    target = Path(str(predictions_file)).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            for record, prompt in tqdm(list(zip(records, prompts, strict=True)), desc="predicting", unit="record"):
                prediction = final_text(chat.stream_prompt(prompt.input_ids, settings))
                line = {"record": record.number, "prompt": prompt.text, "prediction": prediction}
                if record.reference is not None:
                    line["reference"] = record.reference
                if knowledge:
                    line["sources"] = [passage.to_dict() for passage in prompt.sources]
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return dict(records=len(records), seconds=time.time() - started, settings=asdict(settings),
                trimmed=sum(1 for p in prompts if p.dropped_exchanges))
