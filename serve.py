"""Serve a tuned model through an OpenAI-compatible API (chat completions, streamed as server-sent events).

    python serve.py                                                # the default model on http://127.0.0.1:8000/v1
    python serve.py --lora_weights ./lora-medlora                  # the base, and the adapter as model "lora-medlora"
    MEDLORA_API_KEY="$(cat key.txt)" python serve.py --lora_weights "triage=./lora-triage,notes=./lora-notes"
    python serve.py --help                                         # every flag

Any OpenAI client then talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")  # the key if one is set
    client.chat.completions.create(model="builtin:smollm2-135m-instruct", messages=[...], stream=True)

The request's `model` picks an adapter by its name, or the base model by its own name (GET /v1/models
lists them). The server binds 127.0.0.1 unless told otherwise, refuses a body over --max_request_bytes (413)
and fields it does not implement (tools, logprobs, ...: 400), writes one access-log line a request (no message
text unless --log_prompts), serves Prometheus metrics on GET /metrics, and on SIGTERM or Ctrl-C lets the answers
in flight finish (new requests get 503) before it exits 0. For more than a few users, serve the merged export
with vLLM (docs/serving.md). Answers are not medical advice.
"""

import os

from medlora import cli
from medlora.errors import MedLoRAError
from medlora.flag_groups import DEVICE, GENERATION, KNOWLEDGE, MODEL
from medlora.flags import FlagGroup, stage_flags
from medlora.inference.generation import DISCLAIMER, GenerationSettings

API_KEY_VARIABLE = "MEDLORA_API_KEY"


@stage_flags(
    MODEL,
    DEVICE,
    GENERATION.without("num_beams", "system"),
    FlagGroup("server", host="127.0.0.1", port=8000, api_key="", max_concurrency=1, max_queue=8,
              max_request_bytes=1 << 20, shutdown_timeout=30.0, log_prompts=False, log_level="info"),
    KNOWLEDGE,
)
def main(flags):
    """Serve BASE_MODEL and the LORA_WEIGHTS adapters on it at http://HOST:PORT/v1 (OpenAI chat completions).

    Args:
        base_model: Hub id, local folder (a merged export too) or builtin:NAME; default: the first adapter's base, else builtin:smollm2-135m-instruct. Requests name it by this string.
        lora_weights: Adapters to serve on the base, loaded once: name=path,name2=path2 (a bare path is named after its folder); empty: the base alone.
        prompt_template_name: A template in templates/ for every served model; default: each adapter's own (medlora_run.json), the base's default for the base.
        temperature: Used when a request gives none; 0 is greedy decoding.
        top_p: Nucleus sampling, used when a request gives none; 1 disables it.
        top_k: Sampling from the k likeliest tokens (OpenAI requests cannot set it); 0 disables it.
        max_new_tokens: Answer length when a request gives no max_tokens / max_completion_tokens.
        repetition_penalty: For every request (OpenAI requests cannot set it; chat.py's default); 1 disables it.
        host: Address to bind; 127.0.0.1 keeps the API on this machine. 0.0.0.0 exposes it: set --api_key then.
        port: TCP port.
        api_key: Require 'Authorization: Bearer KEY' on /v1 (default: the MEDLORA_API_KEY environment variable; empty: no key).
        max_concurrency: Answers generated at once (all on the same adapter; 1 keeps a request's seed reproducible).
        max_queue: Requests that may wait beyond those; more are refused at once with 429 and Retry-After.
        max_request_bytes: Larger request bodies are refused with 413 before they are read whole.
        shutdown_timeout: On SIGTERM or Ctrl-C, seconds the answers in flight may take to finish (new requests get 503 meanwhile); then the rest are ended and the server exits 0. A second signal stops at once.
        log_prompts: Write each request's messages into the access log (medical conversations are sensitive: off by default).
        log_level: uvicorn's log level: critical, error, warning, info, debug.
        knowledge_path: Ground answers in a knowledge base (.csv/.jsonl/.json/.txt/.md or a folder; docs/retrieval.md): each question's best passages go into the prompt, and the response lists them as `sources`.
        knowledge_top_k: Passages per question from --knowledge_path.
    """
    defaults = GenerationSettings.from_flags(flags)
    if int(flags.max_concurrency) < 1 or int(flags.max_queue) < 0:
        raise MedLoRAError("--max_concurrency must be >= 1 and --max_queue >= 0")
    if not isinstance(flags.max_request_bytes, int) or flags.max_request_bytes < 1:
        raise MedLoRAError(f"--max_request_bytes {flags.max_request_bytes!r}: must be a whole number of bytes >= 1")
    if not isinstance(flags.shutdown_timeout, (int, float)) or flags.shutdown_timeout < 0:
        raise MedLoRAError(f"--shutdown_timeout {flags.shutdown_timeout!r}: must be a number of seconds >= 0")
    from medlora.inference.retrieval import load_knowledge
    from medlora.inference.serving import ServedModels, create_app, parse_adapters

    adapters = parse_adapters(flags.lora_weights)
    knowledge = load_knowledge(flags.knowledge_path, flags.knowledge_top_k)  # checked and indexed before the model loads
    api_key = str(flags.api_key or os.environ.get(API_KEY_VARIABLE, ""))
    if flags.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {flags.host} without --api_key: anyone who can reach the port can use the model")
    print(DISCLAIMER, flush=True)
    models = ServedModels.load(flags.base_model, adapters, flags.prompt_template_name, load_in_8bit=flags.load_in_8bit,
                               load_in_4bit=flags.load_in_4bit, device=flags.device or None, precision=flags.precision,
                               trust_remote_code=flags.trust_remote_code)
    for served in models.by_name.values():
        print(f"model {served.name!r}: {served.chat.describe()}", flush=True)
    if knowledge:
        print(f"knowledge: {knowledge.describe()}", flush=True)
    app = create_app(models, defaults, api_key, int(flags.max_concurrency), int(flags.max_queue), knowledge,
                     flags.max_request_bytes, flags.log_prompts)
    import uvicorn

    from medlora.inference.operations import draining_server

    print(f"OpenAI-compatible API on http://{flags.host}:{flags.port}/v1 (Ctrl-C stops it)", flush=True)
    # uvicorn's access log is off: RequestLimits writes one line a request, with its model and token counts
    config = uvicorn.Config(app, host=flags.host, port=int(flags.port), log_level=flags.log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    draining_server(config, app.state, float(flags.shutdown_timeout)).run()
    print("server stopped", flush=True)


if __name__ == "__main__":
    cli.run(main)
