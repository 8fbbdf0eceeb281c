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
from medlora.inference.generation import DISCLAIMER, GenerationSettings

UI_TEMPERATURE = 0.7


def main(
    # model
    base_model: str = "",  # hub id, local folder or builtin:NAME; default: the adapter's base, else builtin:smollm2-135m-instruct
    lora_weights: str = "",  # adapter folder (or hub id); empty: the base (or merged) model alone
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    prompt_template_name: str = "",  # a name in templates/; default: the adapter's template, else alpaca
    device: str = "",  # cuda, cuda:1, mps or cpu; default: the first available of these
    precision: str = "auto",  # auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16
    trust_remote_code: bool = False,
    # generation defaults (the page's sliders start here)
    temperature: float | None = None,  # 0: greedy; default 0.7 on the page, 0 (greedy) in batch mode
    top_p: float = 0.9,
    top_k: int = 40,
    num_beams: int = 1,  # > 1: beam search
    max_new_tokens: int = 256,
    repetition_penalty: float = 1.1,
    # web page
    server_name: str = "127.0.0.1",  # 0.0.0.0 exposes the page to your network: set --auth then
    server_port: int = 7860,  # the port the page listens on
    share: bool = False,  # a public *.gradio.live link; anyone with it can use your model
    auth: str = "",  # "user:password", or a file of user:password lines
    max_input_chars: int = 4000,  # longer messages are refused with a message
    concurrency_limit: int = 1,  # answers generated at once
    max_queue_size: int = 16,  # requests waiting beyond that; more are told the app is busy
    # batch mode
    data_file: str = "",  # answer every record of this file instead of starting the page
    predictions_file: str = "",  # JSON Lines output of batch mode
    # knowledge
    knowledge_path: str = "",  # a .csv/.jsonl/.json/.txt/.md file or a folder of them to answer from (docs/retrieval.md)
    knowledge_top_k: int = 3,  # passages put into the prompt for each question
):
    """Serve a chat page for BASE_MODEL + LORA_WEIGHTS, or answer DATA_FILE into PREDICTIONS_FILE."""
    batch = bool(data_file or predictions_file)
    if temperature is None:
        temperature = 0.0 if batch else UI_TEMPERATURE
    settings = GenerationSettings(temperature, top_p, top_k, num_beams, max_new_tokens, repetition_penalty).validate()

    # ---- check every input before the model loads ---------------------------------------------------------
    if batch:
        from medlora.inference.predictions import read_prediction_records

        if not (data_file and predictions_file):
            raise MedLoRAError("batch mode needs both --data_file and --predictions_file")
        records = read_prediction_records(data_file)
    else:
        from medlora.inference.web_ui import parse_auth

        credentials = parse_auth(auth)
        for name, value in dict(max_input_chars=max_input_chars, concurrency_limit=concurrency_limit,
                                max_queue_size=max_queue_size).items():
            if not isinstance(value, int) or value < 1:
                raise MedLoRAError(f"--{name} {value!r}: must be a whole number >= 1")
        if not (isinstance(server_port, int) and 0 < server_port < 65536):
            raise MedLoRAError(f"--server_port {server_port!r}: must be a port number (1-65535)")

    from medlora.inference.retrieval import load_knowledge

    knowledge = load_knowledge(knowledge_path, knowledge_top_k)  # None without --knowledge_path

    # ---- model ----------------------------------------------------------------------------------------------
    from medlora.inference.generation import ChatModel

    chat = ChatModel.load(base_model, lora_weights, load_in_8bit, load_in_4bit, prompt_template_name, device, precision,
                          trust_remote_code)
    print(f"model: {chat.describe()}", file=sys.stderr, flush=True)
    if knowledge:
        print(f"knowledge: {knowledge.describe()}", file=sys.stderr, flush=True)

    # ---- batch mode -----------------------------------------------------------------------------------------
    if batch:
        from medlora.inference.predictions import write_predictions

        summary = write_predictions(chat, records, predictions_file, settings, knowledge)
        print(f"wrote {summary['records']} predictions to {predictions_file} in {summary['seconds']:.1f}s "
              f"({settings.mode}, max_new_tokens {settings.max_new_tokens}); "
              f"{summary['trimmed']} prompts had their oldest turns dropped to fit the context", file=sys.stderr)
        return None

    # ---- web page -------------------------------------------------------------------------------------------
    from medlora.inference.web_ui import build_demo, launch

    if server_name not in ("127.0.0.1", "localhost") and not credentials:
        print(f"warning: --server_name {server_name} without --auth: anyone on your network can use the model",
              file=sys.stderr)
    if share and not credentials:
        print("warning: --share without --auth: anyone with the link can use the model", file=sys.stderr)
    print(DISCLAIMER, file=sys.stderr, flush=True)
    started = time.time()
    demo = build_demo(chat, settings, max_input_chars, concurrency_limit, knowledge=knowledge)
    launch(demo, server_name, server_port, share, credentials, max_queue_size, concurrency_limit)
    print(f"server stopped after {time.time() - started:.0f}s", file=sys.stderr)
    return None


if __name__ == "__main__":
    cli.run(main)
