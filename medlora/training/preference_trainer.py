"""dpo.py's trainer: TRL's DPOTrainer on pairs tokenized by medlora.preference, with ORPO and SimPO."""

import torch
import torch.nn.functional as F
from trl import DPOTrainer


class PreferenceTrainer(DPOTrainer):
    """TRL's DPOTrainer, fed pairs tokenized by medlora.preference, plus the reference-free ORPO and SimPO
    losses (TRL 1.16 has them only in its experimental ORPO/CPO trainers, which tokenize differently)."""

    def __init__(self, *args, loss="dpo", simpo_gamma=1.0, **kwargs):
        self.medlora_loss, self.simpo_gamma = loss, simpo_gamma
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already {prompt_ids, chosen_ids, rejected_ids}, tokenized as finetune.py does

    def _compute_loss(self, model, inputs, return_outputs):
        if self.medlora_loss not in ("orpo", "simpo"):
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        use_cache=False, fused_lm_head=True)
        mask = completion_mask[:, 1:]
        token_logps = outputs.log_probs[:, -mask.size(1):]  # 0 outside the replies
        mean_logps = token_logps.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # per-token average, as both papers use
        chosen, rejected = mean_logps.chunk(2, dim=0)
        if self.medlora_loss == "orpo":
            # Hong et al. 2024: SFT loss on the chosen reply - lambda * log sigmoid(log odds ratio), where
            # odds(y) = p / (1 - p) with p the reply's per-token average probability.
            log1m = lambda logp: torch.log(-torch.expm1(logp.clamp(max=-1e-6)))  # noqa: E731  (log(1 - p))
            log_odds = (chosen - rejected) - (log1m(chosen) - log1m(rejected))
            chosen_mask, _ = mask.chunk(2, dim=0)
            nll = -token_logps.chunk(2, dim=0)[0].sum() / chosen_mask.sum().clamp(min=1)
            loss = nll - self.beta * F.logsigmoid(log_odds).mean()
            self._metrics[mode]["nll_loss"].append(self.accelerator.gather(nll.detach()).mean().item())
        else:  # Meng et al. 2024: -log sigmoid(beta * (average logp of chosen - of rejected) - gamma)
            loss = -F.logsigmoid(self.beta * (chosen - rejected) - self.simpo_gamma).mean()
        chosen_rewards, rejected_rewards = self.beta * chosen.detach(), self.beta * rejected.detach()
        gathered = lambda values: self.accelerator.gather(values).mean().item()  # noqa: E731
        self._metrics[mode]["rewards/chosen"].append(gathered(chosen_rewards))
        self._metrics[mode]["rewards/rejected"].append(gathered(rejected_rewards))
        self._metrics[mode]["rewards/accuracies"].append(gathered((chosen_rewards > rejected_rewards).float()))
        self._metrics[mode]["rewards/margins"].append(gathered(chosen_rewards - rejected_rewards))
        self._metrics[mode]["logps/chosen"].append(gathered(chosen.detach()))
        self._metrics[mode]["logps/rejected"].append(gathered(rejected.detach()))
        return (loss, outputs) if return_outputs else loss





def restore_fp32_adapter(model) -> None:
    """TRL's DPO and GRPO trainers cast a quantized model's trainable adapter to bf16, after copying it as the
    frozen reference adapter "ref". Keep trainable weights in fp32 as finetune.py does, with the exact values
    of the reference copy where there is one, so that training starts from the reference itself."""
    import torch

    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            reference = parameters.get(name.replace(".default.", ".ref."), parameter)
            parameter.data = reference.data.float().clone()
