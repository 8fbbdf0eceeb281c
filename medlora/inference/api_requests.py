"""Validating OpenAI chat-completion requests for serve.py, and OpenAI's error shape.

Harmless fields MedLoRA does not use (user, metadata, frequency_penalty, ...) are ignored, as OpenAI-compatible
servers do; fields that would change what the answer must be and that MedLoRA does not implement (tools, functions,
a JSON response_format, logprobs, n > 1) are refused, so a client never silently gets less than it asked for;
fields it uses are checked strictly (a string where a number belongs is refused, not converted), and a
bad one becomes an `APIError` naming it: `{"error": {"message", "type", "param", "code"}}` with status 400.
"""

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4  # OpenAI's limit
UNION_BRANCH_NAMES = {"str", "int", "float", "bool", "none"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionBody(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1


@dataclass
class ChatRequest:
    model: str
    messages: list  # [{"role": "user"|"assistant", "content": str}], alternating, ending with the user's
    system: str | None  # None: the template's default system prompt
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: list
    seed: int | None
    stream: bool
    include_usage: bool


# field -> (values that ask for nothing, what is not supported): a request giving any other value is refused.
UNSUPPORTED = {
    "tools": ((None, []), "this server does not call tools"),
    "tool_choice": ((None, "none"), "this server does not call tools"),
    "functions": ((None, []), "this server does not call functions"),
    "function_call": ((None, "none"), "this server does not call functions"),
    "response_format": ((None, {"type": "text"}), "this server answers in plain text only ({\"type\": \"text\"})"),
    "logprobs": ((None, False), "this server does not return log-probabilities"),
    "top_logprobs": ((None, 0), "this server does not return log-probabilities"),
}


def refuse_unsupported(body: dict) -> None:
    for name, (harmless, reason) in UNSUPPORTED.items():
        if name in body and not any(body[name] == value and type(body[name]) is type(value) for value in harmless):
            raise APIError(400, f"{name}: {reason}", param=name, code="unsupported_parameter")


def parse_chat_request(body) -> ChatRequest:
    """The request, or an APIError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    refuse_unsupported(body)
    try:
        parsed = ChatCompletionBody.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = _field_path(first["loc"])
        raise APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None
    if parsed.n not in (None, 1):
        raise APIError(400, "n: only one choice per request is supported (n=1)", param="n", code="invalid_value")
    stop = [parsed.stop] if isinstance(parsed.stop, str) else list(parsed.stop or [])
    if len(stop) > MAX_STOP_STRINGS or not all(stop):
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop", code="invalid_value")
    system, messages = _split_system(parsed.messages)
    return ChatRequest(model=parsed.model, messages=messages, system=system,
                       max_tokens=parsed.max_completion_tokens or parsed.max_tokens, temperature=parsed.temperature,
                       top_p=parsed.top_p, stop=stop, seed=parsed.seed, stream=bool(parsed.stream),
                       include_usage=bool(parsed.stream and parsed.stream_options and parsed.stream_options.include_usage))


def _field_path(loc) -> str:
    """messages.0.content from pydantic's loc; a union's branches add their type to it
    (content.str, content.list[TextPart].0.text), which names no field: cut there."""
    parts = []
    for part in loc:
        if isinstance(part, str) and (part in UNION_BRANCH_NAMES or "[" in part):
            break
        parts.append(str(part))
    return ".".join(parts)


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _split_system(messages: list) -> tuple:
    """(system prompt or None, the user/assistant turns): system messages only lead, turns alternate
    starting and ending with the user, as the templates render them."""
    leading = 0
    while leading < len(messages) and messages[leading].role in ("system", "developer"):
        leading += 1
    system = "\n\n".join(_text(message.content) for message in messages[:leading]) if leading else None
    turns = []
    for index, message in enumerate(messages[leading:], start=leading):
        expected = "user" if (index - leading) % 2 == 0 else "assistant"
        if message.role != expected:
            where = "system messages come first; " if message.role in ("system", "developer") else ""
            raise APIError(400, f"messages.{index}.role: expected '{expected}' ({where}turns alternate user/assistant)",
                           param=f"messages.{index}.role", code="invalid_value")
        turns.append({"role": message.role, "content": _text(message.content)})
    if not turns or turns[-1]["role"] != "user":
        raise APIError(400, "messages: the last message must be the user's", param="messages", code="invalid_value")
    return system, turns
