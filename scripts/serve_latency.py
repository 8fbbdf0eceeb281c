"""Measure serve.py: time to the first streamed token and tokens per second, with the openai client.

    python scripts/serve_latency.py                       # the default model, 5 greedy answers of 64 tokens
    python scripts/serve_latency.py --base_model builtin:tiny-llama --runs 3

Starts `serve.py` on a free port of 127.0.0.1, sends one warm-up request, then RUNS streamed requests one after
another, and prints a Markdown table (median of the runs). Figures depend on the machine and its load: say which.
"""

import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from medlora import cli

QUESTION = "What are the common causes of a persistent dry cough, and when should someone see a doctor?"


def main(base_model: str = "", runs: int = 5, max_tokens: int = 64):
    """Start serve.py with BASE_MODEL (default: serve.py's default) and time RUNS streamed answers of MAX_TOKENS."""
    import httpx
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = ["--base_model", base_model] if base_model else []
    server = subprocess.Popen([sys.executable, "serve.py", "--port", str(port), "--log_level", "warning", *flags],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit("serve.py exited; run it by hand to see why")
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        model = client.models.list().data[0].id
        rows = [stream_once(client, model, max_tokens) for _ in range(int(runs) + 1)][1:]  # the first warms up
    finally:
        server.terminate()
        server.wait(timeout=60)
    first = statistics.median(row[0] for row in rows)
    decode = statistics.median(row[1] for row in rows)
    overall = statistics.median(row[2] for row in rows)
    print(f"| model | first token (s) | decode tokens/s | tokens/s incl. first token | runs |\n|---|---|---|---|---|\n"
          f"| {model} | {first:.2f} | {decode:.1f} | {overall:.1f} | {len(rows)} x {rows[0][3]} tokens |")


def stream_once(client, model, max_tokens) -> tuple:
    """(seconds to the first content, decode tokens/s after it, tokens/s overall, completion tokens)."""
    started = time.perf_counter()
    first = None
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                                temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        usage = chunk.usage or usage
    total = time.perf_counter() - started
    tokens = usage.completion_tokens
    return first, (tokens - 1) / max(total - first, 1e-9), tokens / total, tokens


if __name__ == "__main__":
    cli.run(main)
