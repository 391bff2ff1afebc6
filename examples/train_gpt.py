"""Train a small byte-level GPT on the Python standard library's own sources, five ways, and compare the losses.

The end-to-end proof of mixprec_ops: a mixed-precision library is adopted only when the loss curve does not move.
Every mode starts from the same fp32 initial weights (one seed), sees the same batches in the same order and runs
the same learning-rate schedule; only the precision recipe changes:

  1 fp32            nn.Linear, torch.optim.AdamW, everything in float32: the baseline.
  2 amp_bf16        float32 model under torch.autocast(bfloat16), torch.optim.AdamW(fused=True).
  3 mixprec_bf16    model cast to bfloat16, mixprec_ops.convert(model) (fused Linear, +GELU in the MLP),
                    mixprec_ops.optim.AdamW keeping fp32 master weights.
  4 mixprec_fp16    model cast to float16, the same, plus mixprec_ops.amp.GradScaler (dynamic loss scaling,
                    started at --init-scale 2**24 and grown every --growth-interval 100 steps, so that a run of
                    this length overflows, skips and backs off for real; torch's 2**16 / 2000 would not move).
  5 bf16_no_master  model cast to bfloat16, torch.optim.AdamW updating the bf16 params directly: the failure mode
                    that master weights prevent (small updates round away).

Data: the .py files of the running interpreter's standard library (sysconfig's "stdlib" path, sorted by relative
path, tests and site-packages excluded), concatenated up to --corpus-bytes, read as bytes (vocabulary 256); the
last 10% is the validation split. Batch b of step s is drawn from a generator seeded by (seed, s), so the data order
is the same for every mode and after a resume. No network, no tokenizer.

Outputs (--out): log.json (config, machine, per-mode curves, final validation loss, tokens/s, memory) and
loss.png (validation and smoothed training loss per mode); log.json is rewritten after each mode, so a run cut
short keeps the modes it finished. --checkpoint-every N (and --stop-after N) writes <out>/<mode>.ckpt; --resume
continues from it (loaded with torch.load(weights_only=True)) and refuses a configuration other than the saved one
(only --stop-after, --threads, --checkpoint-every, --device and progress may change). On a CPU the resumed run
reproduces the uninterrupted one bit-exactly with the same thread count (tests/test_examples.py; another count
changes reduction orders, and a note says so); on a GPU only up to the device's own nondeterminism (e.g. the
attention backward's atomics).

    python examples/train_gpt.py --modes 1,2,3 --steps 2000            # defaults: 4 layers, width 256
    python examples/train_gpt.py --modes mixprec_bf16 --steps 400 --stop-after 200
    python examples/train_gpt.py --modes mixprec_bf16 --steps 400 --resume
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import sys
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import mixprec_ops
from mixprec_ops.amp import GradScaler
from mixprec_ops.optim import AdamW

MODES = ("fp32", "amp_bf16", "mixprec_bf16", "mixprec_fp16", "bf16_no_master")
PARAM_DTYPE = {"fp32": torch.float32, "amp_bf16": torch.float32, "mixprec_bf16": torch.bfloat16,
               "mixprec_fp16": torch.float16, "bf16_no_master": torch.bfloat16}


@dataclasses.dataclass
class Config:
    layers: int = 4
    width: int = 256
    heads: int = 4
    context: int = 128
    batch: int = 16
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eval_every: int = 100
    eval_batches: int = 8
    corpus_bytes: int = 2_000_000
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch.set_num_threads on CPU; 0 leaves torch's default
    checkpoint_every: int = 0
    stop_after: int = 0  # stop (after checkpointing) at this step: the first half of a resume test
    progress: bool = True
    # mixprec_fp16's GradScaler: torch's defaults (2**16, growth every 2000 steps) never move the scale in a run of
    # this length, so dynamic loss scaling would go unexercised: start high (the first steps overflow and back off)
    # and grow every 100 good steps (an overflow, a skipped step and a backoff now and then)
    init_scale: float = 2.0**24
    growth_interval: int = 100


# Fields a resumed run may change (they do not change the trajectory: when to stop, how to run, what to print)
RESUMABLE_CHANGES = ("stop_after", "threads", "checkpoint_every", "progress", "device")


# ---------------------------------------------------------------------------------------------------------- data
def stdlib_corpus(max_bytes: int) -> bytes:
    """The standard library's .py sources, deterministically chosen and concatenated, capped at max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = set(rel.split(os.sep))
        if parts & {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}:
            dirnames[:] = []
            continue
        files += [os.path.join(rel, f) for f in filenames if f.endswith(".py")]
    out, size = [], 0
    for rel in sorted(files):
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        out.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    corpus = b"".join(out)[:max_bytes]
    if len(corpus) < 100_000:
        raise RuntimeError(f"the standard library at {root} gave only {len(corpus)} bytes of .py sources")
    return corpus


