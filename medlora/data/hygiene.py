"""Data hygiene before training: duplicates, evaluation contamination and personal identifiers, found and counted.

Every training stage runs it on its records right after reading them, before the validation split and before
any model loads (finetune.py on conversations, pretrain.py on documents, dpo.py and reward.py on the prompt and
both replies):

    conversations, report = clean_conversations(conversations, flags)   # finetune.py
    documents, report = clean_documents(documents, sources, flags)       # pretrain.py
    pairs, report = clean_pairs(pairs, flags)                             # dpo.py, reward.py
    print("\\n".join(report.lines()))

  exact duplicates      the record's text fields equal an earlier record's after case and whitespace folding
  near duplicates       Jaccard similarity >= NEAR_DUPLICATE_JACCARD of the records' word 5-shingles, found
                        with MinHash LSH (datasketch) and confirmed on the exact shingle sets
  contamination         a word 13-gram shared with a question, its context or an option of the evaluation files
                        in --contamination_check (as lm-evaluation-harness and the GPT-3 paper decontaminate); a
                        question shorter than 13 words counts when it appears whole
  personal identifiers  medlora/data/pii.py (Presidio's recognizers)

Everything is counted, with the first few places, whatever the flags; --dedup, --decontaminate and --scrub_pii
change the data. "Words" are lower-cased letter/digit runs, and each Chinese or Japanese character is a word of
its own (the text has no spaces to split on). docs/data_hygiene.md says what each check misses.
"""

import hashlib
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

from medlora.errors import MedLoRAError

NGRAM_WORDS = 13
SHINGLE_WORDS = 5
NEAR_DUPLICATE_JACCARD = 0.8
MINHASH_PERMUTATIONS = 128
LSH_BANDS_ROWS = (18, 7)
PLACES_SHOWN = 3
DROPPED_DUPLICATE = "duplicate of an earlier record (--dedup)"
DROPPED_CONTAMINATED = "shares text with an evaluation question (--decontaminate)"

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def words(text: str) -> list:
    return _WORD.findall(text.lower())


@dataclass
class HygieneReport:
    unit: str  # "records", "documents", "pairs"
    checked: int = 0
    exact_duplicates: list = field(default_factory=list)  # (place, place of the first copy)
    near_duplicates: list = field(default_factory=list)  # (place, place of the earlier record, Jaccard)
    contaminated: list = field(default_factory=list)  # (place, "eval file: record N")
    contamination_source: str = ""  # what was checked against, "" when the check is off
    identifiers: Counter = field(default_factory=Counter)  # kind -> occurrences
    records_with_identifiers: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> records dropped
    flags: dict = field(default_factory=dict)
    seconds: Counter = field(default_factory=Counter)  # check -> seconds it took

    def lines(self) -> list:
        """The data summary's hygiene lines."""
        dedup, decontaminate, scrub = (self.flags.get(name) for name in ("dedup", "decontaminate", "scrub_pii"))
        action = lambda on, flag: "dropped" if on else f"kept ({flag} drops them)"  # noqa: E731
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.seconds.items())
        lines = [f"hygiene: {self.checked} {self.unit} checked in {sum(self.seconds.values()):.1f}s ({parts})"]
        lines.append(f"  exact duplicates (after case and whitespace folding): {len(self.exact_duplicates)}"
                     + (f", {action(dedup, '--dedup')}; e.g. " + _places(self.exact_duplicates, "copies")
                        if self.exact_duplicates else ""))
        lines.append(f"  near duplicates (Jaccard >= {NEAR_DUPLICATE_JACCARD} over {SHINGLE_WORDS}-word shingles): "
                     f"{len(self.near_duplicates)}"
                     + (f", {action(dedup, '--dedup')}; e.g. " + _places(self.near_duplicates, "resembles")
                        if self.near_duplicates else ""))
        if self.contamination_source:
            lines.append(f"  evaluation contamination ({NGRAM_WORDS}-word overlap with {self.contamination_source}): "
                         f"{len(self.contaminated)}"
                         + (f", {action(decontaminate, '--decontaminate')}; e.g. "
                            + _places(self.contaminated, "shares text with") if self.contaminated else ""))
        else:
            lines.append("  evaluation contamination: not checked (--contamination_check none)")
        found = ", ".join(f"{count} {kind}" for kind, count in self.identifiers.most_common()) or "none"
        lines.append(f"  personal identifiers: {found}"
                     + (f" in {self.records_with_identifiers} {self.unit}, "
                        + ("replaced by typed placeholders (--scrub_pii)" if scrub else
                           "left in (--scrub_pii replaces them with [EMAIL], [PHONE], ...)")
                        if self.identifiers else ""))
        return lines


