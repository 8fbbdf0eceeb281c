"""Reading training data: files, folders or hub datasets; format detection; validation of every record.

Formats, detected per file from the first valid record's fields (after --field_map):
  alpaca    {"instruction", "input"?, "output", "history"?, "system"?}
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value"}], "system"?}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content"}]}   (OpenAI style)
Any of them may add `context` or `knowledge`: a passage, or a list of passages (strings or
{"text", "title"?} objects), rendered as the knowledge block grounded chat answers use.

Every problem names the file, the record and the field. Every record is checked before the run
stops, so one run lists all the bad ones; with --skip_bad_records they are dropped instead, and
counted by reason in the data summary. Nothing is dropped silently.
"""

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medlora.data.templates import Conversation
from medlora.errors import MedLoRAError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bard": "assistant", "system": "system"}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
KNOWLEDGE_FIELDS = ("context", "knowledge")  # passages for a grounded answer, in any format


MAX_PROBLEMS_SHOWN = 20


@dataclass
class LoadedData:
    conversations: list
    formats: dict = field(default_factory=dict)  # source name -> (format, record count)
    skipped: Counter = field(default_factory=Counter)  # --skip_bad_records: reason -> records dropped
    skipped_records: list = field(default_factory=list)  # --skip_bad_records: "file: record N: field: reason"
    packed_dialogues: Counter = field(default_factory=Counter)  # (user, assistant) markers -> records
    split_dialogues: bool = False

    def describe(self) -> str:
        return "; ".join(f"{source}: {fmt}, {count} records" for source, (fmt, count) in self.formats.items())

    def describe_packed_dialogues(self) -> str | None:
        """The summary line about records that hold a whole dialogue in one field, or None when there are none."""
        if not self.packed_dialogues:
            return None
        kinds = ", ".join(f"{count} with '{user}:'/'{assistant}:'"
                          for (user, assistant), count in self.packed_dialogues.most_common())
        action = ("split into turns, every reply trained (--split_dialogues)" if self.split_dialogues else
                  "trained as one long instruction with the markers as text; --split_dialogues makes them real turns")
        return f"packed dialogues: {sum(self.packed_dialogues.values())} records hold a whole dialogue in one field " \
               f"({kinds}): {action}"


# The field names --field_map may map to (ours); a stage reading other records passes its own.
CONVERSATION_FIELDS = ("instruction", "input", "output", "history", "system", "conversations", "messages")


def parse_field_map(field_map, known_fields=CONVERSATION_FIELDS) -> dict:
    """--field_map '{"input": "question", "output": "answer"}': our field name -> the file's column name;
    a key that is none of our fields, or two of ours mapped to one column, is refused naming the key."""
    if field_map is None or field_map == "":
        return {}
    if isinstance(field_map, str):
        try:
            field_map = json.loads(field_map)
        except json.JSONDecodeError as error:
            raise MedLoRAError(f"--field_map: not a JSON object: {error}") from None
    if not isinstance(field_map, dict) or not all(isinstance(v, str) for v in field_map.values()):
        raise MedLoRAError("--field_map: must map our field names to column names, e.g. '{\"output\": \"answer\"}'")
    for ours in field_map:
        if ours not in known_fields:
            close = [name for name in known_fields if name.startswith(ours[:3])]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise MedLoRAError(f"--field_map: key '{ours}' is not one of our fields{hint}; the keys are ours "
                               f"({', '.join(known_fields)}), the values your columns")
    columns = list(field_map.values())
    for ours, theirs in field_map.items():
        if columns.count(theirs) > 1:
            others = [key for key, value in field_map.items() if value == theirs and key != ours]
            raise MedLoRAError(f"--field_map: keys '{ours}' and '{others[0]}' both map to column '{theirs}'; "
                               "each column can fill one field")
    return dict(field_map)


