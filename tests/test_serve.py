"""serve.py's OpenAI-compatible API, through a real server on 127.0.0.1 and the official openai client.

Most tests share one in-process server (uvicorn in a thread) of the tiny model with two adapters; the
answers are greedy, so they can be compared exactly with chat.py --prompt and the generation core."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from safetensors.torch import load_file, save_file

from medlora.inference.generation import DISCLAIMER, ChatModel, GenerationSettings
from medlora.inference.serving import ServedModels, create_app
from tests.conftest import TINY, free_port, run_script, serve_script, stop

# Every test here starts a real server on a real model (the queue logic at the end is quick but shares the module).
pytestmark = pytest.mark.slow

KEY = "test-key-123"
MAX_TOKENS = 12
SERVER_DEFAULTS = GenerationSettings(temperature=0.7, repetition_penalty=3.0, max_new_tokens=MAX_TOKENS)
GREEDY = GenerationSettings(temperature=0, repetition_penalty=3.0, max_new_tokens=MAX_TOKENS)
QUESTION = "I have had a dry cough for a week."


class InProcessServer:
    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key=KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, **kwargs)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()


@pytest.fixture(scope="module")
def second_adapter(tiny_adapter, tmp_path_factory):
    """A second, different adapter: the tiny adapter with its LoRA B matrices negated."""
    folder = tmp_path_factory.mktemp("adapter2") / "lora2"
    folder.mkdir()
    for path in tiny_adapter.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    weights = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    save_file({name: -tensor if "lora_B" in name else tensor for name, tensor in weights.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def served(tiny_adapter, second_adapter):
    return ServedModels.load(TINY, {"medic": str(tiny_adapter), "medic-b": str(second_adapter)})


@pytest.fixture(scope="module")
def server(served):
    with InProcessServer(create_app(served, SERVER_DEFAULTS, api_key=KEY, max_concurrency=1, max_queue=8)) as running:
        yield running


@pytest.fixture(scope="module")
def references(tiny_adapter, second_adapter):
    """Greedy answers of the generation core, each model loaded on its own."""
    messages = [{"role": "user", "content": QUESTION}]
    return {name: ChatModel.load(TINY if path is None else None, path).answer(messages, settings=GREEDY)
            for name, path in ((TINY, None), ("medic", str(tiny_adapter)), ("medic-b", str(second_adapter)))}


def ask(client, model, stream=False, **kwargs):
    """(answer, finish_reason, usage) of one chat completion, streamed or not."""
    request = dict(model=model, messages=[{"role": "user", "content": QUESTION}], **({"temperature": 0} | kwargs))
    if not stream:
        response = client.chat.completions.create(**request)
        return response.choices[0].message.content, response.choices[0].finish_reason, response.usage
    text, finish_reason, usage = "", None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish_reason = chunk.choices[0].finish_reason or finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    return text, finish_reason, usage


def test_greedy_answers_equal_chat_py_streamed_or_not(server, tiny_adapter, served):
    chat_py = run_script("chat.py", "--lora_weights", tiny_adapter, "--prompt", QUESTION, "--temperature", "0",
                         "--repetition_penalty", "3", "--max_new_tokens", MAX_TOKENS).stdout.strip()
    assert chat_py
    client = server.client()
    prompt_tokens = len(served.get("medic").chat.prompt_for([{"role": "user", "content": QUESTION}]).input_ids)
    for stream in (False, True):
        answer, finish_reason, usage = ask(client, "medic", stream=stream)
        assert answer == chat_py
        # the tiny adapter does not stop by itself: the answer ends at max_tokens
        assert finish_reason == "length"
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
            (prompt_tokens, MAX_TOKENS, prompt_tokens + MAX_TOKENS)
    # max_completion_tokens (OpenAI's newer name) and max_tokens both cap the answer
    assert ask(client, "medic", max_completion_tokens=4)[2].completion_tokens == 4
    assert ask(client, "medic", max_tokens=5)[2].completion_tokens == 5


def test_model_picks_the_adapter_or_the_base(server, references):
    client = server.client()
    assert len(set(references.values())) == 3  # three different models
    for name in ("medic", TINY, "medic-b", "medic", TINY):  # switching back and forth
        assert ask(client, name)[0] == references[name], name
    models = {model.id: model for model in client.models.list()}
    assert set(models) == {TINY, "medic", "medic-b"}
    assert models["medic"].model_extra["medlora"]["disclaimer"] == DISCLAIMER
    assert models["medic"].model_extra["parent"] == TINY and models[TINY].model_extra["parent"] is None
    with pytest.raises(openai.NotFoundError) as refused:
        ask(client, "gpt-4o")
    assert refused.value.status_code == 404
    assert "served: builtin:tiny-llama, medic, medic-b" in refused.value.message


def test_stop_strings_end_the_answer(server, references):
    """The stop word is taken from the answer's first half in tokens (the greedy answer cut at MAX_TOKENS // 2, asked
    of the server itself), so it holds under any precision `auto` picks: a word from the middle of the answer by
    count can first be complete only at its last token (seen under bf16 autocast)."""
    client = server.client()
    full = ask(client, "medic")[0]
    assert full == references["medic"]
    half = ask(client, "medic", max_tokens=MAX_TOKENS // 2)[0]
    assert full.startswith(half.rsplit(None, 1)[0] if " " in half else "")
    words = [word for word in half.split()[:-1] if any(c.isalnum() for c in word)]  # the last may be cut
    assert words, f"the first {MAX_TOKENS // 2} tokens hold no whole word: {half!r}"
    stop = words[len(words) // 2]
    expected = full[: full.find(stop)].strip()
    for stream in (False, True):
        answer, finish_reason, usage = ask(client, "medic", stream=stream, stop=[stop, "never-in-the-answer"])
        assert (answer, finish_reason) == (expected, "stop")
        assert usage.completion_tokens <= MAX_TOKENS // 2


def test_seed_makes_sampling_repeatable(server):
    client = server.client()
    sampled = [ask(client, "medic", seed=7, temperature=1.0)[0] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_wrong_or_missing_key_is_refused(server):
    with pytest.raises(openai.AuthenticationError) as refused:
        server.client(api_key="wrong-key").models.list()
    assert refused.value.status_code == 401 and refused.value.body["code"] == "invalid_api_key"
    # no key at all (the openai client insists on one): the same refusal
    for path in ("/v1/models", "/v1/chat/completions"):
        response = httpx.request("GET" if path == "/v1/models" else "POST", server.url + path, timeout=10,
                                 json={"model": "medic", "messages": [{"role": "user", "content": QUESTION}]})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert server.health()["status"] == "ok"  # /health needs no key


def test_malformed_requests_get_openai_errors(server):
    client = server.client()
    bad = [
        (dict(temperature=5), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(messages=[{"role": "assistant", "content": "hi"}]), "messages.0.role"),
        (dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "messages"),
        (dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), "messages.1.role"),
        (dict(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
        (dict(max_tokens=5000), "messages"),  # beyond the model's context
    ]
    for fields, param in bad:
        request = dict(model="medic", messages=[{"role": "user", "content": QUESTION}]) | fields
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**request)
        assert refused.value.status_code == 400
        assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="medic", messages=[{"role": "user", "content": QUESTION}], max_tokens=5000)
    assert refused.value.body["code"] == "context_length_exceeded" and "2048" in refused.value.message
    # fields MedLoRA does not use are ignored, as OpenAI-compatible servers do
    answer = client.chat.completions.create(model="medic", messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, user="clinic-7", extra_body={"top_k_custom": 3})
    assert answer.choices[0].message.content
    raw = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_disconnect_stops_generation(server):
    client = server.client()
    before = server.health()
    stream = client.chat.completions.create(model="medic", messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=1800, stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    stream.close()
    deadline = time.time() + 30
    while (health := server.health())["running"] or health["cancelled"] == before["cancelled"]:
        assert time.time() < deadline, f"the generation went on after the client left: {health}"
        time.sleep(0.1)
    generated = health["generated_tokens"] - before["generated_tokens"]
    assert health["cancelled"] == before["cancelled"] + 1
    assert 3 <= generated < 600, generated  # stopped early, not at max_tokens (1800)
    assert ask(client, "medic")[0]  # and the server goes on answering


def test_abandoned_plain_request_stops_generation(server):
    """A non-streamed request whose client gives up (here: a read timeout) is cancelled too."""
    before = server.health()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=1.5,
                   json={"model": "medic", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1800,
                         "temperature": 0})
    deadline = time.time() + 30
    while (health := server.health())["running"] or health["cancelled"] == before["cancelled"]:
        assert time.time() < deadline, f"the generation went on after the client left: {health}"
        time.sleep(0.1)
    assert health["generated_tokens"] - before["generated_tokens"] < 1800


def test_load_of_50_requests_is_answered_or_refused_at_once(served, references):
    # two answers generated at once (threads on one model), three waiting
    with InProcessServer(create_app(served, SERVER_DEFAULTS, max_concurrency=2, max_queue=3)) as server:
        def one(index):
            client = server.client(api_key="unused", max_retries=0, timeout=120)
            try:
                return ask(client, "medic", stream=index % 2 == 0, max_tokens=8)
            except openai.RateLimitError as refused:
                assert refused.status_code == 429 and refused.response.headers["retry-after"] == "1"
                return "refused"

        started = time.time()
        with ThreadPoolExecutor(50) as pool:
            outcomes = list(pool.map(one, range(50)))
        answers = [outcome for outcome in outcomes if outcome != "refused"]
        expected = ChatModel.load(lora_weights=served.get("medic").path).answer(
            [{"role": "user", "content": QUESTION}], settings=GenerationSettings(
                temperature=0, repetition_penalty=3.0, max_new_tokens=8))
        assert len(answers) >= 5 and outcomes.count("refused") >= 1  # 2 running + 3 queued at least
        assert all(answer[:2] == (expected, "length") for answer in answers)
        assert time.time() - started < 120
        health = server.health()
        assert (health["running"], health["queued"]) == (0, 0)
        assert health["refused"] == outcomes.count("refused") and health["completed"] == len(answers)
        assert ask(server.client(max_retries=0), "medic")[0] == references["medic"]


def test_serve_py_script_with_key_from_the_environment(tiny_adapter, references):
    process, base_url = serve_script("--lora_weights", f"medic={tiny_adapter}", "--repetition_penalty", "3",
                                     "--max_new_tokens", MAX_TOKENS, env={"MEDLORA_API_KEY": KEY})
    try:
        client = openai.OpenAI(base_url=base_url, api_key=KEY)
        assert ask(client, "medic", stream=True)[0] == references["medic"]
        assert ask(client, TINY)[0] == references[TINY]  # the base model by its own name
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="nope").models.list()
    finally:
        output = stop(process)
    assert DISCLAIMER in output and "127.0.0.1" in output


def test_lora_weights_flag_names_adapters(tiny_adapter, second_adapter):
    from medlora.errors import MedLoRAError
    from medlora.inference.serving import parse_adapters

    assert parse_adapters(f"medic={tiny_adapter}, {second_adapter}") == {"medic": str(tiny_adapter),
                                                                          "lora2": str(second_adapter)}
    for spec, message in ((f"a={tiny_adapter},a={second_adapter}", "--lora_weights: the name 'a' is given twice"),
                          ("medic=/no/such/folder", "--lora_weights medic=/no/such/folder: no such folder"),
                          (f"={tiny_adapter}", f"--lora_weights '={tiny_adapter}': write name=path")):
        with pytest.raises(MedLoRAError) as refused:
            parse_adapters(spec)
        assert str(refused.value).startswith(message)


def test_serve_py_streams_the_default_model():
    process, base_url = serve_script()
    try:
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        model = client.models.list().data[0].id
        assert model == "builtin:smollm2-135m-instruct"
        pieces = [chunk.choices[0].delta.content for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is a fever?"}], temperature=0, max_tokens=12,
            stream=True) if chunk.choices and chunk.choices[0].delta.content]
        whole = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is a fever?"}],
                                               temperature=0, max_tokens=12)
        assert len(pieces) > 3 and "".join(pieces) == whole.choices[0].message.content
    finally:
        stop(process)


def test_gate_runs_one_adapter_at_a_time_in_arrival_order():
    """GenerationGate alone (no model): two may run at once, on one adapter; others wait in order; beyond the queue,
    refused."""
    import asyncio

    from medlora.inference.serving import GenerationGate

    async def scenario():
        selected = []
        gate = GenerationGate(selected.append, max_concurrency=2, max_queue=2)
        tickets = [gate.admit(name) for name in ("a", "a", "b", "a")]
        assert gate.admit("a") is None  # 2 running + 2 queued: full
        waits = [asyncio.ensure_future(gate.acquire(ticket)) for ticket in tickets]
        await asyncio.sleep(0)
        assert [ticket.state for ticket in tickets] == ["running", "running", "queued", "queued"]
        gate.close(tickets[0])
        assert tickets[2].state == "queued" and tickets[3].state == "queued"  # b waits for a; a waits behind b
        gate.close(tickets[1])
        assert [tickets[2].state, tickets[3].state] == ["running", "queued"]  # b alone: another adapter
        gate.close(tickets[2])
        await asyncio.gather(*waits)
        assert tickets[3].state == "running" and selected == ["a", "b", "a"]
        gate.close(tickets[3])
        gate.close(tickets[3])  # closing twice changes nothing
        assert (gate.running, gate.queued) == (0, 0) and gate.admit("b") is not None

    asyncio.run(scenario())


def test_knowledge_sources_are_in_the_prompt_and_in_the_response(served):
    """--knowledge_path: the response lists exactly the passages the prompt was built with (what chat.py and the
    page show for the same question), in the plain answer and on the stream's first chunk."""
    from medlora.inference.retrieval import load_knowledge, search_text
    from medlora.paths import DATA_DIR

    knowledge = load_knowledge(str(DATA_DIR / "knowledge" / "diseases.csv"), 2)
    question = "It burns when I pee and I have to go all the time. What could it be?"
    messages = [{"role": "user", "content": question}]
    chat = served.get("medic").chat
    expected = [p.to_dict() for p in chat.prompt_for(messages, None, 8, passages=knowledge.search(
        search_text(messages[-1]))).sources]
    assert len(expected) == 2
    with InProcessServer(create_app(served, SERVER_DEFAULTS, knowledge=knowledge)) as running:
        client = running.client(max_retries=0)
        response = client.chat.completions.create(model="medic", messages=messages, max_tokens=8, temperature=0)
        assert response.model_extra["sources"] == expected
        first = next(iter(client.chat.completions.create(model="medic", messages=messages, max_tokens=8,
                                                          temperature=0, stream=True)))
        assert first.model_extra["sources"] == expected