def _places(pairs: list, verb: str) -> str:
    shown = "; ".join(f"{pair[0]} {verb} {pair[1]}" + (f" (Jaccard {pair[2]:.2f})" if len(pair) > 2 else "")
                      for pair in pairs[:PLACES_SHOWN])
    return shown + (f"; and {len(pairs) - PLACES_SHOWN} more" if len(pairs) > PLACES_SHOWN else "")


# ---- each stage's items -------------------------------------------------------------------------------------
def clean_conversations(conversations: list, flags) -> tuple:
    """finetune.py's records: every message's text and input, and the system prompt."""
    return check_records(conversations, [c.source for c in conversations], _conversation_texts,
                         _rewrite_conversation, flags)


def clean_documents(documents: list, sources: dict, flags) -> tuple:
    """pretrain.py's documents (strings), read file by file: sources is {file: documents} in reading order."""
    places = [f"{source}: document {number}" for source, count in sources.items() for number in range(1, count + 1)]
    return check_records(documents, places, lambda text: [text], lambda text, change: change(text), flags,
                         "documents")


def clean_pairs(pairs: list, flags) -> tuple:
    """dpo.py's and reward.py's preference pairs: the prompt's messages and system, and both replies."""
    from medlora.data.preference import PreferencePair

    return check_records(pairs, [pair.source for pair in pairs],
                         lambda pair: [*_conversation_texts(pair.conversation), pair.chosen, pair.rejected],
                         lambda pair, change: PreferencePair(_rewrite_conversation(pair.conversation, change),
                                                             change(pair.chosen), change(pair.rejected)),
                         flags, "pairs")


def as_trained(conversations: list, settings: dict) -> list:
    """The records as a finetune.py run trained on them, from its medlora_run.json settings: unchanged unless the
    run dropped or changed records (--dedup, --decontaminate, --scrub_pii). evaluate.py splits the validation
    records again from these."""
    if not any(settings.get(name) for name in ("dedup", "decontaminate", "scrub_pii")):
        return conversations
    flags = SimpleNamespace(dedup=settings.get("dedup", False), decontaminate=settings.get("decontaminate", False),
                            scrub_pii=settings.get("scrub_pii", False),
                            contamination_check=settings.get("contamination_check", "none"))
    return clean_conversations(conversations, flags)[0]


def _conversation_texts(conversation) -> list:
    texts = [conversation.system] if conversation.system else []
    return texts + [message[key] for message in conversation.messages for key in ("content", "input")
                    if message.get(key)]


def _rewrite_conversation(conversation, change):
    messages = [{key: change(value) if key in ("content", "input") and value else value
                 for key, value in message.items()} for message in conversation.messages]
    return replace(conversation, messages=messages, system=change(conversation.system) if conversation.system
                   else conversation.system)


