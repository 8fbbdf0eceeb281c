"""Search a knowledge base (medlora/data/knowledge.py's passages) with BM25.

    knowledge = KnowledgeBase.load("data/knowledge/diseases.csv")   # a file or a folder
    passages = knowledge.search("burning when I pee")               # top 3, best first; [] when none match

Ranking is bm25s (BM25, Lucene variant, k1 1.5, b 0.75) over words made by `tokenize`: Chinese runs
segmented by jieba (search mode, so that 流鼻涕 also yields 鼻涕), other words lower-cased and
Snowball-stemmed (PyStemmer), stop words left out (bm25s's STOPWORDS_EN_PLUS, 179 English words,
and STOPWORDS_CHINESE). The index is built once and kept under $MEDLORA_CACHE/knowledge/<key>, the
key being a hash of every file's name and content and of INDEX_VERSION: a changed file gets a new
index; an unchanged one is loaded from the cache (0.5 s for 10,000 passages, docs/retrieval.md).
"""

import json
import logging
import re
import time
from pathlib import Path

from medlora.data.knowledge import (
    OVERLAP_CHARS,
    PASSAGE_CHARS,
    Passage,
    content_key,
    knowledge_files,
    read_passages,
)
from medlora.errors import MedLoRAError
from medlora.paths import build_once, cache_root

# Part of the cache key: bump it whenever tokenize() or the passage reading changes.
INDEX_VERSION = f"2;passage {PASSAGE_CHARS}/{OVERLAP_CHARS}"
CJK_OR_WORD = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)|([a-z0-9\u00c0-\u024f]+)")
DEFAULT_TOP_K = 3
PASSAGES_FILE = "passages.jsonl"
NOTE_FILE = "config.json"  # written last: build_once treats a folder with it as finished

_stemmer = None
_stopwords = None


def tokenize(text: str) -> list:
    """Words for BM25: jieba's words for Chinese, stemmed lower-case words otherwise; no stop words."""
    global _stemmer, _stopwords
    if _stemmer is None:
        import jieba
        import Stemmer
        from bm25s.stopwords import STOPWORDS_CHINESE, STOPWORDS_EN_PLUS

        jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading on first use
        _stemmer, _stopwords = Stemmer.Stemmer("english"), set(STOPWORDS_EN_PLUS) | set(STOPWORDS_CHINESE)
    import jieba

    words = []
    for chinese, other in CJK_OR_WORD.findall(text.lower()):
        if chinese:
            words += [w for w in jieba.cut_for_search(chinese) if w not in _stopwords]
        elif other not in _stopwords:
            words.append(_stemmer.stemWord(other))
    return words


class KnowledgeBase:
    def __init__(self, passages: list, retriever, path: str, index_dir: Path, build_seconds: float | None,
                 top_k: int = DEFAULT_TOP_K):
        self.passages, self.retriever, self.path, self.index_dir = passages, retriever, path, index_dir
        self.build_seconds = build_seconds  # None: loaded from the cache
        self.top_k = top_k  # what search() returns by default

    @classmethod
    def load(cls, path, top_k: int = DEFAULT_TOP_K) -> "KnowledgeBase":
        """Read a knowledge file or folder, index it (or load its cached index) and return it."""
        import bm25s

        files = knowledge_files(path)
        target = cache_root() / "knowledge" / content_key(files, INDEX_VERSION)[:32]
        timing = {}

        def build(folder: Path):
            started = time.perf_counter()
            passages = read_passages(files)
            words = [tokenize(f"{p.title}\n{p.text}") for p in passages]
            if not any(words):
                raise MedLoRAError(f"--knowledge_path {path}: no passage has a searchable word")
            retriever = bm25s.BM25()
            retriever.index(words, show_progress=False)
            retriever.save(str(folder), show_progress=False)
            with open(folder / PASSAGES_FILE, "w", encoding="utf-8") as handle:
                for passage in passages:
                    handle.write(json.dumps(passage.to_dict(), ensure_ascii=False) + "\n")
            timing["build_seconds"] = time.perf_counter() - started
            note = dict(files=[label for label, _ in files], passages=len(passages), index_version=INDEX_VERSION,
                        build_seconds=round(timing["build_seconds"], 3))
            (folder / NOTE_FILE).write_text(json.dumps(note, indent=2), encoding="utf-8")

        build_once(target, build)
        retriever = bm25s.BM25.load(str(target), show_progress=False)
        with open(target / PASSAGES_FILE, encoding="utf-8") as handle:
            passages = [Passage(**json.loads(line)) for line in handle]
        return cls(passages, retriever, str(path), target, timing.get("build_seconds"), top_k)

    def describe(self) -> str:
        how = ("index loaded from the cache" if self.build_seconds is None
               else f"index built in {self.build_seconds:.2f}s")
        return f"{len(self.passages):,} passages from {self.path} ({how})"

    def search(self, question: str, top_k: int | None = None) -> list:
        """The top_k (default: self.top_k) passages for the question, best first, with their BM25 scores;
        passages sharing no word with the question are left out (so the list may be shorter, or empty)."""
        top_k = self.top_k if top_k is None else top_k
        words = tokenize(question)
        if not words or top_k < 1:
            return []
        documents, scores = self.retriever.retrieve([words], k=min(int(top_k), len(self.passages)),
                                                    show_progress=False, n_threads=0)
        return [Passage(**{**self.passages[int(index)].to_dict(), "score": round(float(score), 4)})
                for index, score in zip(documents[0], scores[0]) if score > 0]


def search_text(message: dict) -> str:
    """What a user message is searched by: its text and its `input` (alpaca records often carry the
    patient's question there, under a fixed instruction)."""
    return "\n".join(part for part in (message.get("content", ""), message.get("input", "")) if part)


def load_knowledge(knowledge_path: str, top_k: int) -> "KnowledgeBase | None":
    """The scripts' --knowledge_path/--knowledge_top_k: the loaded base (None without a path)."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise MedLoRAError(f"--knowledge_top_k {top_k!r}: must be a whole number >= 1")
    if not knowledge_path:
        return None
    return KnowledgeBase.load(knowledge_path, top_k)
