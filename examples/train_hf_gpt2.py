"""A tiny Hugging Face GPT-2 (config only, random init, nothing downloaded) trained with transformers' Trainer on
mixprec_ops: the model in bfloat16, mixprec_ops.convert(model) (GPT-2's Conv1D projections and its lm_head become
the fused matmul), and mixprec_ops.optim.AdamW with fp32 master weights handed to the Trainer through
`optimizers=(optimizer, scheduler)`.

Data: byte-level windows of the standard library's .py sources (the same corpus as examples/train_gpt.py).

    python examples/train_hf_gpt2.py --steps 200 --out hf_gpt2_out
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import mixprec_ops
from mixprec_ops.optim import AdamW

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_gpt import corpus_tokens, stdlib_corpus  # noqa: E402  (same directory)


class ByteWindows(torch.utils.data.Dataset):
    """Fixed, non-overlapping byte windows of a corpus; labels = inputs (the model shifts them itself)."""

    def __init__(self, corpus: bytes, context: int):
        tokens = corpus_tokens(corpus)
        n = len(tokens) // context
        self.windows = tokens[: n * context].view(n, context)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows[i]
        return {"input_ids": w, "labels": w}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--corpus-bytes", type=int, default=400_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="hf_gpt2_out")
    args = p.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=256, n_positions=args.context, n_embd=args.width, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(torch.bfloat16)
    mixprec_ops.convert(model)
    optimizer = AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    targs = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                              logging_steps=max(1, args.steps // 10), save_strategy="no", report_to=[],
                              use_cpu=not torch.cuda.is_available(), seed=args.seed, dataloader_num_workers=0,
                              disable_tqdm=True)
    data = ByteWindows(stdlib_corpus(args.corpus_bytes), args.context)
    trainer = Trainer(model=model, args=targs, train_dataset=data, optimizers=(optimizer, scheduler))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    converted = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("mixprec_ops")})
    print(f"losses every {targs.logging_steps} steps: {[round(v, 3) for v in losses]}; converted: {converted}")
    return {"losses": losses, "converted": converted, "optimizer": optimizer, "model": model}


if __name__ == "__main__":
    main(sys.argv[1:])
