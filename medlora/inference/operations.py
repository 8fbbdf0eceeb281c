"""What an operator of serve.py needs around the API (medlora/inference/serving.py): limits before work, one
access-log line a request, Prometheus metrics, and a graceful shutdown.

  ServerState     what the app and its middleware share: counters, the gate's depth, requests in flight, the
                  generations to end at shutdown, the metrics
  ServerMetrics   GET /metrics in Prometheus' text format (prometheus-client, one registry per app)
  RequestLimits   ASGI middleware: a body over max_request_bytes gets 413 before it is read whole; while the
                  server drains, new requests get 503 with Retry-After; every request gets one access-log line
  DrainingServer  uvicorn's server with SIGTERM / Ctrl-C turned into a drain: stop taking requests, let those in
                  flight finish within shutdown_timeout, end the rest with their finish_reason and [DONE], exit 0
"""

import json
import logging
import time
from dataclasses import dataclass, field

from medlora.inference.api_requests import APIError

access_logger = logging.getLogger("medlora.access")
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
RETRY_AFTER_SECONDS = 1
# Endpoints named in metrics; any other path counts as "other" (a scan of random paths must not grow the label set).
ENDPOINTS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    """Requests by endpoint, model and status; latency and time to first token; requests running and queued;
    tokens generated. Model labels come from the served models only (an unknown model is a 404 without one)."""

    def __init__(self, gate):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: a scrape is counts and timings only
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("medlora_requests", "HTTP requests answered, by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=registry)
        self.latency = Histogram("medlora_request_duration_seconds", "Time from a chat request's arrival to the "
                                 "end of its response", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("medlora_time_to_first_token_seconds", "Time from a chat request's arrival "
                                     "to its first generated text", ["model"], buckets=LATENCY_BUCKETS,
                                     registry=registry)
        self.tokens = Counter("medlora_generated_tokens", "Completion tokens generated", ["model"], registry=registry)
        Gauge("medlora_requests_running", "Answers being generated", registry=registry).set_function(
            lambda: gate.running)
        Gauge("medlora_requests_queued", "Requests waiting for the generation gate", registry=registry).set_function(
            lambda: gate.queued)

    def render(self) -> tuple:
        """(body, content type) of GET /metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class ServerState:
    gate: object
    metrics: ServerMetrics = field(init=False)
    completed: int = 0
    cancelled: int = 0  # stopped because the client went away (or the shutdown timeout passed)
    refused: int = 0  # 429
    generated_tokens: int = 0
    in_flight: int = 0  # requests taken and not yet answered in full
    draining_since: float | None = None  # time.monotonic() of the shutdown signal
    ending: bool = False  # the shutdown timeout passed: answers end at once
    generations: set = field(default_factory=set)  # cancel events of the answers being generated

    def __post_init__(self):
        self.metrics = ServerMetrics(self.gate)

    def counters(self) -> dict:
        return {"completed": self.completed, "cancelled": self.cancelled, "refused": self.refused,
                "generated_tokens": self.generated_tokens, "draining": self.draining_since is not None}

    def end_generations(self) -> None:
        """The shutdown timeout passed: every answer still being generated stops at its next token (and one that
        starts later, at once)."""
        self.ending = True
        for cancel in list(self.generations):
            cancel.set()


class RequestLimits:
    """ASGI middleware around the app. A request body over max_bytes is answered 413 at once: by its Content-Length
    before any of it is read, or (a chunked body) as soon as the bytes read pass the limit. While the server drains,
    every new request is answered 503 with Retry-After. Every HTTP request gets one access-log line when its
    response ends (time, method, path, status, model, prompt and completion tokens, latency) and is counted in the
    metrics; the handler adds what it knows to scope["state"]["access"] (the messages only when asked)."""

    def __init__(self, app, state: ServerState, max_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.app, self.state, self.max_bytes = app, state, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, started, status = self.state, time.perf_counter(), {}
        access = scope.setdefault("state", {}).setdefault("access", {})
        access["started"] = started
        state.in_flight += 1
        ended = False

        async def send_and_log(message):
            nonlocal ended
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not ended:
                ended = True
                state.in_flight -= 1
                self._record(scope, status.get("code"), access, time.perf_counter() - started)

        try:
            if state.draining_since is not None:
                return await self._refuse(send_and_log, APIError(
                    503, "the server is shutting down; retry on another instance", "server_error",
                    code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}))
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                return await self._too_large(send_and_log, f"{int(declared):,} bytes")
            body, more = [], True
            while more:  # read (and count) the body here; the app gets it replayed
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                body.append(message.get("body", b""))
                more = message.get("more_body", False)
                if sum(map(len, body)) > self.max_bytes:
                    return await self._too_large(send_and_log, "more than that")
            whole = b"".join(body)

            async def replay():
                nonlocal whole
                if whole is None:
                    return await receive()  # after the body: wait for the client to leave
                message, whole = {"type": "http.request", "body": whole, "more_body": False}, None
                return message

            await self.app(scope, replay, send_and_log)
        finally:
            if not ended:  # no complete response (the client left): no longer in flight
                ended = True
                state.in_flight -= 1
                self._record(scope, status.get("code", 499), access, time.perf_counter() - started)

    async def _too_large(self, send, size: str):
        await self._refuse(send, APIError(413, f"the request body is {size}; this server takes at most "
                                               f"{self.max_bytes:,} bytes (--max_request_bytes)",
                                          code="request_too_large"))

    async def _refuse(self, send, error: APIError):
        """The error answered by the middleware itself; the connection closes after it (the body may be unread)."""
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *[(name.lower().encode(), str(value).encode())
                                                for name, value in error.headers.items()]]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope, status, access: dict, seconds: float) -> None:
        path, model = scope["path"], access.get("model", "")
        metrics = self.state.metrics
        metrics.requests.labels(path if path in ENDPOINTS else "other", model, str(status)).inc()
        if model and path == "/v1/chat/completions":
            metrics.latency.labels(model).observe(seconds)
        fields = [f"{key}={access[key]}" for key in ("model", "prompt_tokens", "completion_tokens", "finish_reason")
                  if access.get(key) not in (None, "")]
        if access.get("messages") is not None:
            fields.append(f"messages={json.dumps(access['messages'], ensure_ascii=False)}")
        access_logger.info("%s %s %s %s%s latency=%.3fs", time.strftime("%Y-%m-%dT%H:%M:%S%z"), scope["method"],
                           path, status, "".join(f" {item}" for item in fields), seconds)


def longest_token_chars(tokenizer) -> int:
    """The most characters one token of the vocabulary decodes to: a message longer than the context times this
    cannot fit whatever its tokens, so it is refused without tokenizing it."""
    return max(1, max(len(text) for text in tokenizer.batch_decode([[index] for index in range(len(tokenizer))])))


def log_to_stdout() -> None:
    """One access line a request on standard output, beside uvicorn's own log (which has its access log off)."""
    if not access_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_logger.addHandler(handler)
        access_logger.setLevel(logging.INFO)
        access_logger.propagate = False


def draining_server(config, state: ServerState, shutdown_timeout: float):
    """A uvicorn.Server whose first SIGTERM or SIGINT drains instead of stopping (a second one stops at once):
    new requests get 503 with Retry-After, requests in flight finish, and once none is left, or shutdown_timeout
    seconds have passed (the answers still running then are ended, each stream with its finish_reason and [DONE]),
    the server stops and the process exits 0. A load balancer can roll a new version without cutting anyone off."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):  # not recorded as a captured signal: uvicorn then exits normally
            if state.draining_since is not None:
                self.should_exit = self.force_exit = True
                return
            state.draining_since = time.monotonic()
            print(f"shutting down: {state.in_flight} request(s) in flight, new ones refused (503); waiting at most "
                  f"{shutdown_timeout:g} s (a second Ctrl-C stops at once)", flush=True)

        async def on_tick(self, counter: int) -> bool:
            if state.draining_since is not None and not self.should_exit:
                waited = time.monotonic() - state.draining_since
                if state.in_flight <= 0:
                    self.should_exit = True
                elif waited > shutdown_timeout:
                    state.end_generations()
                    self.should_exit = waited > shutdown_timeout + 5  # the ended answers' last events are sent
            return await super().on_tick(counter)

    return DrainingServer(config)
