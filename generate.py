"""Talk to a tuned model in the browser, or answer a whole file of questions (batch mode).

    python generate.py --lora_weights ./lora-medlora             # chat page on http://127.0.0.1:7860
    python generate.py --base_model meta-llama/Llama-3.1-8B --lora_weights ./lora-chatdoctor --load_in_4bit
    python generate.py --lora_weights ./lora-medlora --auth "doctor:s3cret" --server_name 0.0.0.0
    python generate.py --lora_weights ./lora-medlora --data_file questions.jsonl --predictions_file answers.jsonl
    python generate.py --knowledge_path data/knowledge/diseases.csv   # answers grounded in a disease table
    python generate.py --help                                     # every flag

The base model defaults to the one the adapter was trained on, and the prompt template to the one
it was trained with (medlora_run.json beside the adapter). The page binds 127.0.0.1 and is not
shared unless asked. With --knowledge_path each question is first searched in the knowledge base
(docs/retrieval.md): the page shows a collapsible "Sources" list under each answer, and batch mode
writes a `sources` list into each prediction. Answers are not medical advice. Flags keep
alpaca-lora's names.
"""

import sys
import time

from medlora import cli
from medlora.errors import MedLoRAError
from medlora.flag_groups import DEVICE, GENERATION, KNOWLEDGE, MODEL
from medlora.flags import FlagGroup, stage_flags
from medlora.inference.generation import DISCLAIMER, GenerationSettings

UI_TEMPERATURE = 0.7


@stage_flags(
    MODEL,
    DEVICE,
    GENERATION.but(temperature=None).without("system"),
    FlagGroup("web page", server_name="127.0.0.1", server_port=7860, share=False, auth="", max_input_chars=4000,
              concurrency_limit=1, max_queue_size=16),
    FlagGroup("batch mode", data_file="", predictions_file=""),
    KNOWLEDGE,
)
def main(flags):
    """Serve a chat page for BASE_MODEL + LORA_WEIGHTS, or answer DATA_FILE into PREDICTIONS_FILE.

    Args:
        temperature: Sampling temperature, 0 for greedy; default 0.7 on the page (its slider starts there), 0 (greedy) in batch mode.
        server_name: Address the page binds; 127.0.0.1 keeps it on this machine, 0.0.0.0 exposes it to your network: set --auth then.
        server_port: The port the page listens on.
        share: A public *.gradio.live link; anyone with it can use your model.
        auth: "user:password", or a file of user:password lines.
        max_input_chars: Longer messages are refused with a message.
        concurrency_limit: Answers generated at once.
        max_queue_size: Requests waiting beyond that; more are told the app is busy.
        data_file: Answer every record of this file (questions or chat records) instead of starting the page.
        predictions_file: JSON Lines output of batch mode.
    """
    batch = bool(flags.data_file or flags.predictions_file)
    temperature = flags.temperature
    if temperature is None:
        temperature = 0.0 if batch else UI_TEMPERATURE
    settings = GenerationSettings.from_flags(flags, temperature=temperature)

    # ---- check every input before the model loads ---------------------------------------------------------
    if batch:
        from medlora.inference.predictions import read_prediction_records

        if not (flags.data_file and flags.predictions_file):
            raise MedLoRAError("batch mode needs both --data_file and --predictions_file")
        records = read_prediction_records(flags.data_file)
    else:
        from medlora.inference.web_ui import parse_auth

        credentials = parse_auth(flags.auth)
        for name in ("max_input_chars", "concurrency_limit", "max_queue_size"):
            value = getattr(flags, name)
            if not isinstance(value, int) or value < 1:
                raise MedLoRAError(f"--{name} {value!r}: must be a whole number >= 1")
        if not (isinstance(flags.server_port, int) and 0 < flags.server_port < 65536):
            raise MedLoRAError(f"--server_port {flags.server_port!r}: must be a port number (1-65535)")

    from medlora.inference.retrieval import load_knowledge

    knowledge = load_knowledge(flags.knowledge_path, flags.knowledge_top_k)  # None without --knowledge_path

    # ---- model ----------------------------------------------------------------------------------------------
    from medlora.inference.generation import ChatModel

    chat = ChatModel.load(flags.base_model, flags.lora_weights, flags.load_in_8bit, flags.load_in_4bit,
                          flags.prompt_template_name, flags.device, flags.precision, flags.trust_remote_code)
    print(f"model: {chat.describe()}", file=sys.stderr, flush=True)
    if knowledge:
        print(f"knowledge: {knowledge.describe()}", file=sys.stderr, flush=True)

    # ---- batch mode -----------------------------------------------------------------------------------------
    if batch:
        from medlora.inference.predictions import write_predictions

        summary = write_predictions(chat, records, flags.predictions_file, settings, knowledge)
        print(f"wrote {summary['records']} predictions to {flags.predictions_file} in {summary['seconds']:.1f}s "
              f"({settings.mode}, max_new_tokens {settings.max_new_tokens}); "
              f"{summary['trimmed']} prompts had their oldest turns dropped to fit the context", file=sys.stderr)
        return

    # ---- web page -------------------------------------------------------------------------------------------
    from medlora.inference.web_ui import build_demo, launch

    if flags.server_name not in ("127.0.0.1", "localhost") and not credentials:
        print(f"warning: --server_name {flags.server_name} without --auth: anyone on your network can use the model",
              file=sys.stderr)
    if flags.share and not credentials:
        print("warning: --share without --auth: anyone with the link can use the model", file=sys.stderr)
    print(DISCLAIMER, file=sys.stderr, flush=True)
    started = time.time()
    demo = build_demo(chat, settings, flags.max_input_chars, flags.concurrency_limit, knowledge=knowledge)
    launch(demo, flags.server_name, flags.server_port, flags.share, credentials, flags.max_queue_size,
           flags.concurrency_limit)
    print(f"server stopped after {time.time() - started:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