def load_conversations(data_path, field_map=None, skip_bad_records=False, split_dialogues=False) -> LoadedData:
    """Read and validate every record of a file, a folder of files or a hub dataset; alpaca records that pack a
    whole dialogue into one field are counted, and with split_dialogues turned into real turns."""
    from medlora.data.dialogues import find_packed_dialogue, split_packed_dialogue

    loaded = LoadedData([], split_dialogues=split_dialogues)

    def convert(record, fmt, where):
        conversation = to_conversation(record, fmt, where)
        if fmt != "alpaca" or len(conversation.messages) != 2:  # turns given, or a history: not packed
            return conversation
        first = conversation.messages[0]
        text = f"{first['content']}\n{first.get('input', '')}".strip()
        markers = find_packed_dialogue(text)
        if markers:
            if split_dialogues:
                conversation.messages = split_packed_dialogue(text, markers, conversation.messages[1]["content"],
                                                              where)
            loaded.packed_dialogues[markers] += 1
        return conversation

    loaded.conversations, loaded.formats, loaded.skipped_records = validate_records(
        data_path, field_map, detect_format, convert, skip_bad_records)
    loaded.skipped = skip_reasons(loaded.skipped_records)
    return loaded


def load_held_out(data_path, skip_bad_records=False) -> list:
    """evaluate.py's --perplexity_path: its conversations; the records --skip_bad_records dropped are counted by
    reason and listed in the summary lines printed here."""
    loaded = load_conversations(data_path, skip_bad_records=skip_bad_records)
    for line in skipped_lines(data_path, "records", loaded.skipped_records):
        print(line, flush=True)
    return loaded.conversations


def validate_records(data_path, field_map, detect, convert, skip_bad_records=False,
                     known_fields=CONVERSATION_FIELDS) -> tuple:
    """(items, {source: (format, records)}, the problems of skipped records): every record of every source is
    checked, so that one run reports all the bad ones (the first MAX_PROBLEMS_SHOWN of them, and how many
    more), and nothing is trained. With skip_bad_records they are dropped instead, and counted by reason."""
    field_map = parse_field_map(field_map, known_fields)
    items, formats, problems = [], {}, []
    for source, records in read_sources(data_path):
        fmt = None
        for number, raw in records:
            try:
                record = rename_fields(raw, field_map, source, number)
                fmt = fmt or detect(record, source, number)
                items.append(convert(record, fmt, f"{source}: record {number}"))
            except MedLoRAError as problem:
                problems.append(str(problem))
        formats[source] = (fmt or "unknown", len(records))
    refuse_bad_records(data_path, problems, skip_bad_records, kept=len(items))
    return items, formats, problems


def refuse_bad_records(data_path, problems: list, skip_bad_records: bool, kept: int,
                       rest: str | None = "trains on the rest") -> None:
    """Stop with every problem found (one line for one; else the first MAX_PROBLEMS_SHOWN and the count of the
    rest), unless skip_bad_records and some record is left. rest: what the stage does with the good records
    under --skip_bad_records; None for a reader whose script has no such flag."""
    if len(problems) == 1 and not skip_bad_records:
        raise MedLoRAError(problems[0])
    if problems and not skip_bad_records:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        hint = f"; --skip_bad_records drops them and {rest}" if rest else ""
        raise MedLoRAError(f"{data_path}: {len(problems)} bad record{'s' if len(problems) > 1 else ''} (nothing was "
                           f"written{hint}):\n  {shown}{more}")
    if problems and not kept:
        raise MedLoRAError(f"{data_path}: every record is bad; the first: {problems[0]}")


def skip_reasons(problems: list) -> Counter:
    """Skipped records counted by reason: the problem without its place ("file: record 7: field 'output': empty"
    -> "field 'output': empty")."""
    return Counter(problem.split(": ", 2)[-1] for problem in problems)


def usage_lines(unit: str, read: int, train: int, validation: int, dropped: Counter, skipped_records: list) -> list:
    """The data summary's account of every record: read, used, dropped by reason, and which ones were skipped."""
    lines = [f"{unit}: {read} read, {train + validation} used ({train} train, {validation} validation), "
             f"{sum(dropped.values())} dropped" + "".join(f"; {n} dropped: {reason}" for reason, n in dropped.items())]
    return lines + skipped_list(skipped_records)


def skipped_list(skipped_records: list) -> list:
    """Which records --skip_bad_records dropped, each with its place and reason (the first MAX_PROBLEMS_SHOWN)."""
    lines = [f"  skipped: {problem}" for problem in skipped_records[:MAX_PROBLEMS_SHOWN]]
    if len(skipped_records) > MAX_PROBLEMS_SHOWN:
        lines.append(f"  ... and {len(skipped_records) - MAX_PROBLEMS_SHOWN} more skipped")
    return lines


