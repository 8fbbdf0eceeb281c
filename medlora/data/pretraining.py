"""Plain text for continued pretraining: reading documents, and cutting token streams into blocks.

Inputs, a file or a folder of them:
  .txt          one document a line (empty lines are skipped)
  .jsonl/.json  one JSON object a record (or a JSON array of them) with a text field (`text` by default)

Every document is tokenized as the model sees text at inference (with the tokenizer's BOS, if it
adds one) and followed by EOS; the documents are then joined into one stream and cut into blocks of
exactly `block_size` tokens. The tail shorter than a block is dropped and counted. Problems are
one-line MedLoRAErrors naming the file, the record and the field.
"""

from dataclasses import dataclass, field
from pathlib import Path

from medlora.data.records import (
    parse_json_records,
    read_text,
    refuse_bad_records,
    skipped_list,
)
from medlora.errors import MedLoRAError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class LoadedText:
    documents: list
    sources: dict = field(default_factory=dict)  # file -> document count
    skipped_records: list = field(default_factory=list)  # --skip_bad_records: "file: record N: field: reason"

    def describe(self) -> str:
        lines = ["; ".join(f"{source}: {count} documents" for source, count in self.sources.items())]
        if self.skipped_records:
            lines[0] += f"; {len(self.skipped_records)} records skipped (--skip_bad_records)"
            lines += skipped_list(self.skipped_records)
        return "\n".join(lines)


@dataclass
class Blocks:
    blocks: list  # lists of exactly block_size token ids
    documents: int = 0
    tokens: int = 0  # tokens in the stream, EOS included
    dropped_tokens: int = 0  # the tail shorter than one block


def load_documents(data_path, text_field: str = "text", skip_bad_records: bool = False) -> LoadedText:
    """Every document of a .txt/.jsonl/.json file or of a folder of them (sorted by name)."""
    path = Path(str(data_path)).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise MedLoRAError(f"{path}: folder has no {'/'.join(TEXT_SUFFIXES)} files")
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise MedLoRAError(f"{path}: unsupported file type '{path.suffix}'; use {', '.join(TEXT_SUFFIXES)}")
        files = [path]
    else:
        raise MedLoRAError(f"{data_path}: no such file or folder")
    loaded = LoadedText([])
    for file in files:
        documents, skipped = read_text_file(file, text_field, skip_bad_records)
        loaded.skipped_records += skipped
        if not documents:
            raise MedLoRAError(f"{file}: no documents (empty file)")
        loaded.documents += documents
        loaded.sources[str(file)] = len(documents)
    return loaded


def read_text_file(path: Path, text_field: str, skip_bad_records: bool = False) -> tuple:
    """(documents, problems of skipped records) of one file: each non-empty line of a .txt, else each record's
    text_field. Every record is checked before any is refused, so one run lists all the bad ones."""
    text = read_text(path)
    if path.suffix == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip()], []
    documents, problems = [], []
    for number, record in parse_json_records(text, path):
        try:
            documents.append(document_text(record, text_field, f"{path}: record {number}"))
        except MedLoRAError as problem:
            problems.append(str(problem))
    refuse_bad_records(path, problems, skip_bad_records, kept=len(documents))
    return documents, problems


def document_text(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise MedLoRAError(f"{where}: expected a JSON object with a '{text_field}' field, got {type(record).__name__}")
    value = record.get(text_field)
    if value is None:
        raise MedLoRAError(f"{where}: field '{text_field}': missing (choose the field with --text_field)")
    if not isinstance(value, str):
        raise MedLoRAError(f"{where}: field '{text_field}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise MedLoRAError(f"{where}: field '{text_field}': empty")
    return value.strip()


def tokenize_documents(tokenizer, documents: list, batch_size: int = 1000) -> list:
    """Token ids of each document: the tokenizer's special prefix (BOS where it adds one), the text, then EOS."""
    from medlora.data.tokenization import special_prefix_ids

    if tokenizer.eos_token_id is None:
        raise MedLoRAError("the tokenizer has no EOS token to separate documents; pick a tokenizer with one")
    prefix, eos = special_prefix_ids(tokenizer), tokenizer.eos_token_id
    tokenized = []
    for start in range(0, len(documents), batch_size):
        encoded = tokenizer(documents[start:start + batch_size], add_special_tokens=False)["input_ids"]
        tokenized += [prefix + list(ids) + [eos] for ids in encoded]
    return tokenized


def group_into_blocks(tokenized_documents: list, block_size: int) -> Blocks:
    """Join the documents into one stream and cut it into blocks of exactly block_size tokens."""
    if block_size < 2:
        raise MedLoRAError(f"--block_size {block_size}: must be at least 2 tokens")
    stream = [token for ids in tokenized_documents for token in ids]
    usable = len(stream) - len(stream) % block_size
    blocks = [stream[start:start + block_size] for start in range(0, usable, block_size)]
    return Blocks(blocks, len(tokenized_documents), len(stream), len(stream) - usable)
