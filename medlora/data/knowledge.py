"""Knowledge for grounded answers: passages read from the user's files, and the prompt block they go in.

Files (`--knowledge_path`: one of these, or a folder of them, searched recursively):
  .csv          each row is a passage, written as `column: value` lines (empty values left out); the
                title is the row's `title`, `name` or `disease` column when it has one
  .jsonl/.json  records with a `text` field, and optional `title` and `source` strings
  .txt/.md      split into passages of at most PASSAGE_CHARS characters that end at paragraph or
                sentence ends (. ! ? and Chinese 。！？；); a passage cut inside a paragraph repeats up to
                OVERLAP_CHARS of its last sentences at the start of the next one, so that a fact on
                the seam is whole in one of them; .md passages are titled with their latest heading

The prompt block (`knowledge_block`), the same for chat, batch answers, the API and fine-tuning
records with a `context`/`knowledge` field:

    Sources:
    [1] <title>
    <text>

    [2] ...

    Answer from the numbered sources above and cite them by number, like [1]. If they do not cover
    the question, say so.

It goes into the user's latest message as the template's `input` (alpaca: `### Input:`; medalpaca:
`Context:`; tokenizer chat templates: after the question). How it is fitted into the model's context
is ChatModel.prompt_for's job: the question is never cut, passages are.
"""

import csv
import hashlib
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from medlora.errors import MedLoRAError

KNOWLEDGE_SUFFIXES = (".csv", ".jsonl", ".json", ".txt", ".md")
PASSAGE_CHARS = 600  # about 150 English tokens: three passages and a question fit a 2k context easily
OVERLAP_CHARS = 120  # at most this much of a passage's last sentences starts the next one
TITLE_COLUMNS = ("title", "name", "disease")
BLOCK_HEADER = "Sources:"
BLOCK_INSTRUCTION = ("Answer from the numbered sources above and cite them by number, like [1]. "
                     "If they do not cover the question, say so.")
SHORTENED_MARK = " …"  # ends a passage that was cut to fit the context
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|(?<=[。！？；])")
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
MARKDOWN_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


@dataclass(frozen=True)
class Passage:
    text: str
    title: str = ""
    source: str = ""  # where it is: "diseases.csv: record 3", "notes.md: line 12", or the record's own `source`
    score: float | None = None  # BM25 score, set by KnowledgeBase.search

    def label(self) -> str:
        """A short name for the sources list: the title, else the text's first line."""
        first_line = self.title or self.text.strip().splitlines()[0]
        return first_line if len(first_line) <= 80 else first_line[:77] + "..."

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the prompt block and the sources list ---------------------------------------------------------------
def knowledge_block(passages: list) -> str:
    """The numbered passages and the instruction to answer from them; "" for no passage."""
    if not passages:
        return ""
    entries = [f"[{number}] {p.title}\n{p.text}" if p.title else f"[{number}] {p.text}"
               for number, p in enumerate(passages, start=1)]
    return f"{BLOCK_HEADER}\n" + "\n\n".join(entries) + f"\n\n{BLOCK_INSTRUCTION}"


def with_knowledge(message: dict, passages: list) -> dict:
    """A user message with the knowledge block as its `input` (after an input it already has)."""
    block = knowledge_block(passages)
    if not block:
        return message
    input_text = "\n\n".join(part for part in (message.get("input", ""), block) if part)
    return {**message, "input": input_text}


def source_lines(passages: list) -> list:
    """["[1] influenza (flu) (diseases.csv: record 2)", ...], numbered as in the prompt block."""
    return [f"[{number}] {p.label()}" + (f" ({p.source})" if p.source else "")
            for number, p in enumerate(passages, start=1)]


def shortened(passage: Passage, chars: int) -> Passage:
    """The passage cut to its first `chars` characters (at a space when there is one nearby), marked."""
    cut = passage.text[:chars]
    space = cut.rfind(" ")
    if space > chars * 0.8:
        cut = cut[:space]
    return replace(passage, text=cut.rstrip() + SHORTENED_MARK)


def passages_from_field(value, where: str, name: str) -> list:
    """A training record's `context`/`knowledge` field: a string, or a list of strings or
    {"text", "title"?} objects."""
    items = value if isinstance(value, list) else [value]
    passages = []
    for index, item in enumerate(items):
        field_name = f"{name}[{index}]" if isinstance(value, list) else name
        if isinstance(item, dict):
            passages.append(passage_from_object(item, where, f"{field_name}."))
        elif isinstance(item, str) and item.strip():
            passages.append(Passage(item.strip()))
        else:
            raise MedLoRAError(f"{where}: field '{field_name}': expected a non-empty string or a "
                               f"{{\"text\", \"title\"?}} object, got {type(item).__name__}")
    return passages


