"""End-to-end acceptance of examples/: a small byte-level GPT trained five ways (examples/train_gpt.py) and a tiny
Hugging Face GPT-2 trained by transformers' Trainer with our optimizer (examples/train_hf_gpt2.py), on CPU.

What the quality test can show on a CPU: the precision recipes (bf16/fp16 params, fp32 masters, loss scaling)
and their effect on the loss curve, which is the same arithmetic on any device. What it cannot show: speed (the
CPU serves matmul with the fp32 reference), and the GPU kernels (bench/gpu_check runs the example on a GPU).
"""

import importlib.util
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and train_hf_gpt2's `from train_gpt import ...` look it up here
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tg():
    return _load("train_gpt")


# The acceptance configuration: 2 layers, width 64, 600 steps of 16 x 64 bytes (~10 s per mode on 2 idle cores).
# lr 1e-3 with a cosine decay to 1e-4. An Adam update is about lr in size, and bf16 (8 significant bits) rounds away
# an update smaller than half an ulp, |w| * 2^-8 or more: plain bf16 params lose every update to weights above
# 2^8 * lr in magnitude (0.26 at the peak lr: LayerNorm gains at 1.0 never move; 0.026 at the end), which is what
# mode 5 must show and what fp32 masters prevent. Measured on 2026-11-28 (seeds 0, 1, 2), final validation loss vs
# fp32: mixprec_bf16 +0.01/-0.01/+0.02%, mixprec_fp16 +0.00% (seed 0) and -0.00% (seed 2), bf16_no_master
# +2.06/+1.88/+1.93%.
# (At lr 2e-3 the bf16 gap shrinks to -0.2..+1.0%: larger updates survive the rounding.)
SMALL = dict(layers=2, width=64, heads=2, context=64, batch=16, steps=600, lr=1e-3, warmup=50, eval_every=200,
             eval_batches=8, corpus_bytes=1_000_000, device="cpu", progress=False)


@pytest.fixture(scope="module")
def small_data(tg):
    cfg = tg.Config(**SMALL)
    return tg.Data(tg.stdlib_corpus(cfg.corpus_bytes), cfg.context, cfg.batch, cfg.seed, torch.device("cpu"))


@pytest.mark.slow
def test_gpt_precision_modes_track_fp32(tg, small_data):
    cfg = tg.Config(**SMALL)
    final = {m: tg.train(cfg, m, data=small_data)["log"] for m in
             ("fp32", "mixprec_bf16", "mixprec_fp16", "bf16_no_master")}
    v = {m: log["final_val_loss"] for m, log in final.items()}
    msg = ", ".join(f"{m} {x:.4f}" for m, x in v.items())
    # Learning happened at all (uniform over 256 bytes is ln 256 = 5.55 nats): otherwise "close to fp32" is empty.
    assert v["fp32"] < 3.0, msg
    # The issue's acceptance bound: mixprec bf16 / fp16 (fp32 masters) within 1.5% of fp32's validation loss.
    assert abs(v["mixprec_bf16"] / v["fp32"] - 1) <= 0.015, msg
    assert abs(v["mixprec_fp16"] / v["fp32"] - 1) <= 0.015, msg
    # Without masters, bf16 is measurably worse than with them: by 1% of the loss at least (measured: ~2%, while
    # mixprec_bf16 stays within 0.02% of fp32, so 1% is 50x that noise and half the effect).
    assert v["bf16_no_master"] - v["mixprec_bf16"] > 0.01 * v["fp32"], msg
    # Dynamic loss scaling at work, and settled: the scaler starts at 2**24, so the first steps overflow and back
    # off (skipped steps), and it grows every 100 good steps; a few skips, not a run of them. (With torch's
    # defaults the scale never moved in a run this short: 0 skips, and this bound could not fail.)
    assert 0 < final["mixprec_fp16"]["skipped_steps"] < 20, final["mixprec_fp16"]["skipped_steps"]
    for m, log in final.items():
        assert all(torch.isfinite(torch.tensor(x)) for _, x in log["train"]), m


