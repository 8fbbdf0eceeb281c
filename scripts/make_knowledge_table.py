"""Write the knowledge demo files from our own disease table data/diseases.json.

    python scripts/make_knowledge_table.py                       # rewrites the two files below
    python scripts/make_knowledge_table.py --output_dir /tmp/kb  # writes them elsewhere

  data/knowledge/diseases.csv        one row per disease: the knowledge base chat.py/generate.py
                                     --knowledge_path read (each row a passage of `column: value` lines)
  data/knowledge/grounded_qa.jsonl   fine-tuning records for grounded answers (finetune.py --data_path):
                                     a question, a `context` of two table rows (the right one and another,
                                     in either order) and an answer citing the right one by number; every
                                     fifth record has two unrelated rows and says that they do not cover it

The questions of data/knowledge/symptom_questions.jsonl (the retrieval test) were written separately
and are not made here. Deterministic (the committed files are exactly what this writes); standard
library only.
"""

import argparse
import csv
import io
import json
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DISEASES_PATH = REPO_ROOT / "data" / "diseases.json"
OUTPUT_DIR = REPO_ROOT / "data" / "knowledge"
COLUMNS = ["disease", "symptoms", "tests", "self-care", "see a doctor urgently if", "specialist",
           "疾病", "症状", "建议"]
SEED = 16
UNCOVERED_EVERY = 5


def row(disease: dict) -> list:
    d = disease
    return [d["name"], "; ".join(d["symptoms"]), "; ".join(d["tests"]), " ".join(d["advice"]),
            "; ".join(d["red_flags"]), d["specialist"], d["name_zh"], "；".join(d["symptoms_zh"]),
            "".join(d["advice_zh"])]


def table_text(diseases: list) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for disease in diseases:
        writer.writerow(row(disease))
    return out.getvalue()


def passage(disease: dict) -> dict:
    """The disease's row as medlora/data/knowledge.py reads it from the CSV: `column: value` lines, titled."""
    return {"title": disease["name"], "text": "\n".join(f"{c}: {v}" for c, v in zip(COLUMNS, row(disease)) if v)}


def grounded_records(diseases: list) -> list:
    rng = random.Random(SEED)
    records = []
    for index, disease in enumerate(diseases):
        symptoms = disease["symptoms"][:3]
        question = f"I have {', '.join(symptoms[:-1])} and {symptoms[-1]}. What could it be, and what should I do?"
        others = [d for d in diseases if d is not disease]
        if index % UNCOVERED_EVERY == UNCOVERED_EVERY - 1:
            context = [passage(d) for d in rng.sample(others, 2)]
            answer = ("The sources given do not cover these symptoms, so I cannot answer from them. "
                      f"Please describe them to {disease['specialist']}, who can examine you.")
        else:
            context = [passage(disease), passage(rng.choice(others))]
            if rng.random() < 0.5:
                context.reverse()
            number = 1 + [c["title"] for c in context].index(disease["name"])
            answer = (f"According to source [{number}], these symptoms fit {disease['name']}. "
                      f"{disease['advice'][0]} {disease['advice'][1]} Seek urgent care for "
                      f"{'; '.join(disease['red_flags'][:2])}. Only a clinician can confirm the diagnosis.")
        records.append({"instruction": question, "context": context, "output": answer})
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=str(OUTPUT_DIR))
    args = parser.parse_args()
    diseases = json.loads(DISEASES_PATH.read_text(encoding="utf-8"))
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "diseases.csv").write_text(table_text(diseases), encoding="utf-8")
    records = grounded_records(diseases)
    (folder / "grounded_qa.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(diseases)} diseases to {folder / 'diseases.csv'} and {len(records)} grounded records "
          f"to {folder / 'grounded_qa.jsonl'}")


if __name__ == "__main__":
    main()
