"""generate.py's chat page in a real headless browser: Debian's chromium driven by Playwright.

Needs `apt-get install chromium` and `pip install playwright` (never `playwright install`: the
system chromium is used). Without them the test skips, or fails when $CI is set. The screenshot
is kept in test-artifacts/web_ui.png.
"""

import contextlib
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from medlora.inference.generation import ChatModel, GenerationSettings
from tests.conftest import ROOT
from tests.test_generation import http, running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "test-artifacts" / "web_ui.png"
QUESTION = "What can I do at home to relieve a tension headache?"
MAX_INPUT_CHARS = 300
# Greedy and a hard repetition penalty: a deterministic answer of varied words from the tiny adapter.
SERVER_FLAGS = ["--temperature", 0, "--repetition_penalty", 3, "--max_new_tokens", 40,
                "--max_input_chars", MAX_INPUT_CHARS]
SETTINGS = GenerationSettings(temperature=0, repetition_penalty=3.0, max_new_tokens=40)

# Every text the newest assistant message shows, as the page updates it.
RECORD_UPDATES = """() => {
  window.botTexts = [];
  const record = () => {
    const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
    if (!bots.length) return;
    const text = bots[bots.length - 1].innerText;
    if (window.botTexts[window.botTexts.length - 1] !== text) window.botTexts.push(text);
  };
  new MutationObserver(record).observe(document.querySelector('#chatbot'),
                                       {childList: true, subtree: true, characterData: true});
}"""

# Resolves once no ancestor of the element is transparent (Gradio's toasts fade in).
SHOWN_IN_FULL = """element => new Promise(resolve => {
  const opaque = () => { for (let e = element; e; e = e.parentElement)
                           if (getComputedStyle(e).opacity !== '1') return false;
                         return true; };
  const check = () => opaque() ? resolve(true) : requestAnimationFrame(check);
  check();
})"""


def browser_or_skip():
    """Playwright's sync API, or a skip (a failure under CI) saying what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright Python package (pip install playwright)")
        sync_playwright = None
    if not (Path(CHROMIUM).is_file() or shutil.which("chromium")):
        missing.append(f"chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "the web UI test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def words(text: str) -> list:
    """The words of a text, whatever markdown rendering did to the punctuation around them."""
    return re.findall(r"\w+", text)


@pytest.mark.slow
def test_chat_page_streams_an_answer(tiny_adapter):
    sync_playwright = browser_or_skip()
    expected = ChatModel.load(lora_weights=str(tiny_adapter)).answer([{"role": "user", "content": QUESTION}],
                                                                     settings=SETTINGS)
    assert words(expected)
    with running_server("--lora_weights", tiny_adapter, *SERVER_FLAGS) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#question textarea", timeout=60_000)
            assert page.get_by_text("Not medical advice").is_visible()
            page.evaluate(RECORD_UPDATES)

            page.fill("#question textarea", QUESTION)
            page.press("#question textarea", "Enter")
            bot = page.locator('#chatbot [data-testid="bot"]').last
            deadline = time.monotonic() + 120
            while words(bot.inner_text() if bot.count() else "") != words(expected):
                assert time.monotonic() < deadline, f"no full answer on the page: {page.inner_text('#chatbot')!r}"
                page.wait_for_timeout(200)
            assert QUESTION in page.locator('#chatbot [data-testid="user"]').last.inner_text()
            assert page.input_value("#question textarea") == ""
            updates = page.evaluate("window.botTexts")
            # streamed: the answer grew on the page, each text the beginning of the final one
            final = "".join(words(expected))
            assert len(updates) > 1 and all(final.startswith("".join(words(text))) for text in updates)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # a message over --max_input_chars is refused with a message, and kept for editing
            page.fill("#question textarea", "a" * (MAX_INPUT_CHARS + 1))
            page.click("#send")
            page.get_by_text(f"the limit is {MAX_INPUT_CHARS}").wait_for(timeout=30_000)
            assert page.locator('#chatbot [data-testid="user"]').count() == 1
            assert len(page.input_value("#question textarea")) == MAX_INPUT_CHARS + 1

            page.click("#clear")
            page.locator('#chatbot [data-testid="bot"]').wait_for(state="detached", timeout=30_000)
            assert page.locator('#chatbot [data-testid="user"]').count() == 0
        finally:
            browser.close()


# ---- Stop and a full queue, on a page served in this process ------------------------------------------------
# The answer being generated is held inside the real model's forward pass (a hook on its embedding
# layer) until the test lets it go: what the page shows at that moment is fixed, so nothing below
# depends on how fast this machine is.
HELD_AFTER_TOKENS = 12
WAIT_S = 120


class HeldFirstAnswer:
    """Holds the first answer after HELD_AFTER_TOKENS tokens, until `release` is set or that answer's
    own cancel Event is (the Stop button). Also notes, for each answer, the conversation it was asked
    with, its cancel Event, each text it streamed (and whether Stop had been pressed by then) and its
    last text."""

    def __init__(self, chat: ChatModel):
        self.release, self.held, self.stopped = threading.Event(), threading.Event(), threading.Event()
        self.conversations, self.cancels, self.streamed, self.finals = [], [], [], []
        self.forward_calls = 0
        self.hook = chat.model.get_input_embeddings().register_forward_pre_hook(self.before_forward)
        stream = chat.stream

        def observed_stream(messages, system=None, settings=None, cancel=None, passages=None):
            self.conversations.append(messages)
            self.cancels.append(cancel)
            self.streamed.append(streamed := [])
            text = ""
            try:
                for text in stream(messages, system, settings, cancel, passages):
                    streamed.append((text, cancel is not None and cancel.is_set()))
                    yield text
            finally:
                self.finals.append(text)

        chat.stream = observed_stream

    def before_forward(self, module, args):
        if len(self.cancels) != 1:  # only the first answer is held
            return
        self.forward_calls += 1  # one call for the prompt and for each new token: call k makes token k
        if self.forward_calls != HELD_AFTER_TOKENS + 1:
            return
        self.held.set()
        deadline = time.monotonic() + WAIT_S
        while not self.release.wait(0.05) and time.monotonic() < deadline:
            if self.cancels[0] is not None and self.cancels[0].is_set():
                self.stopped.set()
                return

    def wait_for_answers(self, count: int):
        deadline = time.monotonic() + WAIT_S
        while len(self.finals) < count:
            assert time.monotonic() < deadline, f"{len(self.finals)} answers finished, expected {count}"
            time.sleep(0.05)


@contextlib.contextmanager
def served_in_process(chat: ChatModel, max_queue_size: int = 16, knowledge=None):
    from medlora.inference.web_ui import build_demo, launch
    from tests.test_generation import free_port

    demo = build_demo(chat, SETTINGS, max_input_chars=MAX_INPUT_CHARS, concurrency_limit=1, knowledge=knowledge)
    port = free_port()
    launch(demo, server_port=port, max_queue_size=max_queue_size, concurrency_limit=1, block=False)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()


def open_chat_page(browser, url):
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#question textarea", timeout=60_000)
    return page


def ask(page, question):
    page.fill("#question textarea", question)
    page.press("#question textarea", "Enter")


def bot_texts(page) -> list:
    return page.locator('#chatbot [data-testid="bot"]').all_inner_texts()


def wait_for_bot_words(page, index: int, expected: str):
    """Until the page's bot message number `index` shows exactly the words of `expected`."""
    deadline = time.monotonic() + WAIT_S
    while True:
        texts = bot_texts(page)
        if len(texts) > index and words(texts[index]) == words(expected):
            return
        assert time.monotonic() < deadline, f"bot message {index} never became {expected!r}: {texts!r}"
        page.wait_for_timeout(100)


