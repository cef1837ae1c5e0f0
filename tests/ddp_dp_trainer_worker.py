"""Worker of tests/test_ddp.py: one DPTrainer step on a tiny model, run by torchrun (CPU, gloo) or in-process.

Usage (what the test does)::

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_dp_trainer_worker.py --out DIR

For each noise multiplier in --sigmas it trains one logical DP-SGD step (SGD, lr 1, seeded sampling and noise)
and rank 0 writes the parameter update θ_before − θ_after to ``DIR/update_sigma{σ}.safetensors`` plus a JSON
summary; every rank writes its own copy of the updated parameters so the test can check the replicas agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

SEED = 5
NUM_DOCS = 16
LOGICAL_BATCH = 4
CLIP = 0.5


def build_model() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.VaultGemmaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        query_pre_attn_scalar=8,
        layer_types=["full_attention"] * 2,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return transformers.VaultGemmaForCausalLM(config)


def build_dataset():
    from vaultgemma_hf.data.packing import pack_documents

    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 97, (15,), generator=g).tolist() for _ in range(NUM_DOCS)]
    return pack_documents(docs, seq_len=16, eos_token_id=1, cross_document_boundaries=False)


def run_one_step(output_dir: str, sigma: float) -> tuple[dict[str, torch.Tensor], dict]:
    """Trains one logical step; returns (update per parameter, summary)."""
    from vaultgemma_hf.data.packing import DataCollatorForPackedSequences
    from vaultgemma_hf.trainer import DPTrainer, DPTrainingArguments

    args = DPTrainingArguments(
        output_dir=output_dir,
        noise_multiplier=sigma,
        target_delta=1e-3,
        per_sample_max_grad_norm=CLIP,
        logical_batch_size=LOGICAL_BATCH,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        logging_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        deterministic_noise_for_testing=True,
        seed=SEED,
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    model = build_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = DPTrainer(
        model=model, args=args, train_dataset=build_dataset(), data_collator=DataCollatorForPackedSequences()
    )
    trainer.train()
    after = dict(trainer.model.named_parameters())
    update = {name: (before[name] - after[name].detach()).contiguous() for name in before}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    summary = {
        "world_size": args.world_size,
        "accountant_steps": trainer.privacy_accountant.steps,
        "global_step": trainer.state.global_step,
        "epsilon": trainer.get_epsilon(),
        "dp_batch_size": logs[0]["dp_batch_size"],
    }
    return update, summary


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1.0])
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    for sigma in args.sigmas:
        update, summary = run_one_step(os.path.join(args.out, f"run-{sigma}"), sigma)
        save_file(update, os.path.join(args.out, f"update_sigma{sigma}_rank{rank}.safetensors"))
        with open(os.path.join(args.out, f"summary_sigma{sigma}_rank{rank}.json"), "w") as handle:
            json.dump(summary, handle)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # clean gloo teardown: no abort at interpreter exit
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Every result is on disk. Skip the interpreter's teardown: a C++ thread still alive there (gloo, the data
    # loader) occasionally aborts the process ("terminate called without an active exception", exit -6) on a
    # loaded machine, which would fail the run after its results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
