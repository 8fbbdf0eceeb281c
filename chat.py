"""Chat with a tuned model in the terminal, answers streamed as they are generated.

    python chat.py --lora_weights ./lora-medlora
    python chat.py --lora_weights ./lora-medlora --prompt "What can I do about a tension headache?"   # one answer
    python chat.py --lora_weights ./lora-medlora --prompt "..." --compare --temperature 0   # base vs tuned answer
    python chat.py --knowledge_path data/knowledge/diseases.csv    # answers grounded in a disease table, sources listed
    python chat.py --base_model meta-llama/Llama-3.1-8B --lora_weights ./lora-chatdoctor --load_in_4bit
    python chat.py --help                                          # every flag

Commands: /reset clears the conversation, /system <text> sets the system prompt (/system alone
restores the template's), /exit or Ctrl-D quits. Ctrl-C stops an answer and keeps the session;
Ctrl-C at the prompt quits. The oldest turns are dropped when the conversation outgrows the
model's context. Model flags are generate.py's. With --knowledge_path every question is first
searched in the knowledge base (docs/retrieval.md); the best passages go into the prompt and a
`sources:` list follows the answer. Answers are not medical advice.
"""

import contextlib
import sys

from medlora import cli
from medlora.errors import MedLoRAError
from medlora.flag_groups import DEVICE, GENERATION, KNOWLEDGE, MODEL
from medlora.flags import FlagGroup, stage_flags
from medlora.inference.generation import DISCLAIMER, GenerationSettings

USER_PROMPT = "You: "
ASSISTANT_PREFIX = "Assistant: "
HELP = "commands: /reset, /system <text>, /exit (or Ctrl-D); Ctrl-C stops an answer"


@stage_flags(
    MODEL,
    DEVICE,
    GENERATION,
    FlagGroup("one question", prompt="", compare=False),
    KNOWLEDGE,
)
def main(flags):
    """Chat with BASE_MODEL + LORA_WEIGHTS in the terminal (or answer --prompt once).

    Args:
        prompt: Answer this one question, print the answer and exit.
        compare: With --prompt: answer with the base model (adapter disabled), then with the adapter.
    """
    settings = GenerationSettings.from_flags(flags)
    system = None if flags.system is None else str(flags.system)
    from medlora.inference.generation import ChatModel
    from medlora.inference.retrieval import load_knowledge

    knowledge = load_knowledge(flags.knowledge_path, flags.knowledge_top_k)  # None without --knowledge_path

    # In one-shot mode stdout carries only the answer; everything else goes to stderr.
    print(DISCLAIMER, file=sys.stderr if flags.prompt else sys.stdout, flush=True)
    chat = ChatModel.load(flags.base_model, flags.lora_weights, flags.load_in_8bit, flags.load_in_4bit,
                          flags.prompt_template_name, flags.device, flags.precision, flags.trust_remote_code)
    print(f"model: {chat.describe()}", file=sys.stderr, flush=True)
    if knowledge:
        print(f"knowledge: {knowledge.describe()}", file=sys.stderr, flush=True)

    question = [{"role": "user", "content": str(flags.prompt)}]
    if flags.compare:
        if not (flags.prompt and flags.lora_weights):
            raise MedLoRAError("--compare needs --prompt and --lora_weights (the base answers with the adapter disabled)")
        print(f"question: {flags.prompt}\n", flush=True)
        for label, disabled in (("base model (adapter disabled)", True), ("tuned model", False)):
            print(f"--- {label} ---", flush=True)
            with chat.model.disable_adapter() if disabled else contextlib.nullcontext():
                stream_answer(chat, question, system, settings, "", knowledge)
            print(flush=True)
    elif flags.prompt:
        answer, _ = stream_answer(chat, question, system, settings, "", knowledge)
        if not answer:
            print("(the model gave an empty answer)", file=sys.stderr)
    else:
        chat_loop(chat, system, settings, knowledge)


def chat_loop(chat, system, settings, knowledge) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(HELP, flush=True)
    messages = []
    while True:
        try:
            line = input(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = []
            print("(conversation cleared)", flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            print(f"(system prompt: {chat.template.system if system is None else system!r})", flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})", flush=True)
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer, dropped = stream_answer(chat, messages, system, settings, ASSISTANT_PREFIX, knowledge)
        except MedLoRAError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            messages.pop()
            continue
        if answer:
            messages.append({"role": "assistant", "content": answer})
            messages = messages[2 * dropped:]  # what no longer fits stays out
        else:
            messages.pop()  # stopped before any text: forget the question too


def stream_answer(chat, messages, system, settings, prefix, knowledge) -> tuple:
    """Print the answer as it grows (and its sources, with --knowledge_path); Ctrl-C stops it.
    Returns (answer so far, exchanges dropped)."""
    passages = knowledge.search(messages[-1]["content"]) if knowledge else None
    prepared = chat.prompt_for(messages, system, settings.max_new_tokens, passages=passages)
    if prepared.dropped_exchanges:
        print(f"(the {prepared.dropped_exchanges} oldest exchanges no longer fit the context and are left out)",
              file=sys.stderr, flush=True)
    print(prefix, end="", flush=True)
    shown = ""
    try:
        for text in chat.stream_prompt(prepared.input_ids, settings):
            print(text[len(shown):], end="", flush=True)
            shown = text
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(flush=True)
    if passages is not None:
        from medlora.data.knowledge import source_lines

        lines = source_lines(prepared.sources) or ["(no passage of the knowledge base matched the question)"]
        print("sources:\n" + "\n".join(f"  {line}" for line in lines), flush=True)
    return shown, prepared.dropped_exchanges


if __name__ == "__main__":
    cli.run(main)