@pytest.fixture()
def chat_model(tiny_adapter):
    return ChatModel.load(lora_weights=str(tiny_adapter))


@pytest.mark.slow
def test_stop_button_ends_the_answer_and_keeps_the_conversation(chat_model):
    sync_playwright = browser_or_skip()
    unstopped = chat_model.answer([{"role": "user", "content": QUESTION}], settings=SETTINGS)
    unstopped_tokens = len(chat_model.tokenizer(unstopped, add_special_tokens=False).input_ids)
    assert unstopped_tokens > HELD_AFTER_TOKENS + 1, "the answer must be long enough to be stopped midway"
    gate = HeldFirstAnswer(chat_model)
    with served_in_process(chat_model) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = open_chat_page(browser, url)
            ask(page, QUESTION)
            assert gate.held.wait(WAIT_S), "the answer never reached the held token"
            page.wait_for_function("() => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
                                   " return b.length && b[b.length - 1].innerText.trim().length > 0; }",
                                   timeout=WAIT_S * 1000)

            page.click("#stop")
            assert gate.stopped.wait(WAIT_S), "Stop did not set the cancel of the answer being generated"
            gate.wait_for_answers(1)
            # generation ended at the first step after Stop, not at the end of the answer
            assert gate.forward_calls == HELD_AFTER_TOKENS + 1
            assert unstopped.startswith(gate.finals[0]) and len(gate.finals[0]) < len(unstopped)

            # the session goes on: the next question is answered in full, with the stopped exchange kept
            follow_up = "Is it safe to take ibuprofen for it?"
            ask(page, follow_up)
            gate.wait_for_answers(2)
            wait_for_bot_words(page, 1, gate.finals[1])
            assert not gate.cancels[1].is_set()
            assert gate.finals[1] == chat_model.answer(gate.conversations[1], settings=SETTINGS)
            question, stopped_answer, asked = gate.conversations[1]
            assert question == {"role": "user", "content": QUESTION} and asked["content"] == follow_up
            # the page kept the answer as it stood at Stop: streamed before Stop, nothing added after
            stopped_answer = stopped_answer["content"]
            assert (stopped_answer, False) in gate.streamed[0]
            assert all(text != stopped_answer for text, after_stop in gate.streamed[0] if after_stop)
            assert words(bot_texts(page)[0]) == words(stopped_answer)
        finally:
            browser.close()
            gate.hook.remove()


