"""Merge a LoRA adapter into its base model and save a standalone Hugging Face checkpoint.

    python export_hf_checkpoint.py --lora_weights ./lora-medlora --output_dir ./hf_ckpt
    python export_hf_checkpoint.py --base_model meta-llama/Llama-3.1-8B --lora_weights ./lora-chatdoctor \
        --output_dir ./chatdoctor-merged --dtype bfloat16
    python export_hf_checkpoint.py --help                  # every flag

--base_model defaults to the base the adapter was trained on (its medlora_run.json). QLoRA adapters
are merged into the de-quantized 4-bit base. Before anything is declared done, the merged model's
logits on a fixed prompt are checked against base + adapter, and checked again after reloading the
saved folder. The folder then holds safetensors shards, the tokenizer, the generation config and
medlora_export.json, and loads with AutoModelForCausalLM.from_pretrained or, with no adapter,
`python generate.py --base_model ./hf_ckpt --prompt_template alpaca` (the template it was trained
with, noted in medlora_export.json). See docs/export.md.
"""

import gc
import logging

from medlora import cli


def main(
    base_model: str = "",  # empty: the base the adapter was trained on (from its medlora_run.json)
    lora_weights: str = "./lora-medlora",  # the adapter folder finetune.py wrote
    output_dir: str = "./hf_ckpt",  # where the merged Hugging Face checkpoint is written (refused if not empty)
    dtype: str = "auto",  # auto (the base checkpoint's own dtype), float16, bfloat16 or float32
    max_shard_size: str = "5GB",  # safetensors shard size, e.g. 2GB or 500MB
    force: bool = False,  # replace a non-empty output_dir
    device: str = "cpu",  # where to merge and check: cpu, or cuda when the model fits in GPU memory
    trust_remote_code: bool = False,
):
    """Merge LORA_WEIGHTS into BASE_MODEL and save the result to OUTPUT_DIR."""
    from medlora.export.merge import (
        check_output_dir,
        check_saved_checkpoint,
        dtype_name,
        merge_adapter,
        resolve_dtype,
        resolve_inputs,
        save_hf_checkpoint,
        staged_output,
        write_export_note,
    )

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    inputs = resolve_inputs(base_model, lora_weights)
    target = check_output_dir(output_dir, force, inputs)
    torch_dtype = resolve_dtype(dtype, inputs.model_path, trust_remote_code)

    merged = merge_adapter(inputs, torch_dtype, device, trust_remote_code)
    with staged_output(target) as staging:
        print(f"saving to {target}", flush=True)
        save_hf_checkpoint(merged, inputs, staging, max_shard_size)
        write_export_note(staging, inputs, merged, "huggingface")
        merged.model = None  # free it before the saved copy is loaded back
        gc.collect()
        check_saved_checkpoint(staging, merged, device, trust_remote_code)

    template = inputs.run_settings.get("prompt_template_name")
    print(f"done: {inputs.lora_weights} merged into the {merged.merged_into} ({inputs.base_model}), "
          f"{dtype_name(torch_dtype)}, largest logit difference {merged.max_difference:.3g}; checkpoint in {target}"
          + (f" (trained with the {template!r} prompt template)" if template else ""))


if __name__ == "__main__":
    cli.run(main)
