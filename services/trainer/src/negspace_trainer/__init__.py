"""negspace trainer: fine-tune a model on a generated dataset (TRL ``SFTTrainer``, PEFT LoRA or
full), then evaluate it with lm-evaluation-harness, one job at a time, each in its own process."""

__version__ = "0.1.0"