def corpus_tokens(corpus: bytes) -> torch.Tensor:
    """The corpus as a 1-D int64 tensor of byte values (the vocabulary is the 256 bytes)."""
    return torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()


class Data:
    def __init__(self, corpus: bytes, context: int, batch: int, seed: int, device):
        tokens = corpus_tokens(corpus)
        split = int(len(tokens) * 0.9)
        self.train, self.val = tokens[:split], tokens[split:]
        self.context, self.batch, self.seed, self.device = context, batch, seed, device

    def _windows(self, tokens, starts):
        idx = starts[:, None] + torch.arange(self.context + 1)
        w = tokens[idx]
        return w[:, :-1].to(self.device), w[:, 1:].to(self.device)

    def train_batch(self, step: int):
        """Batch of `step`: depends only on (seed, step), so every mode and every resume sees the same data."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.context - 1, (self.batch,), generator=g)
        return self._windows(self.train, starts)

    def val_batches(self, n: int):
        """n fixed batches evenly spread over the validation split."""
        total = n * self.batch
        starts = torch.linspace(0, len(self.val) - self.context - 2, total).long()
        return [self._windows(self.val, starts[i * self.batch:(i + 1) * self.batch]) for i in range(n)]


# --------------------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A decoder-only transformer over bytes: token + learned position embeddings, pre-LN blocks, untied head."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.tok = nn.Embedding(256, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 256, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's init; residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def fuse_mlp_gelu(model: nn.Module) -> None:
    """After mixprec_ops.convert: fold each MLP's GELU into its first Linear (one kernel: GEMM + bias + GELU)."""
    for m in model.modules():
        if isinstance(m, Block) and isinstance(m.fc, mixprec_ops.nn.Linear):
            m.fc.activation = "gelu"
            m.act = nn.Identity()