def passage_from_object(record: dict, where: str, field_prefix: str = "", source: str = "") -> Passage:
    values = {}
    for key in ("text", "title", "source"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise MedLoRAError(f"{where}: field '{field_prefix}{key}': expected a string, got {type(value).__name__}")
        values[key] = (value or "").strip()
    if not values["text"]:
        raise MedLoRAError(f"{where}: field '{field_prefix}text': {'empty' if 'text' in record else 'missing'}")
    return Passage(values["text"], values["title"], values["source"] or source)


# ---- files -----------------------------------------------------------------------------------------------
def knowledge_files(path) -> list:
    """[(label, file)]: the file, or every knowledge file under the folder (sorted); labels are
    the file name, or folder/relative path, as sources show them."""
    root = Path(str(path)).expanduser()
    if root.is_file():
        if root.suffix.lower() not in KNOWLEDGE_SUFFIXES:
            raise MedLoRAError(f"--knowledge_path {path}: unsupported file type; use "
                               f"{', '.join(KNOWLEDGE_SUFFIXES)} or a folder of them")
        return [(root.name, root)]
    if not root.is_dir():
        raise MedLoRAError(f"--knowledge_path {path}: no such file or folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in KNOWLEDGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise MedLoRAError(f"--knowledge_path {path}: the folder has no {'/'.join(KNOWLEDGE_SUFFIXES)} files")
    return [(f"{root.name}/{p.relative_to(root).as_posix()}", p) for p in files]


def content_key(files: list, salt: str) -> str:
    """A hash of every file's label and content (and of how passages are made): the index's cache key."""
    digest = hashlib.sha256(salt.encode())
    for label, file in files:
        digest.update(f"\0{label}\0".encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def read_passages(files: list) -> list:
    passages = []
    for label, file in files:
        found = read_file_passages(file, label)
        if not found:
            raise MedLoRAError(f"{file}: no passages (empty file)")
        passages += found
    return passages


def read_file_passages(file: Path, label: str) -> list:
    suffix = file.suffix.lower()
    if suffix == ".csv":
        return csv_passages(file, label)
    if suffix in (".json", ".jsonl"):
        from medlora.data.records import read_file_records

        return [passage_from_object(record, f"{file}: record {number}", source=f"{label}: record {number}")
                if isinstance(record, dict) else _not_an_object(file, number, record)
                for number, record in read_file_records(file)]
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise MedLoRAError(f"{file}: not UTF-8 text (byte {error.start})") from None
    headings = ([(m.start(), m.group(1).strip()) for m in MARKDOWN_HEADING.finditer(text)]
                if suffix == ".md" else [])
    passages = []
    for start, end in split_passages(text):
        title = next((heading for offset, heading in reversed(headings) if offset <= start), file.stem)
        line = text.count("\n", 0, start) + 1
        passages.append(Passage(text[start:end], title, f"{label}: line {line}"))
    return passages


def _not_an_object(file, number, record):
    raise MedLoRAError(f"{file}: record {number}: expected a JSON object with a 'text' field, "
                       f"got {type(record).__name__}")


def csv_passages(file: Path, label: str) -> list:
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError as error:
        raise MedLoRAError(f"{file}: not UTF-8 text (byte {error.start})") from None
    except csv.Error as error:
        raise MedLoRAError(f"{file}: not valid CSV: {error}") from None
    passages = []
    for number, row in enumerate(rows, start=1):
        where = f"{file}: record {number}"
        if None in row:
            raise MedLoRAError(f"{where}: more values than the header has columns")
        lines = [f"{column.strip()}: {value.strip()}" for column, value in row.items()
                 if column and value and value.strip()]
        if not lines:
            raise MedLoRAError(f"{where}: every value is empty")
        title = next((row[c].strip() for c in row if c and c.strip().lower() in TITLE_COLUMNS and row[c]), "")
        passages.append(Passage("\n".join(lines), title, f"{label}: record {number}"))
    return passages


def split_passages(text: str, size: int = PASSAGE_CHARS, overlap: int = OVERLAP_CHARS) -> list:
    """[(start, end)] character spans of passages of at most `size` characters, ending at sentence ends
    (or, for a sentence longer than `size`, at a space). A paragraph that does not fit in what is left
    of a passage starts a new one; a passage cut inside a paragraph is followed by one that starts
    with its last sentences (at most `overlap` characters)."""
    spans, current = [], []  # current: the sentence spans of the passage being filled

    def close():
        if current:
            spans.append((current[0][0], current[-1][1]))

    for paragraph_start, paragraph_end in _paragraphs(text):
        sentences = [piece for start, end in _sentences(text, paragraph_start, paragraph_end)
                     for piece in _pieces(text, start, end, size)]
        if current and sentences[-1][1] - current[0][0] > size:  # the paragraph does not fit: start afresh
            close()
            current = []
        for sentence in sentences:
            if current and sentence[1] - current[0][0] > size:
                close()
                kept = []
                for previous in reversed(current[1:]):  # never the whole passage again
                    if sentence[1] - previous[0] > size or current[-1][1] - previous[0] > overlap:
                        break
                    kept.insert(0, previous)
                current = kept
            current.append(sentence)
    close()
    return spans


def _paragraphs(text):
    start = 0
    for match in PARAGRAPH_BREAK.finditer(text):
        yield from _stripped(text, start, match.start())
        start = match.end()
    yield from _stripped(text, start, len(text))


def _sentences(text, start, end):
    position = start
    for match in SENTENCE_END.finditer(text, start, end):
        yield from _stripped(text, position, match.start())
        position = match.end()
    yield from _stripped(text, position, end)


def _stripped(text, start, end):
    """The span without surrounding whitespace, if anything is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start < end:
        yield start, end


def _pieces(text, start, end, size):
    """A sentence longer than `size`, cut at the last space before each limit (or at the limit)."""
    while end - start > size:
        cut = text.rfind(" ", start + 1, start + size + 1)
        cut = cut if cut > start + size // 2 else start + size
        yield from _stripped(text, start, cut)
        start = cut
        while start < end and text[start].isspace():
            start += 1
    if start < end:
        yield start, end
