"""What every training stage shares: TrainingStage (checks, run folder, model, Trainer arguments, saving), the
label-only loss trainer, collators, torchrun, saving, reward models, the DPO/ORPO/SimPO trainer and GRPO rewards."""
