"""What every training stage shares: the label-only loss trainer, collators, training arguments,
torchrun, saving, reward models, the DPO/ORPO/SimPO trainer and GRPO rewards."""
