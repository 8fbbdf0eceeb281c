"""Measure the knowledge base (medlora/inference/retrieval.py): index build time, cached load time, search latency
per question on 10,000 passages, and recall of our symptom questions among them.

    python scripts/benchmark_retrieval.py                  # 10,000 passages; prints the figures docs/retrieval.md quotes
    python scripts/benchmark_retrieval.py --passages 2000  # a quicker run

The corpus is built in a temporary folder, never in the repository: our disease table
(data/knowledge/diseases.csv, 40 rows) as the passages to find, plus distractors from the seed
projects' data beside the repository (../shared/datasets): ChatDoctor's disease database (CSV, one row
per disease), GenMedGPT-5k answers and HuaTuo's Chinese answers (JSON Lines), up to --passages in all.
The index goes to a fresh cache folder, so the first load is a real build. Latency is the wall time
of KnowledgeBase.search (tokenizing the question included) for our 50 symptom questions and for
questions from GenMedGPT-5k and HuaTuo, one at a time.
"""

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "datasets"
DISEASES_CSV = ROOT / "data" / "knowledge" / "diseases.csv"
QUESTIONS = ROOT / "data" / "knowledge" / "symptom_questions.jsonl"


def main(passages: int = 10_000, other_questions: int = 200):
    """Build a corpus of PASSAGES passages, index it, and time searches."""
    from medlora.errors import MedLoRAError

    sources = [SHARED / "chatdoctor" / "disease_database.csv", SHARED / "chatdoctor" / "genmedgpt_5k.json",
               SHARED / "huatuo" / "llama_data.jsonl"]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        raise MedLoRAError(f"the benchmark needs the seed projects' data beside the repository: {', '.join(missing)}")
    work = Path(tempfile.mkdtemp(prefix="medlora-retrieval-bench-"))
    os.environ["MEDLORA_CACHE"] = str(work / "cache")  # a fresh cache: the first load builds the index
    try:
        corpus, questions = write_corpus(work / "corpus", passages, other_questions, *sources)
        report(corpus, questions)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_corpus(folder: Path, total: int, other_questions: int, disease_db: Path, genmedgpt: Path,
                 huatuo: Path) -> tuple:
    """Our table and ChatDoctor's, then GenMedGPT and HuaTuo answers as JSON Lines passages up to `total`.
    Returns the folder and {question set: [questions]} (the GenMedGPT/HuaTuo questions are those of
    records whose answers are not in the corpus)."""
    folder.mkdir(parents=True)
    shutil.copy(DISEASES_CSV, folder / "diseases.csv")
    shutil.copy(disease_db, folder / "chatdoctor_diseases.csv")
    count = count_csv_rows(DISEASES_CSV) + count_csv_rows(disease_db)
    english = json.loads(genmedgpt.read_text(encoding="utf-8"))
    chinese = [json.loads(line) for line in huatuo.read_text(encoding="utf-8").splitlines() if line.strip()]
    left = total - count
    english_used = min(len(english) - other_questions, left * 6 // 10)
    chinese_used = min(len(chinese) - other_questions, left - english_used)
    with open(folder / "answers.jsonl", "w", encoding="utf-8") as handle:
        for record in english[:english_used] + chinese[:chinese_used]:
            handle.write(json.dumps({"text": record["output"]}, ensure_ascii=False) + "\n")
    questions = {
        "our symptom questions (English and Chinese)": [json.loads(line) for line in
                                                        QUESTIONS.read_text(encoding="utf-8").splitlines()],
        "GenMedGPT-5k patient questions (English)": [{"question": r["input"]} for r in
                                                     english[-other_questions:]],
        "HuaTuo questions (Chinese)": [{"question": r["instruction"]} for r in chinese[-other_questions:]],
    }
    return folder, questions


def count_csv_rows(path: Path) -> int:
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def report(corpus: Path, questions: dict):
    from medlora.inference.retrieval import KnowledgeBase

    started = time.perf_counter()
    knowledge = KnowledgeBase.load(corpus)
    first_load = time.perf_counter() - started
    started = time.perf_counter()
    cached = KnowledgeBase.load(corpus)
    cached_load = time.perf_counter() - started
    assert cached.build_seconds is None and len(cached.passages) == len(knowledge.passages)
    knowledge.search("warm-up")  # jieba and the stemmer load on first use; the build already did that
    print(f"date: {time.strftime('%Y-%m-%d')}; CPU: {cpu_name()}, {os.cpu_count()} cores; "
          f"Python {platform.python_version()}")
    print(f"passages: {len(knowledge.passages):,}; index build {knowledge.build_seconds:.1f}s "
          f"(first load in all {first_load:.1f}s: reading, hashing, tokenizing, indexing, saving); "
          f"cached load {cached_load * 1000:.0f} ms")
    print("| questions | count | median ms | p95 ms | max ms |")
    print("|---|---|---|---|---|")
    for name, items in questions.items():
        times = []
        for item in items:
            started = time.perf_counter()
            item["found"] = knowledge.search(item["question"], top_k=3)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        print(f"| {name} | {len(times)} | {statistics.median(times):.2f} | {p95:.2f} | {times[-1]:.2f} |")
    ours = questions["our symptom questions (English and Chinese)"]
    at_1 = sum([p.title for p in q["found"][:1]] == [q["disease"]] for q in ours) / len(ours)
    at_3 = sum(q["disease"] in [p.title for p in q["found"]] for q in ours) / len(ours)
    print(f"recall of the right disease of our table among all {len(knowledge.passages):,} passages: "
          f"recall@1 {at_1:.2f}, recall@3 {at_3:.2f}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    from medlora import cli

    cli.run(main)
