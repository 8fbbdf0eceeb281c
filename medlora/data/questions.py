"""Medical multiple-choice question files and their prompts (used by evaluate.py).

Question files are JSON arrays or JSON Lines; the format is detected per file from its first record:
  medqa     {"question", "options": {"A": text, ...} or [text, ...], "answer_idx" or "answer"}
            the answer is a letter ("C") or a 0-based index; "answer" may also be the correct option's
            text (MedQA's own files carry both). MMLU-style "choices" is read like "options".
            A triage set adds "urgency": {"A": level, ...}, each option's urgency level (URGENCY_LEVELS),
            and evaluate.py then reports under- and over-triage beside the accuracy.
  medmcqa   {"question", "opa", "opb", "opc", "opd", "cop"}; cop is 1-based (1 = opa), as in MedMCQA's files
  pubmedqa  {"question", "context": text or {"contexts": [text, ...]}, "final_decision": "yes"|"no"|"maybe"}
            scored as the options A. yes / B. no / C. maybe

Every question becomes a conversation in the prompt template: the user turn is the question with one
"A. text" line per option (PubMedQA's context goes in the template's input slot); the reply is the
option written the same way, "C. Vitamin C". Few-shot examples are earlier turns with their replies.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

from medlora.data.records import (
    field_text,
    read_sources,
    refuse_bad_records,
    rename_fields,
    skipped_lines,
)
from medlora.data.templates import Conversation
from medlora.errors import MedLoRAError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# A triage option's urgency, most urgent first: the emergency department now, a doctor within days, care at home,
# nothing at all.
URGENCY_LEVELS = ("emergency", "soon", "self_care", "none")
PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]
QUESTION_SUFFIXES = (".json", ".jsonl")
ANSWER_INSTRUCTION = "Answer with the letter of the correct option."


@dataclass
class Question:
    question: str
    options: list  # option texts in letter order
    answer: int  # index of the correct option
    context: str = ""
    source: str = ""  # "file: record N"
    id: str | None = None  # the record's own "id" (MedMCQA) or "pubid" (PubMedQA), for joining reports
    urgency: list | None = None  # a triage set's urgency level of each option (URGENCY_LEVELS), else None

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


@dataclass
class QuestionFile:
    path: str
    format: str
    questions: list
    skipped_records: list = field(default_factory=list)  # --skip_bad_records: "file: record N: field: reason"

    def skipped_lines(self) -> list:
        """The summary's account of the questions --skip_bad_records dropped (none: no lines)."""
        return skipped_lines(self.path, "questions", self.skipped_records)


