"""generate.py's Gradio chat page: streaming multi-turn chat on one ChatModel, with a system prompt,
sampling sliders, example questions, Stop and Clear buttons and a not-medical-advice notice. With a
knowledge base, each answer is followed by a collapsed "Sources" message (a Chatbot message with a
metadata title), which is never sent back to the model as part of the conversation.

Generation runs in Gradio's queue: at most `concurrency_limit` answers at once (one model, one
queue), at most `max_queue_size` waiting; beyond that Gradio tells the user the app is busy.
The page makes no request outside the server (no web fonts, no analytics).
"""

import os
import threading
from pathlib import Path

from medlora.errors import MedLoRAError
from medlora.inference.generation import DISCLAIMER, ChatModel, GenerationSettings
from medlora.paths import DATA_DIR

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a medical demo should not phone home

SAMPLE_QUESTIONS_FILE = DATA_DIR / "sample_questions.json"
FALLBACK_QUESTIONS = [
    "I've had a sore throat and a mild fever for two days. What should I do?",
    "What are the early signs of type 2 diabetes?",
    "How can I lower my blood pressure without medication?",
    "When should I see a doctor about a headache?",
]
SOURCE_EXCERPT_CHARS = 240  # of each source's text in the page's Sources note
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


def parse_auth(auth: str) -> list | None:
    """--auth "user:password", or the path of a file with one user:password per line (# comments)."""
    if not auth:
        return None
    path = Path(auth).expanduser()
    if path.is_file():
        lines = [(f"{path}: line {n}", line.strip()) for n, line in
                 enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)]
        lines = [(where, line) for where, line in lines if line and not line.startswith("#")]
        if not lines:
            raise MedLoRAError(f"--auth {auth}: the file has no user:password line")
    else:
        lines = [("--auth", auth)]
    credentials = []
    for where, line in lines:
        user, colon, password = line.partition(":")
        if not colon or not user.strip() or not password:
            raise MedLoRAError(f"{where}: expected user:password (or the path of a file of such lines)")
        credentials.append((user.strip(), password))
    return credentials


def sample_questions() -> list:
    import json

    if SAMPLE_QUESTIONS_FILE.is_file():
        questions = json.loads(SAMPLE_QUESTIONS_FILE.read_text(encoding="utf-8"))
        if isinstance(questions, list) and all(isinstance(q, str) for q in questions) and questions:
            return questions
    return FALLBACK_QUESTIONS


def history_to_messages(history: list) -> list:
    """Chatbot messages (content as text or as a list of parts) to alternating user/assistant turns
    ending with the newest question. A question left unanswered (an error) and an exchange whose
    answer was stopped before any text are left out."""
    def text_of(content):
        if isinstance(content, str):
            return content
        if isinstance(content, dict):
            return content.get("text", "") or ""
        if isinstance(content, (list, tuple)):
            return "".join(text_of(part) for part in content)
        return ""

    messages, pending = [], None
    for message in history:
        if (message.get("metadata") or {}).get("title"):  # a "Sources" note, not part of the conversation
            continue
        content = text_of(message.get("content"))
        if message.get("role") == "user":
            pending = content
        elif message.get("role") == "assistant" and pending is not None:
            if content.strip():
                messages += [{"role": "user", "content": pending}, {"role": "assistant", "content": content}]
            pending = None
    if pending is not None:
        messages.append({"role": "user", "content": pending})
    return messages


def sources_message(passages: list) -> dict:
    """The collapsed "Sources" note shown under an answer (the same list chat.py prints)."""
    from medlora.data.knowledge import source_lines

    if not passages:
        content = "No passage of the knowledge base matched the question."
    else:  # each source's name, then the start of its text, so that the answer can be checked against it
        content = "\n\n".join(f"**{escape_markdown(line)}**  \n{escape_markdown(excerpt(p.text))}"
                                for line, p in zip(source_lines(passages), passages))
    return {"role": "assistant", "content": content,
            "metadata": {"title": f"Sources ({len(passages)})", "status": "done"}}


def excerpt(text: str, chars: int = SOURCE_EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0] + " …"


def escape_markdown(text: str) -> str:
    import re

    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)


