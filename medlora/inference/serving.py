"""The OpenAI-compatible API behind serve.py: one base model, any number of LoRA adapters on it, answers
from the generation core (ChatModel) as JSON or server-sent events.

  ServedModels    loads the base once and each adapter into it (PEFT multi-adapter); a request's `model`
                  picks an adapter by name, or the base (adapters disabled) by the base model's own name
  GenerationGate  at most max_concurrency generations run at once, all on the same adapter (the active
                  adapter is the model's state); max_queue more wait in arrival order; beyond that a request
                  is refused at once (429 with Retry-After) rather than left hanging
  create_app      the FastAPI app: GET /health, GET /v1/models, POST /v1/chat/completions
  (medlora/inference/operations.py: request limits, the access log, Prometheus metrics, graceful shutdown)

A client that disconnects (a closed stream, an abandoned request) cancels its generation at the next token. Work
that grows with a request (tokenizing the prompt, searching the knowledge base) runs off the event loop, so
/health and other clients stay responsive while one long request is read, refused or served.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from medlora.errors import MedLoRAError
from medlora.inference.api_requests import APIError, parse_chat_request
from medlora.inference.generation import (
    DISCLAIMER,
    ChatModel,
    GenerationReport,
    GenerationSettings,
    exported_template,
)
from medlora.inference.operations import (
    DEFAULT_MAX_REQUEST_BYTES,
    RETRY_AFTER_SECONDS,
    RequestLimits,
    ServerState,
    log_to_stdout,
    longest_token_chars,
)
from medlora.inference.retrieval import search_text

logger = logging.getLogger(__name__)


# ---- models --------------------------------------------------------------------------------------------------
def parse_adapters(spec) -> dict:
    """--lora_weights "name=path,name2=path2" (a bare path is named after its folder) -> {name: path}."""
    if not spec:
        return {}
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    adapters = {}
    for item in (str(item).strip() for item in items):
        if not item:
            continue
        name, path = item.split("=", 1) if "=" in item else (Path(item).name, item)
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise MedLoRAError(f"--lora_weights {item!r}: write name=path (several: name=path,name2=path2)")
        if name in adapters:
            raise MedLoRAError(f"--lora_weights: the name {name!r} is given twice")
        if not Path(path).expanduser().is_dir():
            raise MedLoRAError(f"--lora_weights {name}={path}: no such folder")
        adapters[name] = str(Path(path).expanduser())
    return adapters


@dataclass
class ServedModel:
    name: str
    chat: ChatModel
    peft_name: str | None  # None: the base model, adapters disabled
    path: str | None = None


class ServedModels:
    def __init__(self, served: list, base_name: str):
        self.by_name = {model.name: model for model in served}
        self.base_name = base_name
        self.model = served[0].chat.model
        self.created = int(time.time())
        self._base_mode = contextlib.ExitStack()  # holds disable_adapter() while the base is selected

    @classmethod
    def load(cls, base_model: str = "", adapters: dict | None = None, prompt_template: str = "", **load_kwargs):
        """load_kwargs: ChatModel.load's load_in_8bit, load_in_4bit, device, precision, trust_remote_code."""
        from medlora.models.builtin import (
            DEFAULT_BASE_MODEL,
            default_template_for,
            is_builtin,
        )
        from medlora.models.loading import InferenceModel
        from medlora.run_folder import RunFolder

        adapters = dict(adapters or {})
        names = list(adapters)
        first = ChatModel.load(base_model, adapters[names[0]] if names else None,
                               prompt_template_name=prompt_template or None, **load_kwargs)
        base_name = base_model or first.inference.run_settings.get("base_model") or DEFAULT_BASE_MODEL
        if base_name in adapters:
            raise MedLoRAError(f"--lora_weights: {base_name!r} is the base model's own name; name the adapter otherwise")
        if not names:
            return cls([ServedModel(base_name, first, None)], base_name)
        served = [ServedModel(names[0], first, "default", adapters[names[0]])]  # PEFT names the first "default"
        tokenizer = first.tokenizer
        for name in names[1:]:
            settings = RunFolder.adapter(adapters[name]).settings
            if settings.get("base_model") not in (None, base_name):
                logger.warning("adapter %s was trained on %s; it is served on %s", name, settings["base_model"],
                               base_name)
            first.model.load_adapter(adapters[name], adapter_name=name)
            inference = InferenceModel(first.model, tokenizer, settings.get("prompt_template_name"), settings)
            served.append(ServedModel(name, ChatModel(inference, prompt_template or None, first.max_context,
                                                      adapters[name]), name, adapters[name]))
        base_template = prompt_template or (default_template_for(base_name) if is_builtin(base_name)
                                            else exported_template(base_name))
        base = ChatModel(InferenceModel(first.model, tokenizer, base_template, {}), None, first.max_context)
        served.insert(0, ServedModel(base_name, base, None))
        return cls(served, base_name)

    def get(self, name: str) -> ServedModel:
        if name not in self.by_name:
            raise APIError(404, f"model {name!r} is not served here; served: {', '.join(self.by_name)}",
                           param="model", code="model_not_found")
        return self.by_name[name]

    def select(self, name: str) -> None:
        """Make `name` the model's active adapter (or disable adapters for the base). Only called while no
        generation runs."""
        from peft import PeftModel

        peft_name = self.by_name[name].peft_name
        if not isinstance(self.model, PeftModel):
            return  # the base alone
        self._base_mode.close()
        if peft_name is None:
            self._base_mode.enter_context(self.model.disable_adapter())
        else:
            self.model.set_adapter(peft_name)

    def describe(self) -> list:
        return [{"id": model.name, "object": "model", "created": self.created, "owned_by": "medlora",
                 "root": self.base_name, "parent": None if model.peft_name is None else self.base_name,
                 "medlora": {"adapter": model.path, "prompt_template": model.chat.template.name,
                             "max_context": model.chat.max_context, "disclaimer": DISCLAIMER}}
                for model in self.by_name.values()]


