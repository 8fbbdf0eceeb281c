"""Write data/knowledge/diseases.csv, the demo knowledge base, from our own disease table data/diseases.json.

    python scripts/make_knowledge_table.py                 # rewrites data/knowledge/diseases.csv
    python scripts/make_knowledge_table.py --output /tmp/diseases.csv

One row per disease; chat.py/generate.py --knowledge_path show each row as `column: value` lines.
Deterministic (the committed file is exactly what this writes); standard library only.
"""

import argparse
import csv
import io
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DISEASES_PATH = REPO_ROOT / "data" / "diseases.json"
OUTPUT_PATH = REPO_ROOT / "data" / "knowledge" / "diseases.csv"
COLUMNS = ["disease", "symptoms", "tests", "self-care", "see a doctor urgently if", "specialist",
           "疾病", "症状", "建议"]


def table_text(diseases: list) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for d in diseases:
        writer.writerow([d["name"], "; ".join(d["symptoms"]), "; ".join(d["tests"]), " ".join(d["advice"]),
                         "; ".join(d["red_flags"]), d["specialist"],
                         d["name_zh"], "；".join(d["symptoms_zh"]), "".join(d["advice_zh"])])
    return out.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(OUTPUT_PATH))
    args = parser.parse_args()
    diseases = json.loads(DISEASES_PATH.read_text(encoding="utf-8"))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(table_text(diseases), encoding="utf-8")
    print(f"wrote {len(diseases)} diseases to {args.output}")


if __name__ == "__main__":
    main()