def test_gpt_resume_is_bit_exact(tg, small_data, tmp_path):
    """mixprec_bf16: 40 steps straight vs 20 steps and a checkpoint, then a model, optimizer, scheduler and data
    stream built from scratch (global RNG reseeded) that load it and run the last 20 steps."""
    cfg = dict(SMALL, steps=40, eval_every=20, eval_batches=2)
    straight = tg.train(tg.Config(**cfg), "mixprec_bf16", data=small_data)
    out = str(tmp_path)
    first = tg.train(tg.Config(**cfg, checkpoint_every=20, stop_after=20), "mixprec_bf16", out, data=small_data)
    assert first["log"]["steps_run"] == 20 and os.path.exists(tg.checkpoint_path(out, "mixprec_bf16"))
    torch.manual_seed(12345)  # resume must not depend on the global RNG state it finds
    resumed = tg.train(tg.Config(**cfg), "mixprec_bf16", out, resume=True, data=small_data)
    assert resumed["log"]["steps_run"] == 20
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
    # The curves agree too: the same losses at every step, the first half carried over from the checkpoint.
    assert straight["log"]["train"] == resumed["log"]["train"]
    assert straight["log"]["val"] == resumed["log"]["val"]
    # And the second half really trained from the checkpoint: it differs from the state at step 20.
    assert not torch.equal(first["model"].state_dict()["head.weight"], b["head.weight"])


def test_gpt_resume_refuses_another_configuration(tg, small_data, tmp_path):
    """--stop-after alone writes the checkpoint to resume from (it wrote none without --checkpoint-every); a resume
    with another --lr is refused, naming it (the scheduler and optimizer state would have kept the old values
    while log.json recorded the new); a checkpoint already past the run's end is refused."""
    cfg = dict(SMALL, steps=10, eval_every=5, eval_batches=1)
    out = str(tmp_path)
    tg.train(tg.Config(**cfg, stop_after=5), "mixprec_bf16", out, data=small_data)
    assert os.path.exists(tg.checkpoint_path(out, "mixprec_bf16"))
    with pytest.raises(ValueError, match=r"another configuration \(lr: 0\.001 saved, 0\.005 now\)"):
        tg.train(tg.Config(**{**cfg, "lr": 5e-3}), "mixprec_bf16", out, resume=True, data=small_data)
    with pytest.raises(ValueError, match="at step 5, not before this run's end"):
        tg.train(tg.Config(**cfg, stop_after=5), "mixprec_bf16", out, resume=True, data=small_data)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tg.train(tg.Config(**cfg), "mixprec_fp16", out, resume=True, data=small_data)


def test_gpt_cli_writes_log_plot_and_checkpoint(tg, tmp_path):
    out = str(tmp_path / "run")
    report = tg.main(["--modes", "1,mixprec_bf16", "--layers", "1", "--width", "32", "--heads", "2", "--context",
                      "32", "--batch", "4", "--steps", "6", "--eval-every", "3", "--eval-batches", "1",
                      "--corpus-bytes", "200000", "--checkpoint-every", "3", "--device", "cpu", "--out", out,
                      "--no-progress"])
    assert set(report["modes"]) == {"fp32", "mixprec_bf16"}
    names = ["log.json", "fp32.ckpt", "mixprec_bf16.ckpt"]
    try:
        import matplotlib  # noqa: F401  (the plot is optional: without matplotlib the example skips it)

        names.append("loss.png")
    except ImportError:
        pass
    for name in names:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    log = report["modes"]["mixprec_bf16"]
    assert [s for s, _ in log["val"]] == [3, 6] and log["tokens_per_s"] > 0 and log["state_mb"] > 0
    # Mode 3 keeps fp32 masters beside bf16 params: its state is larger than the params alone would need.
    ck = torch.load(os.path.join(out, "mixprec_bf16.ckpt"), weights_only=True)
    assert all(s["master_param"].dtype == torch.float32 for s in ck["optimizer"]["state"].values())
    with pytest.raises(SystemExit):
        tg.parse_modes("1,7")


def test_gpt_corpus_is_deterministic(tg):
    a, b = tg.stdlib_corpus(300_000), tg.stdlib_corpus(300_000)
    assert a == b and len(a) == 300_000 and b"def " in a


@pytest.mark.slow
def test_hf_trainer_gpt2_with_mixprec(tmp_path):
    pytest.importorskip("transformers", reason="transformers is a test dependency (make test installs it)")
    _load("train_gpt")
    hf = _load("train_hf_gpt2")
    res = hf.main(["--steps", "40", "--out", str(tmp_path)])
    # GPT-2's Conv1D projections and its lm_head all went through convert().
    assert res["converted"] == ["Conv1D__transformers__pytorch_utils", "Linear"], res["converted"]
    opt = res["optimizer"]
    # The Trainer stepped our optimizer: every param has state, with an fp32 master, and 40 applied steps.
    assert len(opt.state) == len(list(res["model"].parameters()))
    assert all(st["master_param"].dtype == torch.float32 and st["step"].item() == 40 for st in opt.state.values())
    losses = res["losses"]
    assert len(losses) >= 4 and losses[-1] < losses[0] - 1.0, losses
