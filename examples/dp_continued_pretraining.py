"""DP-SGD continued pretraining of VaultGemma with `DPTrainer`.

By default it runs in well under a minute on a CPU: the tiny random VaultGemma fixture shipped with the package and a
small synthetic corpus. Point it at a real checkpoint and your own documents for real work:

    python examples/dp_continued_pretraining.py                              # tiny fixture, CPU
    python examples/dp_continued_pretraining.py --model path/to/vaultgemma-1b --train-file notes.jsonl \\
        --seq-len 1024 --logical-batch-size 1024 --micro-batch 4 --accumulation 8 --max-steps 2000 --bf16

It packs the documents into fixed-length sequences (the privacy unit), calibrates the noise to the target ε for
the planned steps, trains, prints the ε spent and writes the model with its DP model card (README.md).
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import vaultgemma_hf  # noqa: F401  (registers VaultGemma with the Auto classes)
from vaultgemma_hf.data import DataCollatorForPackedSequences, pack_documents, read_documents
from vaultgemma_hf.numbers import round_up  # printed ε never below the computed one
from vaultgemma_hf.trainer import DPTrainer, DPTrainingArguments


def fixture_paths() -> tuple[str, str]:
    """The tiny model and corpus shipped with the package."""
    from vaultgemma_hf.fixtures import TINY_CORPUS, TINY_MODEL_DIR

    return str(TINY_MODEL_DIR), str(TINY_CORPUS)


def main() -> None:
    default_model, default_corpus = fixture_paths()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_model, help="model directory (default: tiny fixture)")
    parser.add_argument(
        "--train-file",
        default=default_corpus,
        help=".txt (one document per non-empty line) or .jsonl (text under --text-field), as `vaultgemma-hf train`",
    )
    parser.add_argument("--text-field", default="text", help="key of the document text in .jsonl records")
    parser.add_argument("--output-dir", default="outputs/dp-continued-pretraining")
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument(
        "--target-delta", type=float, default=None, help="default: min(1e-5, 1/(10 N)), as the planner"
    )
    parser.add_argument("--clip", type=float, default=1.0, help="per-sequence clipping norm C")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--logical-batch-size", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True)
    documents, _ = read_documents(args.train_file, args.text_field)  # as `vaultgemma-hf train` reads it
    train = pack_documents(
        documents, tokenizer, seq_len=args.seq_len, max_position_embeddings=model.config.max_position_embeddings
    )
    print(f"{len(documents)} documents -> {len(train)} sequences of {args.seq_len} tokens (the privacy unit)")

    training_args = DPTrainingArguments(
        output_dir=args.output_dir,
        target_epsilon=args.target_epsilon,
        target_delta=args.target_delta,
        per_sample_max_grad_norm=args.clip,
        logical_batch_size=args.logical_batch_size,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.accumulation,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=5,
        save_strategy="no",
        report_to=[],
    )
    trainer = DPTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorForPackedSequences(),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    print(
        f"noise multiplier {trainer.noise_multiplier:.4g}, sampling rate {trainer.sampling_rate:.4g}, "
        f"{trainer.privacy_accountant.steps} steps: epsilon = {round_up(trainer.get_epsilon())} at delta = "
        f"{trainer.target_delta:.3g}. Model and model card in {args.output_dir}/"
    )


if __name__ == "__main__":
    main()