# ---- the checks -------------------------------------------------------------------------------------------
def check_records(items: list, places: list, texts, rewrite, flags, unit: str = "records") -> tuple:
    """(the items kept, HygieneReport). texts(item) -> the item's text fields; rewrite(item, change) -> the item
    with change(text) applied to each field (for --scrub_pii); places[i]: "file: record N" of items[i].
    flags: dedup, contamination_check, decontaminate, scrub_pii."""
    report = HygieneReport(unit, len(items), flags={name: getattr(flags, name) for name in
                                                    ("dedup", "contamination_check", "decontaminate", "scrub_pii")})
    clock = time.perf_counter
    started = clock()
    items = _find_identifiers(items, texts, rewrite, flags.scrub_pii, report)
    report.seconds["identifiers"] = clock() - started
    started = clock()
    contamination = ContaminationIndex.from_flag(flags.contamination_check)
    report.contamination_source = contamination.source if contamination else ""
    report.seconds["contamination"] = clock() - started
    started = clock()
    duplicates = DuplicateFinder(lambda index: record_shingles([words(text) for text in texts(items[index])]))
    report.seconds["duplicates"] = clock() - started
    dropped = set()
    for index, item in enumerate(items):
        started = clock()
        fields = texts(item)
        field_words = [words(text) for text in fields]  # (both checks use them; counted as the duplicates')
        earlier = duplicates.add(index, fields, field_words)
        report.seconds["duplicates"] += clock() - started
        if earlier is not None:
            first, jaccard = earlier
            if jaccard is None:
                report.exact_duplicates.append((places[index], places[first]))
            else:
                report.near_duplicates.append((places[index], places[first], jaccard))
            if flags.dedup:
                dropped.add(index)
                report.dropped[DROPPED_DUPLICATE] += 1
        started = clock()
        question = contamination.match(field_words) if contamination else None
        report.seconds["contamination"] += clock() - started
        if question:
            report.contaminated.append((places[index], question))
            if flags.decontaminate and index not in dropped:
                dropped.add(index)
                report.dropped[DROPPED_CONTAMINATED] += 1
    kept = [item for index, item in enumerate(items) if index not in dropped]
    if not kept:
        raise MedLoRAError(f"every one of the {len(items)} {unit} was dropped by --dedup/--decontaminate; nothing "
                           "is left to train on")
    return kept, report


def _find_identifiers(items: list, texts, rewrite, scrub: bool, report: HygieneReport) -> list:
    """Counts the identifiers of every field into report; with scrub, the items with them replaced."""
    from medlora.data.pii import PiiScanner

    scanner, items = PiiScanner(), list(items)
    for index, item in enumerate(items):
        found = [finding for text in texts(item) for finding in scanner.find(text)]
        if not found:
            continue
        report.records_with_identifiers += 1
        report.identifiers.update(finding.kind for finding in found)
        if scrub:
            items[index] = rewrite(item, lambda text: scanner.scrub(text)[0])
    return items


class DuplicateFinder:
    """Records added in order; add() says which earlier record one repeats, exactly or nearly. shingles_of(index)
    gives an earlier record's shingles again, to confirm a candidate the LSH index proposes (kept for every
    record, they would take gigabytes for 100,000 records)."""

    def __init__(self, shingles_of):
        from datasketch import MinHash, MinHashLSH

        self.exact = {}  # digest of the folded text -> first index
        # 18 bands of 7 rows: a pair at Jaccard 0.8 becomes a candidate with probability 0.986 (0.998 at 0.84).
        # datasketch's own choice for threshold 0.8 (9 bands of 13) finds it with probability 0.40; the
        # candidates it adds are confirmed or rejected on their exact shingles anyway.
        self.lsh = MinHashLSH(num_perm=MINHASH_PERMUTATIONS, params=LSH_BANDS_ROWS)
        self.shingles_of = shingles_of
        self.template = MinHash(num_perm=MINHASH_PERMUTATIONS)  # its permutations drawn once, not per record

    def add(self, index: int, fields: list, field_words: list):
        """(index of the earlier record, None for an exact copy or the Jaccard of a near one), or None if new."""
        import xxhash
        from datasketch import MinHash

        folded = "\x1f".join(" ".join(text.lower().split()) for text in fields)
        digest = hashlib.blake2b(folded.encode(), digest_size=16).digest()
        if digest in self.exact:
            return self.exact[digest], None
        self.exact[digest] = index
        shingles = record_shingles(field_words)
        # xxHash: several times faster than datasketch's default SHA-1, and the same in every run (Python's own
        # hash() is seeded per process, which would change which near duplicates the index finds).
        signature = MinHash(num_perm=MINHASH_PERMUTATIONS, hashfunc=xxhash.xxh32_intdigest,
                            permutations=self.template.permutations, scheme=self.template.scheme)
        signature.update_batch([shingle.encode() for shingle in shingles])
        best = max(((jaccard(shingles, self.shingles_of(other)), other) for other in self.lsh.query(signature)),
                   default=(0.0, None), key=lambda pair: (pair[0], -pair[1]))
        if best[0] >= NEAR_DUPLICATE_JACCARD:
            return best[1], best[0]
        self.lsh.insert(index, signature)
        return None