# ---- scheduling ----------------------------------------------------------------------------------------------
@dataclass
class Ticket:
    """One admitted request: queued, then running, then closed."""
    name: str
    state: str = "queued"
    granted: asyncio.Future | None = None


@dataclass
class GenerationGate:
    select: callable  # switches the model to a served name (no generation is running when it is called)
    max_concurrency: int = 1
    max_queue: int = 8
    running: int = 0
    active: str | None = None
    waiting: deque = field(default_factory=deque)
    queued: int = 0

    def admit(self, name: str) -> Ticket | None:
        """A ticket, or None when max_concurrency requests run and max_queue wait already."""
        if self.running + self.queued >= self.max_concurrency + self.max_queue:
            return None
        self.queued += 1
        return Ticket(name)

    def _can_start(self, name: str) -> bool:
        return self.running < self.max_concurrency and (self.running == 0 or self.active == name)

    def _start(self, ticket: Ticket) -> None:
        if self.running == 0 and self.active != ticket.name:
            self.select(ticket.name)
            self.active = ticket.name
        self.running += 1
        self.queued -= 1
        ticket.state = "running"

    async def acquire(self, ticket: Ticket) -> None:
        if not self.waiting and self._can_start(ticket.name):  # first come, first served: no overtaking
            self._start(ticket)
            return
        ticket.granted = asyncio.get_running_loop().create_future()
        self.waiting.append(ticket)
        await ticket.granted  # a cancelled wait is cleaned up by close()

    def close(self, ticket: Ticket) -> None:
        """The request is over, however it ended (idempotent)."""
        if ticket.state == "queued":
            self.queued -= 1
            if ticket in self.waiting:
                self.waiting.remove(ticket)
        elif ticket.state == "running":
            self.running -= 1
        ticket.state = "closed"
        while self.waiting and self._can_start(self.waiting[0].name):
            waiter = self.waiting.popleft()
            self._start(waiter)
            waiter.granted.set_result(None)


