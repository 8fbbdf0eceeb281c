"""Time the data hygiene checks (medlora/data/hygiene.py) on 100,000 real-length records, with planted problems.

    python scripts/benchmark_hygiene.py                  # 100,000 records; prints the row docs/BENCHMARKS.md quotes
    python scripts/benchmark_hygiene.py --records 5000   # a quicker run

The records are the seed projects' SFT data beside the repository (../shared/datasets): GenMedGPT-5k, HuaTuo and
MedicalGPT's SFT sample (15,110 records), then copies of them with the words of the answer shuffled (English) or its
characters shuffled (Chinese), so that lengths and vocabulary stay real while no copy repeats another, up to
--records. Into these go, at random places: 1% exact copies of earlier records (re-cased), 1% near copies (one character
changed), 0.1% records holding an evaluation question of data/eval, and 1% records holding an e-mail address and a
phone number. The run checks that each planted kind is found at least as often as it was planted (near copies: those whose
Jaccard similarity to their original stays >= 0.8), and times every
check the way finetune.py runs them (clean_conversations with --dedup --decontaminate --scrub_pii), in this fresh
process, Presidio's import included.
"""

import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "datasets"
SOURCES = [SHARED / "chatdoctor" / "genmedgpt_5k.json", SHARED / "huatuo" / "llama_data.jsonl",
           SHARED / "medicalgpt" / "medical_sft_1k.jsonl"]


def main(records: int = 100_000, seed: int = 0):
    """Check RECORDS records and print the time of each check."""
    from types import SimpleNamespace

    from medlora.data.records import load_conversations
    from medlora.errors import MedLoRAError

    missing = [str(path) for path in SOURCES if not path.is_file()]
    if missing:
        raise MedLoRAError(f"the benchmark needs the seed projects' data beside the repository: {', '.join(missing)}")
    real = [conversation for path in SOURCES for conversation in load_conversations(path).conversations]
    rows, planted = synthetic_records(real, records, random.Random(seed))
    from medlora.data.hygiene import clean_conversations
    from medlora.data.templates import Conversation

    conversations = [Conversation(messages, None, f"bench: record {n}") for n, messages in enumerate(rows, start=1)]
    megabytes = sum(len(m["content"].encode()) for c in conversations for m in c.messages) / 2**20
    flags = SimpleNamespace(dedup=True, decontaminate=True, scrub_pii=True, contamination_check="data/eval")
    started = time.perf_counter()
    kept, report = clean_conversations(conversations, flags)
    total = time.perf_counter() - started
    found = {"exact copies": len(report.exact_duplicates), "near copies": len(report.near_duplicates),
             "evaluation questions": len(report.contaminated), "e-mail addresses": report.identifiers["EMAIL"],
             "phone numbers": report.identifiers["PHONE"]}
    short = [kind for kind, count in planted.items() if found[kind] < count]
    if short:
        raise MedLoRAError(f"found fewer than planted: {', '.join(f'{k} {found[k]} < {planted[k]}' for k in short)}")
    print("\n".join(report.lines()))
    cpu = cpu_name()
    print(f"\n| {time.strftime('%Y-%m-%d')} | {cpu}, {os.cpu_count()} cores, Python {platform.python_version()} | "
          f"{len(conversations):,} records, {megabytes:.0f} MiB | {report.seconds['identifiers']:.1f} s | "
          f"{report.seconds['duplicates']:.1f} s | {report.seconds['contamination']:.1f} s | **{total:.1f} s** | "
          f"{len(conversations) - len(kept):,} dropped |")
    print("planted / found: " + ", ".join(f"{kind} {planted[kind]} / {found[kind]}" for kind in planted))


def synthetic_records(real: list, total: int, rng: random.Random) -> tuple:
    """(message lists, {kind: planted count}): the real records, shuffled copies up to `total`, planted problems."""
    from medlora.data.hygiene import NEAR_DUPLICATE_JACCARD, jaccard
    from medlora.data.questions import load_question_file, question_files

    rows = [[dict(m) for m in c.messages] for c in real]
    while len(rows) < total:
        messages = [dict(m) for m in rng.choice(real).messages]
        messages[-1]["content"] = shuffled(messages[-1]["content"], rng)
        rows.append(messages)
    rows = rows[:total]
    questions = [q.question for path in question_files(str(ROOT / "data" / "eval")) for q in
                 load_question_file(path).questions]
    planted = {"exact copies": total // 100, "near copies": total // 100, "evaluation questions": total // 1000,
               "e-mail addresses": total // 100, "phone numbers": total // 100}
    similar_enough = planted["near copies"]
    # Planted into the second half, copied from the first, which stays as it is.
    targets = iter(rng.sample(range(total // 2, total), sum(planted.values())))
    for kind, count in planted.items():
        for _ in range(count):
            index = next(targets)
            messages = [dict(m) for m in rows[rng.randrange(total // 2)]]
            if kind == "exact copies":
                messages[0]["content"] = messages[0]["content"].upper()
            elif kind == "near copies":  # one character changed: one word, or one Chinese character
                text = messages[-1]["content"]
                at = rng.randrange(len(text) // 4, len(text) * 3 // 4 + 1)
                original = shingles(messages)
                messages[-1]["content"] = text[:at] + ("x" if text[at:at + 1] != "x" else "y") + text[at + 1:]
                if jaccard(original, shingles(messages)) < NEAR_DUPLICATE_JACCARD:
                    similar_enough -= 1  # in a short record one word is more than a fifth of the shingles
            elif kind == "evaluation questions":
                messages[0]["content"] += " " + rng.choice(questions)
            else:
                messages = [dict(m) for m in rows[index]]
                messages[0]["content"] += (f" Write to patient{index}@example.org" if kind == "e-mail addresses"
                                           else f" Call me on +1 617 555 {index % 10000:04d}")
            rows[index] = messages
    return rows, {**planted, "near copies": similar_enough}


def shingles(messages: list) -> set:
    from medlora.data.hygiene import record_shingles, words

    return record_shingles([words(m["content"]) for m in messages])


def shuffled(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    if len(words) > 3:
        rng.shuffle(words)
        return " ".join(words)
    characters = list(text)  # Chinese: no spaces to split on
    rng.shuffle(characters)
    return "".join(characters)


def cpu_name() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split()
    features = [f for f in ("amx_tile", "avx512_bf16", "avx2") if f in flags][:1]
    return f"{name} ({features[0] if features else 'no AVX2'})"


if __name__ == "__main__":
    from medlora.cli import run

    run(main)