@pytest.mark.slow
def test_a_full_queue_tells_the_user_the_app_is_busy(chat_model):
    """One answer at a time and one waiting: a third user is told the app is busy, and can ask again
    once the queue has room."""
    sync_playwright = browser_or_skip()
    gate = HeldFirstAnswer(chat_model)
    with served_in_process(chat_model, max_queue_size=1) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            first, second, third = (open_chat_page(browser, url) for _ in range(3))
            ask(first, QUESTION)
            assert gate.held.wait(WAIT_S), "the first answer never started"
            ask(second, QUESTION)
            # The question is shown once its first event (add_question) is done; then its answer joins the queue.
            # Waiting for both keeps a busy machine from counting the short first event as the waiting answer.
            second.locator('#chatbot [data-testid="user"]').first.wait_for(timeout=WAIT_S * 1000)
            deadline = time.monotonic() + WAIT_S
            while json.loads(http(url + "/gradio_api/queue/status")[1])["queue_size"] < 1:
                assert time.monotonic() < deadline, "the second question never joined the queue"
                time.sleep(0.05)

            ask(third, QUESTION)
            busy = third.get_by_text("This application is currently busy").first
            busy.wait_for(timeout=WAIT_S * 1000)
            busy.evaluate(SHOWN_IN_FULL)  # the toast has faded in: the user can read it
            assert third.locator('#chatbot [data-testid="user"]').count() == 0
            assert third.input_value("#question textarea") == QUESTION  # kept, to send again
            third.screenshot(path=str(SCREENSHOT.with_name("web_ui_busy.png")), animations="disabled")

            gate.release.set()
            gate.wait_for_answers(2)
            wait_for_bot_words(first, 0, gate.finals[0])
            wait_for_bot_words(second, 0, gate.finals[1])
            assert gate.finals[0] == gate.finals[1]  # greedy: the same question, the same answer

            third.press("#question textarea", "Enter")  # the queue has room again
            gate.wait_for_answers(3)
            wait_for_bot_words(third, 0, gate.finals[2])
        finally:
            browser.close()
            gate.hook.remove()


def test_sources_are_shown_under_each_answer_and_kept_out_of_the_conversation(chat_model):
    from medlora.data.knowledge import source_lines
    from medlora.inference.retrieval import KnowledgeBase
    from medlora.inference.web_ui import excerpt

    sync_playwright = browser_or_skip()
    knowledge = KnowledgeBase.load(ROOT / "data" / "knowledge" / "diseases.csv")
    question, follow_up = "It burns when I pee and I need to go all the time.", "Is it serious?"
    asked = [{"role": "user", "content": question}]
    passages = chat_model.prompt_for(asked, max_new_tokens=SETTINGS.max_new_tokens,
                                     passages=knowledge.search(question)).sources
    expected = chat_model.answer(asked, settings=SETTINGS, passages=passages)
    conversations = []  # what the model is asked with, answer by answer
    stream = chat_model.stream

    def observed_stream(messages, *args, **kwargs):
        conversations.append(messages)
        yield from stream(messages, *args, **kwargs)

    chat_model.stream = observed_stream
    with served_in_process(chat_model, knowledge=knowledge) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = open_chat_page(browser, url)
            ask(page, question)
            sources = page.get_by_text(f"Sources ({len(passages)})")
            sources.wait_for(timeout=WAIT_S * 1000)
            deadline = time.monotonic() + WAIT_S
            while not "".join(words(expected)) in "".join(words(page.inner_text("#chatbot"))):
                assert time.monotonic() < deadline, f"no full answer: {page.inner_text('#chatbot')!r}"
                page.wait_for_timeout(200)
            first_line = source_lines(passages)[0]
            assert first_line not in page.inner_text("#chatbot")  # collapsed until clicked
            sources.click()
            page.wait_for_function(f"() => document.querySelector('#chatbot').innerText.includes({json.dumps(first_line)})",
                                   timeout=30_000)
            shown = page.inner_text("#chatbot")
            assert all(line in shown for line in source_lines(passages))
            # each source's text begins under its name
            assert all(" ".join(words(excerpt(p.text))) in " ".join(words(shown)) for p in passages)
            assert all(len(excerpt(p.text)) <= 242 and excerpt(p.text).endswith(" …") for p in passages)
            assert "urinary tract infection" in source_lines(passages)[0] + source_lines(passages)[1]
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT.with_name("web_ui_sources.png")), full_page=True)

            ask(page, follow_up)  # the sources note is not part of the conversation the model sees
            deadline = time.monotonic() + WAIT_S
            while len(conversations) < 2:
                assert time.monotonic() < deadline, "the follow-up was never answered"
                page.wait_for_timeout(100)
            assert conversations[1] == asked + [{"role": "assistant", "content": expected},
                                                {"role": "user", "content": follow_up}]
        finally:
            browser.close()