def skipped_lines(source, unit: str, skipped_records: list) -> list:
    """The summary's account of the records --skip_bad_records dropped from a reader with no train/validation
    split (rl.py's prompts, evaluate.py's questions): how many, counted by reason, and which ones."""
    if not skipped_records:
        return []
    dropped = skip_reasons(skipped_records)
    lines = [f"{source}: {len(skipped_records)} bad {unit} dropped (--skip_bad_records)"
             + "".join(f"; {n} dropped: {reason}" for reason, n in dropped.items())]
    return lines + skipped_list(skipped_records)


def read_sources(data_path) -> list:
    """[(source name, [(record number, record)])] for a file, a folder of files or a hub dataset; an empty
    source is an error."""
    path = Path(str(data_path)).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUPPORTED_SUFFIXES and p.is_file())
        if not files:
            raise MedLoRAError(f"{path}: folder has no {'/'.join(SUPPORTED_SUFFIXES)} files")
        sources = [(str(p), read_file_records(p)) for p in files]
    elif path.is_file():
        sources = [(str(path), read_file_records(path))]
    elif path.suffix in SUPPORTED_SUFFIXES or str(data_path).startswith((".", "/", "~")):
        raise MedLoRAError(f"{data_path}: no such file or folder")
    else:
        sources = [(str(data_path), read_hub_records(str(data_path)))]
    for source, records in sources:
        if not records:
            raise MedLoRAError(f"{source}: no records (empty file)")
    return sources


# ---- reading -----------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """A text file as UTF-8 (a leading byte-order mark is allowed); anything else is refused naming the byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise MedLoRAError(f"{path}: not UTF-8 text: byte offset {error.start} (line {line}) is "
                           f"{data[error.start:error.start + 1]!r}; convert the file to UTF-8 "
                           "(e.g. iconv -f GB18030 -t UTF-8)") from None


def read_file_records(path: Path) -> list:
    """[(record number, record)]; record numbers are 1-based (JSON Lines: the line number)."""
    path = Path(path)
    if path.suffix == ".csv":
        import io

        return list(enumerate(csv.DictReader(io.StringIO(read_text(path), newline="")), start=1))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    return parse_json_records(read_text(path), path)


def parse_json_records(text: str, path) -> list:
    """[(record number, record)] of a JSON array, or of JSON Lines (numbered by line; blank lines skipped)."""
    if text.lstrip().startswith("["):  # a JSON array (a .json file may also hold JSON Lines)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise MedLoRAError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
        return list(enumerate(records, start=1))
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise MedLoRAError(f"{path}: record {line_number}: invalid JSON: {error.msg} (column {error.colno})") from None
    return records