def build_demo(chat: ChatModel, defaults: GenerationSettings, max_input_chars: int = 4000,
               concurrency_limit: int = 1, title: str = "MedLoRA medical chat", knowledge=None):
    """knowledge: a retrieval.KnowledgeBase to ground every answer in (its sources shown under it)."""
    import gradio as gr

    answering = {}  # session hash -> the cancel Event of the answer being generated for it

    def check_question(text, history):
        """Shown under the message box, before anything is queued."""
        length = len((text or "").strip())
        problem = ("Type a question first." if not length else
                   f"Your message is {length:,} characters long; the limit is {max_input_chars:,}. Please shorten it."
                   if length > max_input_chars else "")
        return gr.validate(not problem, problem), gr.validate(True, "")

    def add_question(text, history):
        return "", (history or []) + [{"role": "user", "content": text.strip()}]

    def respond(history, system, temperature, top_p, top_k, num_beams, max_new_tokens, repetition_penalty,
                request: gr.Request):
        settings = GenerationSettings(temperature, top_p, int(top_k), int(num_beams), int(max_new_tokens),
                                      repetition_penalty)
        messages = history_to_messages(history)
        if not messages:
            return
        cancel = threading.Event()
        answering[request.session_hash] = cancel
        history = list(history) + [{"role": "assistant", "content": ""}]
        try:
            passages, answer_at = None, len(history) - 1
            if knowledge:  # the passages that fit the prompt, shown under the answer from the start
                passages = chat.prompt_for(messages, system, settings.validate().max_new_tokens,
                                           passages=knowledge.search(messages[-1]["content"])).sources
                history.append(sources_message(passages))
            for text in chat.stream(messages, system, settings, cancel, passages=passages):
                if cancel.is_set():  # Stop: the answer stays as the user last saw it
                    break
                history[answer_at] = {"role": "assistant", "content": text}
                yield history
        except MedLoRAError as error:
            raise gr.Error(str(error), title="Cannot answer") from None
        finally:
            if answering.get(request.session_hash) is cancel:
                del answering[request.session_hash]

    def stop_answer(request: gr.Request):
        cancel = answering.get(request.session_hash)
        if cancel is not None:
            cancel.set()

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n`{chat.describe()}`")
        gr.Markdown(f"⚠️ **{DISCLAIMER}**", elem_id="disclaimer")
        chatbot = gr.Chatbot(label="Conversation", height=440, elem_id="chatbot", buttons=["copy"],
                             feedback_options=None, placeholder="Ask a medical question below.")
        with gr.Row():
            question = gr.Textbox(label="Your message", show_label=False, scale=8, lines=1, max_lines=8,
                                  elem_id="question",
                                  placeholder=f"Describe symptoms or ask a question (at most {max_input_chars:,} "
                                              "characters); Enter sends, Shift+Enter adds a line")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
            clear = gr.Button("Clear", elem_id="clear")
        gr.Examples(examples=[[q] for q in sample_questions()], inputs=question, label="Example questions")
        with gr.Accordion("Generation settings", open=False):
            system = gr.Textbox(value=chat.template.system, label="System prompt", lines=2,
                                info=f"Template '{chat.template.name}'; empty for none.")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature",
                                        info="0 = greedy (deterministic); higher = more varied")
                top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p",
                                  info="Used when temperature > 0")
                top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k",
                                  info="Used when temperature > 0; 0 = off")
            with gr.Row():
                num_beams = gr.Slider(1, 8, value=defaults.num_beams, step=1, label="Beams",
                                      info="> 1 = beam search (beam sampling if temperature > 0); "
                                           "the answer appears at once")
                max_new_tokens = gr.Slider(1, max(chat.max_context // 2, defaults.max_new_tokens),
                                           value=defaults.max_new_tokens, step=1, label="Max new tokens")
                repetition_penalty = gr.Slider(min(1.0, defaults.repetition_penalty), 3.0, step=0.05,
                                               value=defaults.repetition_penalty,
                                               label="Repetition penalty", info="1 = off")

        knobs = [system, temperature, top_p, top_k, num_beams, max_new_tokens, repetition_penalty]
        answers = []
        for trigger in (question.submit, send.click):
            asked = trigger(add_question, [question, chatbot], [question, chatbot], validator=check_question,
                            show_progress="hidden")  # queued: Gradio runs validators when an event joins the queue
            answers.append(asked.success(respond, [chatbot, *knobs], chatbot, concurrency_limit=concurrency_limit,
                                         concurrency_id="model", show_progress="minimal"))
        stop.click(stop_answer, None, None, cancels=answers, queue=False)
        clear.click(stop_answer, None, None, cancels=answers, queue=False).then(
            lambda: ([], ""), None, [chatbot, question], queue=False)
    return demo


def launch(demo, server_name: str = "127.0.0.1", server_port: int = 7860, share: bool = False,
           auth: list | None = None, max_queue_size: int = 16, concurrency_limit: int = 1, block: bool = True):
    """Serve the page; block=False returns once it is up (a notebook, a test), demo.close() ends it."""
    import gradio as gr

    theme = gr.themes.Soft(font=SYSTEM_FONTS, font_mono=MONO_FONTS)  # local fonts: no request to Google Fonts
    demo.queue(max_size=max_queue_size, default_concurrency_limit=concurrency_limit)
    try:
        demo.launch(server_name=server_name, server_port=server_port, share=share, auth=auth,
                    auth_message=f"MedLoRA medical chat. {DISCLAIMER}", show_error=True, theme=theme,
                    footer_links=[], ssr_mode=False,
                    prevent_thread_lock=not block)
    except OSError as error:  # the port is taken, or the address is not this machine's
        raise MedLoRAError(f"cannot serve on {server_name}:{server_port}: {error}") from None