# ---- the app -------------------------------------------------------------------------------------------------
def create_app(models: ServedModels, defaults: GenerationSettings, api_key: str = "", max_concurrency: int = 1,
               max_queue: int = 8, knowledge=None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               log_prompts: bool = False):
    """The FastAPI app, wrapped in RequestLimits. knowledge (a retrieval.KnowledgeBase): every question is searched
    in it, the passages go into the prompt, and the answer carries them as `sources` (a field OpenAI clients
    ignore). log_prompts: the access log carries each request's messages (medical conversations are sensitive:
    off by default)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    import anyio

    app = FastAPI(title="MedLoRA OpenAI-compatible API", description=DISCLAIMER)
    gate = GenerationGate(models.select, max_concurrency, max_queue)
    state = app.state.server = ServerState(gate)
    token_chars = {}  # per tokenizer (the served models share the base's)
    char_limit = {name: served.chat.max_context * token_chars.setdefault(
        id(served.chat.tokenizer), longest_token_chars(served.chat.tokenizer)) for name, served in models.by_name.items()}
    tokenizing = threading.Lock()  # one prompt at a time: a fast tokenizer is not safe to share across threads

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # unknown route, wrong method
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):  # uvicorn logs the traceback
        return JSONResponse(APIError(500, "internal server error; see the server's log", "server_error").body(),
                            status_code=500)

    def check_key(request: Request) -> None:
        if api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                               f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models.by_name), "running": gate.running, "queued": gate.queued,
                "max_concurrency": max_concurrency, "max_queue": max_queue, **state.counters()}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": models.describe(), "disclaimer": DISCLAIMER}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        chat_request = parse_chat_request(body)
        served = models.get(chat_request.model)
        access = request.scope["state"].setdefault("access", {})
        access["model"] = served.name
        if log_prompts:
            access["messages"] = chat_request.messages
        settings = replace(defaults, num_beams=1, max_new_tokens=chat_request.max_tokens or defaults.max_new_tokens,
                           **{name: value for name in ("temperature", "top_p")
                              if (value := getattr(chat_request, name)) is not None})
        question = chat_request.messages[-1]["content"]
        if len(question) > char_limit[served.name]:  # judged by characters: too long whatever its tokens
            raise APIError(400, f"the message is too long: {len(question):,} characters cannot fit the model's "
                                f"context of {served.chat.max_context} tokens", param="messages",
                           code="context_length_exceeded")

        def build_prompt():
            with tokenizing:
                passages = knowledge.search(search_text(chat_request.messages[-1])) if knowledge else None
                return served.chat.prompt_for(chat_request.messages, chat_request.system, settings.max_new_tokens,
                                              passages=passages)

        try:
            prompt = await anyio.to_thread.run_sync(build_prompt)
        except MedLoRAError as error:
            too_long = "too long" in str(error)
            raise APIError(400, str(error), param="messages",
                           code="context_length_exceeded" if too_long else "invalid_value") from None
        ticket = gate.admit(served.name)
        if ticket is None:
            state.refused += 1
            raise APIError(429, f"the server is busy ({gate.running} running, {gate.queued} queued); retry later",
                           "rate_limit_error", code="server_busy", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        access["prompt_tokens"] = len(prompt.input_ids)
        job = Generation(served, prompt.input_ids, settings, chat_request, gate, ticket, state,
                         [passage.to_dict() for passage in prompt.sources] if knowledge else None, access)
        if chat_request.stream:
            return job.streaming_response()
        try:
            return JSONResponse(await job.complete(request))
        finally:
            gate.close(ticket)

    @app.get("/metrics")
    async def metrics():  # like /health, no key: counts and timings, never a message
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    log_to_stdout()
    return RequestLimits(app, state, max_request_bytes)


class Generation:
    """One request's answer: generated in a thread by ChatModel.stream_prompt, handed to the event loop."""

    def __init__(self, served, input_ids, settings, chat_request, gate, ticket, state, sources=None, access=None):
        self.served, self.input_ids, self.settings, self.request = served, input_ids, settings, chat_request
        self.sources = sources  # the knowledge passages in the prompt (--knowledge_path), else None
        self.access = {} if access is None else access  # the request's access-log fields
        self.gate, self.ticket, self.state = gate, ticket, state
        self.cancel, self.report = threading.Event(), GenerationReport()
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _generate(self, deliver) -> None:
        try:
            if self.request.seed is not None:
                from transformers import set_seed

                set_seed(self.request.seed)
            for text in self.served.chat.stream_prompt(self.input_ids, self.settings, self.cancel, self.request.stop,
                                                       self.report):
                deliver(("text", text))
        except BaseException as error:  # re-raised in the event loop
            deliver(("error", error))
        finally:
            deliver(("end", None))

    async def texts(self):
        """The growing answer; runs once the gate lets the request start; stops generating when closed."""
        import anyio

        await self.gate.acquire(self.ticket)
        self.state.generations.add(self.cancel)  # ended by the shutdown timeout, if it comes first
        if self.state.ending:
            self.cancel.set()
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        thread = threading.Thread(target=self._generate, args=(lambda item: loop.call_soon_threadsafe(
            pieces.put_nowait, item),), name="medlora-serve", daemon=True)
        thread.start()
        first = True
        try:
            while True:
                kind, value = await pieces.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise value
                if first:
                    first = False
                    started = self.access.get("started")
                    if started is not None:
                        self.state.metrics.first_token.labels(self.served.name).observe(time.perf_counter() - started)
                yield value
        finally:
            self.cancel.set()  # a no-op after a finished answer; stops a generation whose client went away
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)
            self.state.generations.discard(self.cancel)
            self.state.generated_tokens += self.report.completion_tokens
            self.state.metrics.tokens.labels(self.served.name).inc(self.report.completion_tokens)
            self.access.update(completion_tokens=self.report.completion_tokens, finish_reason=self.report.finish_reason)
            if self.report.finish_reason == "cancelled":
                self.state.cancelled += 1
            else:
                self.state.completed += 1
            self.gate.close(self.ticket)

    def usage(self) -> dict:
        prompt, completion = len(self.input_ids), self.report.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _finish_reason(self) -> str:  # OpenAI's: a cancelled answer has no reader left
        return "length" if self.report.finish_reason == "length" else "stop"

    async def complete(self, request) -> dict:
        async def watch_disconnect():
            while not self.cancel.is_set():
                await asyncio.sleep(0.25)
                if await request.is_disconnected():
                    self.cancel.set()

        watcher = asyncio.create_task(watch_disconnect())
        text = ""
        try:
            async for text in self.texts():
                pass
        finally:
            watcher.cancel()
        response = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.served.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": self._finish_reason()}],
                    "usage": self.usage(), "system_fingerprint": None}
        if self.sources is not None:
            response["sources"] = self.sources
        return response

    def _chunk(self, delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.served.name, "choices": choices, "system_fingerprint": None}
        if self.request.include_usage:
            chunk["usage"] = usage
        if self.sources is not None and delta is not None and delta.get("role"):
            chunk["sources"] = self.sources  # once, on the first chunk
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def events(self):
        yield self._chunk({"role": "assistant", "content": ""})
        shown = ""
        try:
            async for text in self.texts():
                if len(text) > len(shown):
                    yield self._chunk({"content": text[len(shown):]})
                    shown = text
        except Exception:  # the status line is sent already: end the stream with an error event
            logger.exception("generation failed")
            yield f"data: {json.dumps(APIError(500, 'generation failed; see the server log', 'server_error').body())}\n\n"
            return
        yield self._chunk({}, self._finish_reason())
        if self.request.include_usage:
            yield self._chunk(None, usage=self.usage())
        yield "data: [DONE]\n\n"

    def streaming_response(self):
        from starlette.responses import StreamingResponse

        gate, ticket = self.gate, self.ticket

        class GatedStream(StreamingResponse):
            async def __call__(self, scope, receive, send):
                try:
                    await super().__call__(scope, receive, send)
                finally:  # the client may leave before the stream starts, when no finally of texts() runs
                    gate.close(ticket)

        return GatedStream(self.events(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