# ---- reading question files ----------------------------------------------------------------------------------
def question_files(data_path) -> list:
    """--data_path: a file, a folder of .json/.jsonl files, or several paths (a list or "a,b")."""
    paths = list(data_path) if isinstance(data_path, (list, tuple)) else str(data_path).split(",")
    files = []
    for path in (Path(str(p).strip()).expanduser() for p in paths if str(p).strip()):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in QUESTION_SUFFIXES and p.is_file())
            if not found:
                raise MedLoRAError(f"{path}: folder has no .json or .jsonl question files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise MedLoRAError(f"{path}: no such file or folder")
    if not files:
        raise MedLoRAError("--data_path is empty; give a question file or folder")
    return files


def load_question_file(path, skip_bad_records: bool = False) -> QuestionFile:
    """Every question of a .json/.jsonl file. Every record is checked before any is refused, so one run lists all
    the bad ones (records.refuse_bad_records); with skip_bad_records they are dropped, and the summary lines say
    which, printed here (before any model loads) and kept in QuestionFile.skipped_records."""
    path = Path(path)
    if path.suffix not in QUESTION_SUFFIXES:
        raise MedLoRAError(f"{path}: question files are .json or .jsonl")
    questions, fmt, problems = [], None, []
    for number, record in read_sources(path)[0][1]:  # (an empty file is refused there)
        where = f"{path}: record {number}"
        try:
            record = rename_fields(record, {}, str(path), number)
            fmt = fmt or detect_question_format(record, where)
            question = {"medqa": _medqa, "medmcqa": _medmcqa, "pubmedqa": _pubmedqa}[fmt](record, where)
        except MedLoRAError as problem:
            problems.append(str(problem))
            continue
        record_id = record.get("id", record.get("pubid"))
        question.id = None if record_id is None else str(record_id)
        questions.append(question)
    triage = [q for q in questions if q.urgency is not None]
    if triage and len(triage) < len(questions):  # a triage file's metrics need every question's levels
        problems += [f"{q.source}: field 'urgency': missing (the file's other records carry it)"
                     for q in questions if q.urgency is None]
        questions = triage
    refuse_bad_records(path, problems, skip_bad_records, kept=len(questions), rest="scores the rest")
    loaded = QuestionFile(str(path), fmt, questions, problems)
    for line in loaded.skipped_lines():  # the data summary's account of what was dropped
        print(line, flush=True)
    return loaded


def detect_question_format(record: dict, where: str) -> str:
    if "options" in record or "choices" in record:
        return "medqa"
    if "opa" in record:
        return "medmcqa"
    if "final_decision" in record:
        return "pubmedqa"
    raise MedLoRAError(f"{where}: unknown question format: fields {sorted(record)}; expected medqa (question, options, "
                       "answer_idx), medmcqa (question, opa..opd, cop) or pubmedqa (question, context, final_decision)")


def _option_text(value, where: str, field_name: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return field_text({field_name: value}, field_name, where)


def _medqa(record: dict, where: str) -> Question:
    question = field_text(record, "question", where)
    key = "options" if "options" in record else "choices"
    if key not in record:
        raise MedLoRAError(f"{where}: field 'options': missing (give the options as 'options' or 'choices')")
    options = record[key]
    if isinstance(options, dict):
        expected = list(LETTERS[: len(options)])
        if sorted(options) != expected:
            raise MedLoRAError(f"{where}: field '{key}': keys must be the letters {', '.join(expected)}; "
                               f"got {', '.join(map(str, options))}")
        options = [_option_text(options[letter], where, f"{key}.{letter}") for letter in expected]
    elif isinstance(options, list):
        options = [_option_text(text, where, f"{key}[{index}]") for index, text in enumerate(options)]
    else:
        raise MedLoRAError(f"{where}: field '{key}': expected an object of letter -> text, or a list of texts")
    if not 2 <= len(options) <= len(LETTERS):
        raise MedLoRAError(f"{where}: field '{key}': expected 2 to 26 options, got {len(options)}")
    _refuse_repeated_options(options, where, key)
    answer_key = "answer_idx" if "answer_idx" in record else "answer"
    if answer_key not in record:
        raise MedLoRAError(f"{where}: field 'answer_idx': missing (give the correct option as 'answer_idx' or 'answer')")
    answer = _answer(record[answer_key], options, where, answer_key)
    urgency = _urgency(record["urgency"], len(options), answer, where) if "urgency" in record else None
    return Question(question, options, answer, source=where, urgency=urgency)


def _urgency(value, count: int, answer: int, where: str) -> list:
    """A triage record's urgency of each option, in letter order."""
    letters = LETTERS[:count]
    if not isinstance(value, dict) or sorted(value) != list(letters):
        raise MedLoRAError(f"{where}: field 'urgency': expected an object with the option letters {', '.join(letters)} "
                           f"as keys, each option's level ({', '.join(URGENCY_LEVELS)})")
    for letter in letters:
        if value[letter] not in URGENCY_LEVELS:
            raise MedLoRAError(f"{where}: field 'urgency.{letter}': {value[letter]!r} is not a level; expected one of "
                               f"{', '.join(URGENCY_LEVELS)}")
    if value[letters[answer]] == "none":
        raise MedLoRAError(f"{where}: field 'urgency': the answer {letters[answer]} is 'none'; a triage scenario's "
                           "right advice is emergency, soon or self_care")
    return [value[letter] for letter in letters]


def _refuse_repeated_options(options: list, where: str, field_name: str) -> None:
    """Two options with the same text (case and spacing aside) make a question that cannot be scored: both get
    the same score but the letter, and only one can be the answer."""
    seen = {}
    for index, text in enumerate(options):
        normalized = " ".join(text.split()).casefold()
        if normalized in seen:
            raise MedLoRAError(f"{where}: field '{field_name}': options {LETTERS[seen[normalized]]} and {LETTERS[index]} "
                               f"are the same text ({text.strip()[:60]!r}); a question needs distinct options")
        seen[normalized] = index


def _answer(value, options: list, where: str, field_name: str) -> int:
    """A letter, a 0-based index or (for 'answer') the correct option's text."""
    letters = LETTERS[: len(options)]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(options):
        return value
    if isinstance(value, str) and value.strip().upper() in letters and len(value.strip()) == 1:
        return letters.index(value.strip().upper())
    if isinstance(value, str) and field_name == "answer" and value.strip() in [o.strip() for o in options]:
        return [o.strip() for o in options].index(value.strip())
    raise MedLoRAError(f"{where}: field '{field_name}': {value!r} is not an option; expected a letter "
                       f"{letters[0]}-{letters[-1]} or a 0-based index 0-{len(options) - 1}")


def _medmcqa(record: dict, where: str) -> Question:
    question = field_text(record, "question", where)
    options = [_option_text(record.get(key), where, key) for key in ("opa", "opb", "opc", "opd")]
    _refuse_repeated_options(options, where, "opa-opd")
    cop = record.get("cop")
    if cop is None:
        raise MedLoRAError(f"{where}: field 'cop': missing")
    if isinstance(cop, bool) or not isinstance(cop, int) or not 1 <= cop <= 4:
        raise MedLoRAError(f"{where}: field 'cop': expected 1-4 (1-based, 1 = opa, as in MedMCQA's files), "
                           f"got {cop!r}; 0-based exports need 1 added")
    return Question(question, options, cop - 1, source=where)


def _pubmedqa(record: dict, where: str) -> Question:
    question = field_text(record, "question", where)
    context = record.get("context")
    if isinstance(context, dict):
        contexts = context.get("contexts")
        if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
            raise MedLoRAError(f"{where}: field 'context.contexts': expected a non-empty list of texts")
        context = "\n".join(contexts)
    else:
        context = field_text(record, "context", where)
    decision = field_text(record, "final_decision", where).strip().lower()
    if decision not in PUBMEDQA_OPTIONS:
        raise MedLoRAError(f"{where}: field 'final_decision': expected yes, no or maybe, got {record['final_decision']!r}")
    return Question(question, list(PUBMEDQA_OPTIONS), PUBMEDQA_OPTIONS.index(decision), context, where)


# ---- prompts ---------------------------------------------------------------------------------------------------
def reply_text(question: Question, index: int) -> str:
    return f"{question.letters[index]}. {question.options[index]}"


def question_text(question: Question) -> str:
    options = "\n".join(reply_text(question, index) for index in range(len(question.options)))
    return f"{question.question.strip()}\n\n{options}\n\n{ANSWER_INSTRUCTION}"


def conversation(question: Question, shots=(), reply_index: int | None = None) -> Conversation:
    """Few-shot examples as earlier turns with their correct replies, then the question, then
    (for scoring) one option's reply. Only the first turn has the template's input slot, so a
    later turn's context is written before its question."""
    messages = []
    for position, turn in enumerate([*shots, question]):
        message = {"role": "user", "content": question_text(turn)}
        if turn.context and not messages:
            message["input"] = turn.context
        elif turn.context:
            message["content"] = f"Context: {turn.context}\n\n{message['content']}"
        messages.append(message)
        if position < len(shots):
            messages.append({"role": "assistant", "content": reply_text(turn, turn.answer)})
    if reply_index is not None:
        messages.append({"role": "assistant", "content": reply_text(question, reply_index)})
    return Conversation(messages, source=question.source)


def pick_fewshot(questions: list, pool: list, num_fewshot: int, seed: int, same_file: bool) -> list:
    """num_fewshot examples for every question, drawn with a per-question seeded generator, so a
    question's examples do not change with --limit or the other questions. A question never serves
    as its own example, nor does a copy of it in the pool (a dev split overlapping the test split)."""
    if num_fewshot <= 0:
        return [[] for _ in questions]
    shots = []
    for index, question in enumerate(questions):
        candidates = [other for position, other in enumerate(pool)
                      if not (same_file and position == index) and other.question != question.question]
        if len(candidates) < num_fewshot:
            raise MedLoRAError(f"--num_fewshot {num_fewshot}: only {len(candidates)} example questions available "
                               f"for {question.source}")
        shots.append(random.Random(f"{seed}:{index}").sample(candidates, num_fewshot))
    return shots
