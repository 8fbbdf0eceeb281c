r"""Merge a LoRA adapter into its base model and save a standalone Hugging Face checkpoint.

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

from medlora import cli
from medlora.flag_groups import EXPORT
from medlora.flags import FlagGroup, stage_flags


@stage_flags(
    EXPORT.but(output_dir="./hf_ckpt"),
    FlagGroup("checkpoint", max_shard_size="5GB"),
)
def main(flags):
    """Merge LORA_WEIGHTS into BASE_MODEL and save the result to OUTPUT_DIR.

    Args:
        output_dir: Where the merged Hugging Face checkpoint is written (refused if not empty unless --force).
        max_shard_size: safetensors shard size, e.g. 2GB or 500MB.
    """
    from medlora.export.merge import (
        check_saved_checkpoint,
        dtype_name,
        export_inputs,
        merge_adapter,
        resolve_dtype,
        save_hf_checkpoint,
        staged_output,
        write_export_note,
    )

    inputs, target = export_inputs(flags)
    torch_dtype = resolve_dtype(flags.dtype, inputs.model_path, flags.trust_remote_code)

    merged = merge_adapter(inputs, torch_dtype, flags.device, flags.trust_remote_code)
    with staged_output(target) as staging:
        print(f"saving to {target}", flush=True)
        save_hf_checkpoint(merged, inputs, staging, flags.max_shard_size)
        write_export_note(staging, inputs, merged, "huggingface")
        merged.model = None  # free it before the saved copy is loaded back
        gc.collect()
        check_saved_checkpoint(staging, merged, flags.device, flags.trust_remote_code)

    template = inputs.run_settings.get("prompt_template_name")
    print(f"done: {inputs.lora_weights} merged into the {merged.merged_into} ({inputs.base_model}), "
          f"{dtype_name(torch_dtype)}, largest logit difference {merged.max_difference:.3g}; checkpoint in {target}"
          + (f" (trained with the {template!r} prompt template)" if template else ""))


if __name__ == "__main__":
    cli.run(main)
