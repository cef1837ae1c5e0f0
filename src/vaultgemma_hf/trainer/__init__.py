"""DP-SGD continued pretraining through the Hugging Face Trainer."""

from vaultgemma_hf.trainer.dp_trainer import DP_STATE_NAME, DPCallback, DPTrainer
from vaultgemma_hf.trainer.losses import per_example_causal_lm_loss
from vaultgemma_hf.trainer.model_card import DPTrainingSummary, render_model_card, write_model_card
from vaultgemma_hf.trainer.training_args import DPTrainingArguments

__all__ = [
    "DP_STATE_NAME",
    "DPCallback",
    "DPTrainer",
    "DPTrainingArguments",
    "DPTrainingSummary",
    "per_example_causal_lm_loss",
    "render_model_card",
    "write_model_card",
]
