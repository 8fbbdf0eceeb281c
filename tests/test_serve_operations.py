"""serve.py under abuse and operations, on the real default model (SmolLM2-135M-Instruct), as processes on
127.0.0.1 reached through the official openai client and plain HTTP (issue 29): limits before work, refused fields,
GET /metrics, one access-log line a request, a graceful shutdown on SIGTERM, and a bounded soak of 50 clients."""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

MODEL = "builtin:smollm2-135m-instruct"
SECRET = "my neighbour Ezekiel Quarrington has a rash"  # must never reach the access log without --log_prompts
MAX_TOKENS = 8


class ServeProcess:
    """`python serve.py FLAGS` on a free port, its output in a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, tmp_path, *flags):
        self.port, self.log = free_port(), tmp_path / f"serve-{time.monotonic_ns()}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log, "w") as output:
            self.process = subprocess.Popen([sys.executable, "serve.py", "--port", str(self.port), "--log_level",
                                             "warning", "--max_new_tokens", str(MAX_TOKENS), *map(str, flags)],
                                            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 240
        while True:
            assert self.process.poll() is None, self.output()[-3000:]
            assert time.time() < deadline, "serve.py did not start"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)

    def output(self) -> str:
        return self.log.read_text()

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", **kwargs)

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    def stop(self, timeout=60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = ServeProcess(tmp_path_factory.mktemp("serve"), "--max_queue", 4)
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.output()


def ask(server, content="What is a fever?", **kwargs):
    return server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                   temperature=0, **kwargs)


def timed_get(url) -> float:
    started = time.perf_counter()
    assert httpx.get(url, timeout=10).status_code == 200
    return time.perf_counter() - started


def test_an_oversized_body_is_refused_with_413_before_it_is_read(server):
    # 27 MB announced, nothing sent: the answer comes from the Content-Length alone
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as connection:
        started = time.perf_counter()
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 27000000\r\n\r\n")
        reply = b""
        while chunk := connection.recv(65536):  # the server closes the connection after its answer
            reply += chunk
        reply = reply.decode()
        assert time.perf_counter() - started < 1
    status_line, _, body = reply.partition("\r\n")
    assert " 413 " in status_line, reply
    assert json.loads(body.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    # a chunked body (no Content-Length) is cut off as soon as it passes the limit
    response = httpx.post(f"{server.url}/v1/chat/completions", content=(b"x" * 65536 for _ in range(40)), timeout=30)
    assert response.status_code == 413 and "1,048,576 bytes (--max_request_bytes)" in response.json()["error"]["message"]


def test_a_message_longer_than_the_context_is_refused_by_length_and_the_server_stays_responsive(server):
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as refused:
        ask(server, "word " * 200_000)  # 1,000,000 characters, under the body limit
    assert time.perf_counter() - started < 1  # judged by characters: not tokenized
    assert refused.value.body["code"] == "context_length_exceeded" and "1,000,000 characters" in str(refused.value)
    # 500,000 characters may fit by length, so they are tokenized (about a second): off the event loop
    slow = threading.Thread(target=lambda: pytest.raises(openai.BadRequestError, ask, server, "word " * 100_000))
    slow.start()
    time.sleep(0.1)
    waits = [timed_get(f"{server.url}/health"), timed_get(f"{server.url}/v1/models")]
    slow.join()
    assert max(waits) < 1, waits


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function", "function": {"name": "triage"}}]),
                                          ("tool_choice", "auto"), ("response_format", {"type": "json_object"}),
                                          ("logprobs", True), ("n", 2)])
def test_fields_the_server_does_not_implement_get_400_naming_the_field(server, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(server, **{field: value})
    assert refused.value.status_code == 400 and refused.value.body["param"] == field


def test_harmless_unknown_fields_are_ignored(server):
    answer = ask(server, user="clinic-7", response_format={"type": "text"}, extra_body={"metadata_x": 1})
    assert answer.choices[0].message.content


def metric_samples(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_count_requests_tokens_and_times(server):
    def value(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    before = metric_samples(server)
    plain = ask(server)
    streamed = list(server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is a cough?"}], stream=True,
        stream_options={"include_usage": True}))
    tokens = plain.usage.completion_tokens + streamed[-1].usage.completion_tokens
    httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * (2 << 20), timeout=10)  # a 413
    after = metric_samples(server)
    chat = dict(endpoint="/v1/chat/completions", model=MODEL, status="200")
    assert value(after, "medlora_requests_total", **chat) - value(before, "medlora_requests_total", **chat) == 2
    too_large = dict(endpoint="/v1/chat/completions", model="", status="413")
    assert value(after, "medlora_requests_total", **too_large) - value(before, "medlora_requests_total",
                                                                        **too_large) == 1
    assert value(after, "medlora_generated_tokens_total", model=MODEL) - value(
        before, "medlora_generated_tokens_total", model=MODEL) == tokens > 0
    for histogram in ("medlora_time_to_first_token_seconds_count", "medlora_request_duration_seconds_count"):
        assert value(after, histogram, model=MODEL) - value(before, histogram, model=MODEL) == 2
    assert value(after, "medlora_requests_queued") == 0 and value(after, "medlora_requests_running") == 0


def test_the_access_log_has_a_line_per_request_and_no_message_text(server):
    marker = f"access-{time.monotonic_ns()}"
    answer = ask(server, f"{SECRET}; {marker}. What should I do?")
    time.sleep(0.2)
    lines = [line for line in server.output().splitlines() if " POST /v1/chat/completions 200 " in line]
    assert lines and f"completion_tokens={answer.usage.completion_tokens}" in lines[-1]
    assert f"prompt_tokens={answer.usage.prompt_tokens}" in lines[-1] and f"model={MODEL}" in lines[-1]
    assert "latency=" in lines[-1]
    assert SECRET not in server.output() and marker not in server.output()


def test_sigterm_drains_then_exits_0(tmp_path):
    """SIGTERM mid-stream: new requests get 503 with Retry-After, the stream in flight finishes with its
    finish_reason and [DONE], then the process exits 0; with --log_prompts the messages are in the access log."""
    running = ServeProcess(tmp_path, "--shutdown_timeout", 60, "--log_prompts")
    events, first = [], threading.Event()

    def stream():
        body = {"model": MODEL, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 24, "stream": True,
                "temperature": 0}
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(120)
    running.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = httpx.post(f"{running.url}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "shutting_down"
    reader.join(timeout=120)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] in ("length", "stop")
    assert running.process.wait(timeout=60) == 0
    output = running.output()
    assert SECRET in output and "Traceback" not in output  # --log_prompts


def test_the_shutdown_timeout_ends_long_answers_cleanly(tmp_path):
    running = ServeProcess(tmp_path, "--shutdown_timeout", 1)
    client = running.client(max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me about fevers."}],
                                            max_tokens=4000, stream=True)
    chunks = iter(stream)
    next(chunks)
    started = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert time.monotonic() - started < 15
    assert rest[-1].choices[0].finish_reason is not None  # the openai client saw [DONE] and a last chunk
    assert running.process.wait(timeout=60) == 0


def test_soak_of_50_mixed_clients_against_a_small_queue(server):
    """50 clients at once, bounded (each a few tokens; the whole run under two minutes): streamed, plain, cancelled
    by their client after the first chunk, and oversized. Each is answered in full, refused (429 or 413), or
    cancelled; the server's memory after is within 200 MiB of before; time to first token is printed."""
    ask(server)  # warm
    rss_before = server.rss_mib()
    kinds = ["stream"] * 20 + ["plain"] * 15 + ["cancel"] * 10 + ["oversized"] * 5
    client = server.client(max_retries=0, timeout=120)

    def one(kind):
        started = time.perf_counter()
        try:
            if kind == "oversized":
                return kind, httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * (2 << 20),
                                        timeout=60).status_code, None
            if kind == "plain":
                answer = ask(server, max_tokens=MAX_TOKENS)
                return kind, 200 if answer.choices[0].finish_reason in ("stop", "length") else 0, None
            stream = client.chat.completions.create(model=MODEL, stream=True, temperature=0,
                                                    messages=[{"role": "user", "content": "What is a fever?"}])
            chunks = iter(stream)
            first = next(chunks)  # the role chunk, sent before generation starts
            if kind == "cancel":
                stream.close()
                return kind, "cancelled", None
            while not (first.choices and first.choices[0].delta.content):
                first = next(chunks)
            first_token = time.perf_counter() - started
            rest = list(chunks)
            return kind, 200 if rest and rest[-1].choices[0].finish_reason else 0, first_token
        except openai.RateLimitError as error:
            return kind, error.status_code, None

    deadline = time.monotonic() + 120
    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(one, kinds))
    assert time.monotonic() < deadline
    expected = {"stream": {200, 429}, "plain": {200, 429}, "cancel": {"cancelled", 429}, "oversized": {413}}
    assert all(result in expected[kind] for kind, result, _ in outcomes), outcomes
    assert sum(result == 200 for _, result, _ in outcomes) >= 5 and sum(result == 429 for _, result, _ in outcomes) >= 1
    deadline = time.time() + 60
    while (health := httpx.get(f"{server.url}/health", timeout=10).json())["running"] + health["queued"]:
        assert time.time() < deadline, health
        time.sleep(0.2)
    assert server.rss_mib() - rss_before < 200, (rss_before, server.rss_mib())
    first_tokens = sorted(t for _, _, t in outcomes if t is not None)
    p95 = first_tokens[min(len(first_tokens) - 1, round(0.95 * (len(first_tokens) - 1)))]
    print(f"soak: {len(first_tokens)} streams answered; time to first token p50 {statistics.median(first_tokens):.2f} s, "
          f"p95 {p95:.2f} s; RSS {rss_before:.0f} -> {server.rss_mib():.0f} MiB; cpu {os.cpu_count()}")