def build(cfg: Config, mode: str, device):
    """Model (same initial weights in every mode), optimizer, scheduler and grad scaler (or None) for `mode`."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device=device, dtype=PARAM_DTYPE[mode])
    if mode in ("mixprec_bf16", "mixprec_fp16"):
        mixprec_ops.convert(model)
        fuse_mlp_gelu(model)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if mode.startswith("mixprec"):
        opt = AdamW(groups, lr=cfg.lr, betas=cfg.betas)  # master_weights="auto": fp32 masters for bf16/fp16
    elif mode == "amp_bf16":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    scaler = (GradScaler(device.type, init_scale=cfg.init_scale, growth_interval=cfg.growth_interval)
              if mode == "mixprec_fp16" else None)
    return model, opt, sched, scaler


class lr_lambda:
    """Linear warm-up, then cosine decay to min_lr_ratio (a class, not a closure: its state_dict round-trips)."""

    def __init__(self, cfg: Config):
        self.warmup, self.steps, self.floor = cfg.warmup, cfg.steps, cfg.min_lr_ratio

    def __call__(self, step):
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def loss_fn(model, x, y, mode, device):
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if mode == "amp_bf16" else contextlib.nullcontext()
    with ctx:
        logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model, batches, mode, device) -> float:
    model.eval()
    total = sum(loss_fn(model, x, y, mode, device).item() for x, y in batches)
    model.train()
    return total / len(batches)


# ---------------------------------------------------------------------------------------------------- train loop
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def checkpoint_path(out: str, mode: str) -> str:
    return os.path.join(out, f"{mode}.ckpt")


def save_checkpoint(path, step, model, opt, sched, scaler, history, cfg):
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
             "cpu_rng": torch.get_rng_state(), "history": history, "config": _config_record(cfg),
             "threads": torch.get_num_threads()}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _config_record(cfg: Config) -> dict:
    """The config as plain values (torch.load(weights_only=True) reads them back)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def _check_resume(ckpt: dict, cfg: Config, path: str) -> None:
    """A resumed run continues the saved one: every field that shapes the trajectory must be as saved (the
    scheduler's schedule, the optimizer's hyperparameters, the data order come from the checkpoint, so a changed
    --lr or --steps would be logged but not used). On a CPU, bit-exactness also needs the same thread count."""
    saved = ckpt.get("config")
    if saved is None:
        raise ValueError(f"{path} has no saved config (written by an older train_gpt.py): rerun without --resume")
    now = _config_record(cfg)
    diff = [f"{k}: {saved.get(k)!r} saved, {v!r} now" for k, v in now.items()
            if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if diff:
        raise ValueError(f"--resume from {path} with another configuration ({'; '.join(diff)}); only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change")
    if ckpt.get("threads") not in (None, torch.get_num_threads()):
        print(f"note: {path} was written with {ckpt['threads']} threads, this run has {torch.get_num_threads()}: "
              "on a CPU the resumed run is then not bit-exact (reduction order)", file=sys.stderr)


def state_bytes(model, opt) -> int:
    """Bytes held by parameters (and gradients, where still set) and optimizer state (exact, device independent)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    n += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n


def applied_steps(opt) -> int:
    """The optimizer's step counter (updates actually applied), read from its first param's state."""
    st = next(iter(opt.state.values()), None)
    return int(st["step"].item()) if st else 0


def train(cfg: Config, mode: str, out: str | None = None, resume: bool = False, data: Data | None = None) -> dict:
    """Train one mode; return its log (curves, final validation loss, tokens/s, memory) and the final model."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name in ("steps", "eval_every", "batch", "context"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    device = resolve_device(cfg.device)
    if cfg.threads and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if data is None:
        data = Data(stdlib_corpus(cfg.corpus_bytes), cfg.context, cfg.batch, cfg.seed, device)
    val = data.val_batches(cfg.eval_batches)
    model, opt, sched, scaler = build(cfg, mode, device)
    history = {"train": [], "val": []}
    start = 0
    if resume:
        # On the CPU: load_state_dict copies onto the params' device, and the RNG state must be a CPU tensor.
        path = checkpoint_path(out, mode)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no checkpoint {path} (write one with --checkpoint-every or "
                                    "--stop-after and --out)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        _check_resume(ckpt, cfg, path)
        if ckpt["step"] >= (cfg.stop_after or cfg.steps):
            raise ValueError(f"--resume: {path} is at step {ckpt['step']}, not before this run's end "
                             f"({cfg.stop_after or cfg.steps})")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["cpu_rng"])
        history, start = ckpt["history"], ckpt["step"]
        del ckpt  # no second copy of the weights and optimizer state for the rest of the run
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    end = cfg.stop_after if cfg.stop_after else cfg.steps
    bar = _progress(range(start, end), mode, cfg.progress)
    # tokens/s leaves out the first steps of the run: one-time costs (Triton compilation and autotuning, allocator
    # warm-up) are not throughput.
    timed_from = start + min(10, (end - start) // 10)
    train_time, tokens = 0.0, 0
    for step in bar:
        x, y = data.train_batch(step)
        t0 = time.perf_counter()
        loss = loss_fn(model, x, y, mode, device)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)  # skipped on the device when the grads hold inf/NaN (counted at the end)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= timed_from:
            train_time += time.perf_counter() - t0
            tokens += x.numel()
        history["train"].append([step + 1, loss.item()])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history["val"].append([step + 1, evaluate(model, val, mode, device)])
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(train=f"{loss.item():.3f}", val=f"{history['val'][-1][1]:.3f}")
        if out and ((cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
                    or (cfg.stop_after and step + 1 == end)):  # --stop-after: the checkpoint to resume from
            save_checkpoint(checkpoint_path(out, mode), step + 1, model, opt, sched, scaler, history, cfg)
    log = {
        "mode": mode, "param_dtype": str(PARAM_DTYPE[mode]).replace("torch.", ""), "steps_run": end - start,
        "train": history["train"], "val": history["val"],
        # Steps whose update was skipped (fp16 overflow): steps taken minus the optimizer's own step counter.
        "skipped_steps": end - applied_steps(opt) if scaler is not None else 0,
        "final_val_loss": history["val"][-1][1] if history["val"] else None,
        "tokens_per_s": tokens / train_time if train_time else None,
        "state_mb": state_bytes(model, opt) / 2**20,
        "peak_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        # On a CPU only the process's max RSS is available: it never decreases, so it grows across modes run in
        # one process and compares nothing; state_mb is the device-independent comparison.
        "peak_memory_kind": ("cuda max_memory_allocated" if device.type == "cuda"
                             else "process max RSS (cumulative over the modes of one process)"),
    }
    return {"log": log, "model": model}


def _progress(it, mode, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=f"{mode:>15}", leave=True, dynamic_ncols=True, mininterval=1.0)


# ------------------------------------------------------------------------------------------------- reporting, CLI
def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def plot(logs: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, log in logs.items():
        steps, losses = zip(*log["train"], strict=True) if log["train"] else ((), ())
        k = max(1, len(losses) // 50)  # moving average over ~2% of the run
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        a1.plot(steps, smooth, label=mode)
        if log["val"]:
            a2.plot(*zip(*log["val"], strict=True), marker="o", ms=3, label=mode)
    a1.set(title="training loss (smoothed)", xlabel="step", ylabel="cross-entropy (nats/byte)")
    a2.set(title="validation loss", xlabel="step")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_modes(text: str) -> list[str]:
    modes = []
    for tok in text.split(","):
        tok = tok.strip()
        mode = MODES[int(tok) - 1] if tok.isdigit() and 1 <= int(tok) <= len(MODES) else tok
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {tok!r}; use 1-5 or {', '.join(MODES)}")
        modes.append(mode)
    return modes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="1,2,3,4,5", help="comma-separated, numbers 1-5 or names (default: all)")
    p.add_argument("--out", default="train_gpt_out", help="output directory (log.json, loss.png, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue each mode from <out>/<mode>.ckpt")
    for f in dataclasses.fields(Config):
        if f.name in ("betas", "progress"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                    if f.name not in ("betas", "progress")}, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    device = resolve_device(cfg.device)
    if cfg.threads and device.type == "cpu":  # before machine_info reads the thread count
        torch.set_num_threads(cfg.threads)
    data = Data(stdlib_corpus(cfg.corpus_bytes), cfg.context, cfg.batch, cfg.seed, device)
    logs = {}
    report = {"config": dataclasses.asdict(cfg), "machine": machine_info(device),
              "corpus": {"train_bytes": len(data.train), "val_bytes": len(data.val)}, "modes": logs}
    for mode in parse_modes(args.modes):
        logs[mode] = train(cfg, mode, args.out, args.resume, data)["log"]
        with open(os.path.join(args.out, "log.json"), "w") as f:  # after each mode: a cut-short run keeps its modes
            json.dump(report, f, indent=1)
    plot(logs, os.path.join(args.out, "loss.png"))
    base = logs.get("fp32", {}).get("final_val_loss")
    print(f"\n{'mode':>15} {'val loss':>9} {'vs fp32':>8} {'tokens/s':>10} {'state MB':>9} {'peak MB':>9}")
    for mode, log in logs.items():
        v = log["final_val_loss"]
        rel = f"{(v / base - 1) * 100:+.2f}%" if (base and v) else "-"
        print(f"{mode:>15} {v if v is not None else float('nan'):9.4f} {rel:>8} {log['tokens_per_s'] or 0:10.0f} "
              f"{log['state_mb']:9.1f} {log['peak_memory_mb']:9.1f}")
    print(f"wrote {os.path.join(args.out, 'log.json')}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
