"""Merge a LoRA adapter into its base model and write one GGUF file, for llama.cpp, Ollama and LM Studio,
with an Ollama Modelfile beside it.

    python export_gguf.py --lora_weights ./lora-medlora --outtype q8_0 --output_dir ./gguf
    python export_gguf.py --lora_weights ./lora-medlora --outtype f16 --output_dir ./gguf-f16 --force
    python export_gguf.py --help                           # every flag
    cd gguf && ollama create medlora -f Modelfile && ollama run medlora

LLaMA-architecture models (LLaMA 1-3, Mistral, SmolLM2, TinyLlama) and Qwen2. The file is written with
llama.cpp's own `gguf` package: tensors named and laid out as llama.cpp's converter writes them, the
tokenizer (SentencePiece or byte-level BPE), and as chat template the prompt template the adapter was
trained with (its medlora_run.json). Before anything is declared done, the merge is checked as in
export_hf_checkpoint.py, then the written file is read back with transformers' GGUF loader: its tokenizer
must split sample texts exactly as the model's, and its logits must match base + adapter within the
tolerance for --outtype. The folder then holds model-<outtype>.gguf, Modelfile and medlora_export.json.
See docs/export.md.
"""

import gc

from medlora import cli
from medlora.flag_groups import EXPORT
from medlora.flags import FlagGroup, stage_flags

CHECK_TEXTS = ["What are the early signs of type 2 diabetes?", "头痛和发烧应该怎么办？",
               "  Dose: 2 x 500 mg\tevery 8h (max. 4 g/day)!\n\nNext line"]


@stage_flags(
    EXPORT.but(output_dir="./gguf").without("dtype", "trust_remote_code"),
    FlagGroup("gguf", outtype="f16", prompt_template_name=""),
)
def main(flags):
    """Merge LORA_WEIGHTS into BASE_MODEL and write a GGUF file and an Ollama Modelfile to OUTPUT_DIR.

    Args:
        lora_weights: The adapter folder finetune.py wrote.
        output_dir: Folder that gets model-<outtype>.gguf, Modelfile and medlora_export.json; refused when not empty unless --force.
        outtype: Tensor type of the 2-D weights: f32 (exact), f16, bf16 or q8_0 (8-bit blocks, about half of f16); norms and biases stay f32.
        prompt_template_name: The template written as the GGUF chat template and the Modelfile TEMPLATE; empty: the one the adapter was trained with.
    """
    import torch
    from transformers import AutoConfig

    from medlora.data.templates import PromptTemplate
    from medlora.errors import MedLoRAError
    from medlora.export.chat_formats import (
        chat_fields,
        jinja_chat_template,
        modelfile_text,
    )
    from medlora.export.gguf import (
        OUTTYPES,
        check_architecture,
        check_tokenization,
        load_gguf,
        write_gguf,
    )
    from medlora.export.merge import (
        CHECK_PROMPT,
        check_logits,
        export_inputs,
        find_tokenizer_model,
        merge_adapter,
        staged_output,
        write_export_note,
    )
    from medlora.models.builtin import default_template_for

    if flags.outtype not in OUTTYPES:
        raise MedLoRAError(f"--outtype: unknown value {flags.outtype!r}; use {', '.join(OUTTYPES)}")
    inputs, target = export_inputs(flags)
    base_config = AutoConfig.from_pretrained(inputs.model_path)
    check_architecture(base_config)
    template_name = (flags.prompt_template_name or inputs.run_settings.get("prompt_template_name")
                     or default_template_for(inputs.base_model))
    template = PromptTemplate.load(template_name)

    merged = merge_adapter(inputs, torch.float32, flags.device)  # float32: --outtype rounds once, from exact weights
    fields = chat_fields(template, merged.tokenizer)
    chat_template = merged.tokenizer.chat_template if template.uses_tokenizer_chat_template else jinja_chat_template(fields)
    gguf_name = f"model-{flags.outtype}.gguf"
    with staged_output(target) as staging:
        print(f"writing {target / gguf_name} ({flags.outtype})", flush=True)
        summary = write_gguf(staging / gguf_name, merged.model, merged.tokenizer, find_tokenizer_model(inputs),
                             OUTTYPES[flags.outtype], f"MedLoRA {inputs.lora_weights.name} on {inputs.base_model}",
                             chat_template)
        (staging / "Modelfile").write_text(modelfile_text(gguf_name, fields, template.stop, template_name),
                                           encoding="utf-8")
        merged.model = None  # free it before the file is loaded back
        gc.collect()
        gguf_model, gguf_tokenizer = load_gguf(staging / gguf_name)
        check_tokenization(gguf_tokenizer, merged.tokenizer, [CHECK_PROMPT, *CHECK_TEXTS])
        difference, tolerance = check_logits(gguf_model.to(flags.device), merged.prompt_ids, merged.reference_logits,
                                             flags.outtype, "GGUF file read back", OUTTYPES[flags.outtype].relative_tolerance)
        write_export_note(staging, inputs, merged, "gguf", {
            "gguf_file": gguf_name, "outtype": flags.outtype, "prompt_template_name": template_name, **summary,
            "gguf_max_logit_difference": difference, "gguf_logit_tolerance": tolerance})

    print(f"done: {inputs.lora_weights} merged into the {merged.merged_into} ({inputs.base_model}); "
          f"{summary['tensors']} tensors {summary['tensor_types']}, {summary['vocabulary']} vocabulary, "
          f"'{template_name}' chat template, largest logit difference {difference:.3g}; "
          f"{target / gguf_name} and {target / 'Modelfile'}")
    if getattr(base_config, "sliding_window", None) and getattr(base_config, "use_sliding_window", True):
        print(f"note: GGUF's llama architecture has no sliding-window attention: outputs match up to "
              f"{base_config.sliding_window} tokens")


if __name__ == "__main__":
    cli.run(main)
