r"""Merge a LoRA adapter into a LLaMA-family base model (llama, mistral) and save it in Meta's layout:
consolidated.00.pth + params.json (+ tokenizer.model), as Meta's reference code and older tools read it.

    python export_state_dict_checkpoint.py --lora_weights ./lora-medlora --output_dir ./ckpt
    python export_state_dict_checkpoint.py --base_model meta-llama/Llama-2-7b-hf --lora_weights ./lora-chatdoctor \
        --output_dir ./chatdoctor-meta --dtype float16
    python export_state_dict_checkpoint.py --help          # every flag

Tensor names follow Meta's (tok_embeddings, layers.N.attention.wq ..., feed_forward.w1/w2/w3, norm,
output), wq/wk get Hugging Face's rotary permutation undone, and params.json is read from the model's
config. The merge is checked exactly as in export_hf_checkpoint.py. See docs/export.md.
"""

import json

from medlora import cli
from medlora.flag_groups import EXPORT
from medlora.flags import stage_flags


@stage_flags(EXPORT.but(output_dir="./ckpt"))
def main(flags):
    """Merge LORA_WEIGHTS into BASE_MODEL and save consolidated.00.pth and params.json to OUTPUT_DIR.

    Args:
        output_dir: Where consolidated.00.pth and params.json are written (refused if not empty unless --force).
    """
    import torch
    from transformers import AutoConfig

    from medlora.export.merge import (
        check_meta_layout_supported,
        copy_tokenizer_model,
        dtype_name,
        export_inputs,
        merge_adapter,
        meta_params,
        meta_state_dict,
        resolve_dtype,
        staged_output,
        write_export_note,
    )

    inputs, target = export_inputs(flags)
    base_config = AutoConfig.from_pretrained(inputs.model_path, trust_remote_code=flags.trust_remote_code)
    check_meta_layout_supported(base_config)
    torch_dtype = resolve_dtype(flags.dtype, inputs.model_path, flags.trust_remote_code)

    merged = merge_adapter(inputs, torch_dtype, flags.device, flags.trust_remote_code)
    tensors = meta_state_dict(merged.model, torch_dtype)
    params = meta_params(merged.model.config, vocab_size=tensors["tok_embeddings.weight"].shape[0])
    with staged_output(target) as staging:
        print(f"saving to {target}", flush=True)
        torch.save(tensors, staging / "consolidated.00.pth")
        (staging / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        tokenizer_model = copy_tokenizer_model(inputs, staging)
        write_export_note(staging, inputs, merged, "meta")

    notes = []
    if tokenizer_model is None:
        notes.append("the base has no tokenizer.model to copy")
    elif params["vocab_size"] > base_config.vocab_size:
        notes.append(f"training grew the vocabulary from {base_config.vocab_size} to {params['vocab_size']} "
                     "(a pad token): tokenizer.model does not know the added tokens")
    sliding_window = getattr(merged.model.config, "sliding_window", None)
    if sliding_window:
        notes.append(f"Meta's layout has no sliding-window attention: outputs match up to {sliding_window} tokens")
    print(f"done: {inputs.lora_weights} merged into the {merged.merged_into} ({inputs.base_model}), "
          f"{dtype_name(torch_dtype)}, largest logit difference {merged.max_difference:.3g}; "
          f"{len(tensors)} tensors in {target / 'consolidated.00.pth'}, params {json.dumps(params)}")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    cli.run(main)