def record_shingles(field_words: list) -> set:
    """The shingles of a record: of its fields' words, one after the other."""
    return shingle_set([word for text_words in field_words for word in text_words])


def shingle_set(word_list: list) -> set:
    if len(word_list) <= SHINGLE_WORDS:
        return {" ".join(word_list)}
    return {" ".join(word_list[i:i + SHINGLE_WORDS]) for i in range(len(word_list) - SHINGLE_WORDS + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class ContaminationIndex:
    """The 13-grams of every question, context and option of some evaluation files, and the questions shorter
    than 13 words (matched whole); match() names the first evaluation question a training record shares one with."""

    def __init__(self, questions: list, source: str):
        self.source = source
        self.ngrams = {}  # 13-word tuple -> "eval file: record N"
        self.short = {}  # length -> {word tuple -> "eval file: record N"}, questions under 13 words
        for question in questions:
            question_words = words(question.question)
            if len(question_words) < NGRAM_WORDS:
                if question_words:
                    self.short.setdefault(len(question_words), {}).setdefault(tuple(question_words), question.source)
            for text in (question.question, question.context, *question.options):
                for gram in ngrams(words(text), NGRAM_WORDS):
                    self.ngrams.setdefault(gram, question.source)
        self.short_word_sets = [(set(gram), length, gram) for length, grams in self.short.items() for gram in grams]

    @classmethod
    def from_flag(cls, contamination_check):
        """The index of --contamination_check's files (a file, a folder or a comma-separated list, as evaluate.py
        reads them), or None for 'none' / empty."""
        from medlora.data.questions import load_question_file, question_files

        if contamination_check in (None, "", False) or str(contamination_check).lower() == "none":
            return None
        paths = [_resolve(path.strip()) for path in str(contamination_check).split(",") if path.strip()]
        try:
            files = question_files(paths)
        except MedLoRAError as error:
            raise MedLoRAError(f"--contamination_check: {error}") from None
        questions = [question for path in files for question in load_question_file(path).questions]
        source = str(contamination_check) if len(files) > 1 else str(files[0])
        return cls(questions, f"{source} ({len(questions)} questions in {len(files)} files)")

    def match(self, field_words: list) -> str | None:
        """field_words: the words of each of a record's fields (an n-gram never spans two fields)."""
        for text_words in field_words:
            if not self.ngrams.keys().isdisjoint(ngrams(text_words, NGRAM_WORDS)):
                return next(self.ngrams[gram] for gram in ngrams(text_words, NGRAM_WORDS) if gram in self.ngrams)
            if self.short:
                present = set(text_words)
                for word_set, length, gram in self.short_word_sets:
                    if word_set <= present and _contains(text_words, gram):
                        return self.short[length][gram]
        return None


def ngrams(word_list: list, n: int):
    return zip(*(word_list[i:] for i in range(n)))


def _contains(word_list: list, gram: tuple) -> bool:
    first, length = gram[0], len(gram)
    return any(word_list[i] == first and tuple(word_list[i:i + length]) == gram
               for i in range(len(word_list) - length + 1))


def _resolve(path: str) -> str:
    """A relative path from the current folder, else from the MedLoRA folder (the default, data/eval, from
    anywhere)."""
    from medlora.paths import PROJECT_ROOT

    if Path(path).expanduser().exists() or Path(path).is_absolute():
        return path
    bundled = PROJECT_ROOT / path
    return str(bundled) if bundled.exists() else path