def read_hub_records(name: str) -> list:
    """A dataset on the Hugging Face hub (or any name `datasets.load_dataset` understands): its train split."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as error:  # the datasets library raises many types; the user needs the message
        raise MedLoRAError(f"{name}: not a local file or folder, and loading it as a hub dataset failed: "
                           f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    return list(enumerate(dataset, start=1))


def rename_fields(record, field_map: dict, source: str, number: int) -> dict:
    if not isinstance(record, dict):
        raise MedLoRAError(f"{source}: record {number}: expected a JSON object, got {type(record).__name__}")
    if not field_map:
        return record
    renamed = dict(record)
    for ours, theirs in field_map.items():
        if theirs not in record:
            raise MedLoRAError(f"{source}: record {number}: field '{theirs}' (mapped to '{ours}' by --field_map): missing")
        renamed[ours] = renamed.pop(theirs)
    return renamed


# (format, the fields that identify it), tried in order
SFT_FORMATS = [("sharegpt", {"conversations"}), ("messages", {"messages"}), ("alpaca", {"instruction"}),
               ("alpaca", {"output"})]


def detect_by_fields(record: dict, formats: list, source: str, number: int, expected: str) -> str:
    """The first of `formats` whose identifying fields the record has, else a one-line error naming the record."""
    for name, fields in formats:
        if fields <= record.keys():
            return name
    raise MedLoRAError(f"{source}: record {number}: unknown format: fields {sorted(record)}; expected {expected}; "
                       "map other names with --field_map")


def detect_format(record: dict, source: str, number: int) -> str:
    return detect_by_fields(record, SFT_FORMATS, source, number,
                            "alpaca (instruction/input/output), sharegpt (conversations) or messages")


# ---- validation ----------------------------------------------------------------------------------------
def field_text(record: dict, key: str, where: str, required=True, allow_empty=False, field_name=None) -> str:
    """record[key] as a string; field_name is how the error names it (default: key)."""
    value, field_name = record.get(key), field_name or key
    if value is None:
        if required:
            raise MedLoRAError(f"{where}: field '{field_name}': missing")
        return ""
    if not isinstance(value, str):
        raise MedLoRAError(f"{where}: field '{field_name}': expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise MedLoRAError(f"{where}: field '{field_name}': empty")
    return value


def to_conversation(record: dict, fmt: str, where: str) -> Conversation:
    """The record as a Conversation; its `context` or `knowledge` field (a passage, or a list of them)
    goes into the last user message as the knowledge block chat answers use (medlora/data/knowledge.py)."""
    conversation = _alpaca(record, where) if fmt == "alpaca" else _turns(record, fmt, where)
    present = [key for key in KNOWLEDGE_FIELDS if record.get(key) not in (None, "", [])]
    if len(present) > 1:
        raise MedLoRAError(f"{where}: fields 'context' and 'knowledge': give the passages in one of them")
    if present:
        from medlora.data.knowledge import passages_from_field, with_knowledge

        passages = passages_from_field(record[present[0]], where, present[0])
        last_user = len(conversation.messages) - 2  # the records end with the assistant's reply
        conversation.messages[last_user] = with_knowledge(conversation.messages[last_user], passages)
    return conversation


def _turns(record: dict, fmt: str, where: str) -> Conversation:
    system = field_text(record, "system", where, required=False, allow_empty=True) or None
    messages, system = parse_turns(record, fmt, where, system, last_role="assistant")
    return Conversation(messages, system, where)


def parse_turns(record: dict, fmt: str, where: str, system, last_role: str) -> tuple:
    """(messages, system) of a sharegpt or messages record: alternating user/assistant turns after an optional
    system turn, the last one `last_role`'s (the assistant's in SFT data, the user's in a preference prompt)."""
    key, role_key, content_key, roles = (
        ("conversations", "from", "value", SHAREGPT_ROLES) if fmt == "sharegpt"
        else ("messages", "role", "content", MESSAGE_ROLES)
    )
    last_turn = "the assistant's reply" if last_role == "assistant" else "the user's (chosen and rejected answer it)"
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        ending = "" if last_role == "assistant" else " ending with the user's"
        raise MedLoRAError(f"{where}: field '{key}': expected a non-empty list of turns{ending}")
    messages = []
    for index, turn in enumerate(turns):
        turn_field = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise MedLoRAError(f"{where}: field '{turn_field}': expected an object with '{role_key}' and '{content_key}'")
        role = roles.get(str(turn.get(role_key)).lower())
        if role is None:
            raise MedLoRAError(f"{where}: field '{turn_field}.{role_key}': unknown role {turn.get(role_key)!r}; "
                               f"expected one of {sorted(roles)}")
        content = field_text(turn, content_key, where, allow_empty=(role == "system"),
                             field_name=f"{turn_field}.{content_key}")
        if role == "system":
            if index != 0:
                raise MedLoRAError(f"{where}: field '{turn_field}.{role_key}': a system turn may only come first")
            system = content or system
            continue
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if role != expected:
            raise MedLoRAError(f"{where}: field '{turn_field}.{role_key}': expected a {expected} turn "
                               "(turns must alternate, user first)")
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != last_role:
        raise MedLoRAError(f"{where}: field '{key}': the last turn must be {last_turn}")
    return messages, system


def _alpaca(record: dict, where: str) -> Conversation:
    instruction = field_text(record, "instruction", where, allow_empty=True)
    user_input = field_text(record, "input", where, required=False, allow_empty=True)
    if not instruction.strip() and not user_input.strip():
        raise MedLoRAError(f"{where}: field 'instruction': empty (and no 'input')")
    output = field_text(record, "output", where)
    system = field_text(record, "system", where, required=False, allow_empty=True) or None
    messages = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise MedLoRAError(f"{where}: field 'history': expected a list of [question, answer] pairs")
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise MedLoRAError(f"{where}: field 'history[{index}]': expected a pair of non-empty strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    first_user = {"role": "user", "content": instruction}
    if user_input.strip():
        first_user["input"] = user_input
    if messages:  # with history, the record's own question is the last turn; its input joins the text
        first_user = {"role": "user", "content": f"{instruction}\n\n{user_input}".strip()}
    messages += [first_user, {"role": "assistant", "content": output}]
    return Conversation(messages, system, where)

