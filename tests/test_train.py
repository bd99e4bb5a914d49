"""Training: the loss falls, a killed run resumes exactly, non-finite losses stop with a clear
error, and a tiny transformer overfits a handful of token sequences."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cartlib import train
from cartlib.config import load_preset

TINY_TOK = {
    "channels": 8,
    "ch_mult": [1, 2],
    "latent_channels": 4,
    "codebook_size": 32,
    "base_patch_nums": [1, 2, 4],
    "depth_per_factor": 1,
    "batch_size": 8,
    "dead_code_every": 5,
}


def tiny_cfg(**tok):
    return load_preset(
        "smoke", data={"resolution": 8}, decompose={"order": 1}, tokenizer={**TINY_TOK, **tok}
    )


def tiny_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # some spatial structure
    return x, (0.7 * x + 0.15)[:, None], torch.randint(3, (n,), generator=g)


def test_tokenizer_loss_falls(tmp_path):
    cfg = tiny_cfg(steps=40, ckpt_every=40, lr=3e-3)
    _, hist = train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())
    first = sum(h["rec"] for h in hist[:5]) / 5
    last = sum(h["rec"] for h in hist[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    saved = json.loads((train.tokenizer_dir(tmp_path, cfg) / "history.json").read_text())
    assert len(saved) == 40 and "used_codes" in saved[4]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import tiny_cfg, tiny_data
    from cartlib import train
    cfg = tiny_cfg(steps=10_000, ckpt_every=3)
    train.train_tokenizer(cfg, {run!r}, progress=False, data=tiny_data())
    """
)


def test_killed_tokenizer_run_resumes_with_identical_next_step_loss(tmp_path):
    run = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=os.path.dirname(__file__), run=str(run))
    proc = subprocess.Popen([sys.executable, "-c", script])
    cfg = tiny_cfg(steps=10_000, ckpt_every=3)
    ckpt = train.tokenizer_dir(run, cfg) / train.CKPT_NAME
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and train.load_checkpoint(ckpt)["step"] >= 6:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # no clean-up, as a real crash or preemption
    proc.wait()
    step = train.load_checkpoint(ckpt)["step"]
    assert step >= 6 and step % 3 == 0
    # six steps: they include a dead-code restart (every 5), whose candidates must match too
    _, resumed = train.train_tokenizer(cfg, run, progress=False, data=tiny_data(), stop_after=6)
    _, straight = train.train_tokenizer(
        cfg, tmp_path / "straight", progress=False, data=tiny_data(), stop_after=step + 6
    )
    assert [h["step"] for h in resumed[-6:]] == list(range(step, step + 6))
    assert any("restarted" in h for h in resumed[-6:])
    for a, b in zip(resumed[-6:], straight[-6:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_half_written_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    cfg = tiny_cfg(steps=4, ckpt_every=2)
    train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())
    folder = train.tokenizer_dir(tmp_path, cfg)
    ckpt = folder / train.CKPT_NAME  # a link to step-00000004.pt
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"step-00000004\.pt is unusable.*truncated.*\(step 2\)"):
        _, hist = train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())
    assert [h["step"] for h in hist] == [0, 1, 2, 3]  # steps 2, 3 trained again
    for p in folder.glob("step-*.pt"):
        p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="no usable checkpoint.*step-00000002.pt"):
        train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())


def test_nan_loss_stops_with_the_step_and_the_last_checkpoint(tmp_path):
    x, b, y = tiny_data()
    x[:] = float("nan")
    cfg = tiny_cfg(steps=4, ckpt_every=2)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 0"):
        train.train_tokenizer(cfg, tmp_path, progress=False, data=(x, b, y))


def ar_setup(tmp_path, steps, ckpt_every=100, lr=3e-2):
    cfg = load_preset(
        "smoke",
        data={"resolution": 8},
        decompose={"order": 1},
        tokenizer={**TINY_TOK, "steps": 1},
        ar={
            "depth": 2,
            "width": 64,
            "heads": 4,
            "steps": steps,
            "batch_size": 8,
            "lr": lr,
            "warmup": 5,
            "cond_drop": 0.0,
            "ckpt_every": ckpt_every,
        },
    )
    tok, _ = train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())
    g = torch.Generator().manual_seed(3)
    tokens = [torch.randint(32, (8, s.h, s.w), generator=g) for s in tok.schedule]
    labels = torch.arange(8)  # one class per sequence: even step 1 (1x1) is learnable
    return cfg, tok, tokens, labels


def test_tiny_transformer_overfits_a_handful_of_sequences(tmp_path):
    cfg, tok, tokens, labels = ar_setup(tmp_path, steps=150)
    model, hist = train.train_ar(cfg, tmp_path, tok, tokens, labels, 8, progress=False)
    assert hist[0]["acc"] < 0.2
    assert hist[-1]["acc"] > 0.95, hist[-1]["acc"]
    assert hist[-1]["loss"] < 0.2 * hist[0]["loss"]


def test_ar_training_resumes_exactly(tmp_path):
    cfg, tok, tokens, labels = ar_setup(tmp_path / "a", steps=12, ckpt_every=4)
    _, straight = train.train_ar(cfg, tmp_path / "a", tok, tokens, labels, 8, progress=False)
    for part in (5, 7):  # stops after step 5 (checkpoint at 5), then runs to the end
        _, resumed = train.train_ar(
            cfg, tmp_path / "b", tok, tokens, labels, 8, progress=False, stop_after=part
        )
    assert [h["step"] for h in resumed] == list(range(12))
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_progress_bar_redraws_are_rate_limited_not_per_step(tmp_path, capsys):
    """In a notebook every redraw of the bar is an iopub message; one per step floods the kernel's
    output thread (nbval then times out waiting for a cell's output). 300 fast steps must redraw
    a handful of times, not 300."""
    from cartlib.train.loop import make_accelerator, run_loop

    lin = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    run_loop(
        accelerator=make_accelerator(),
        modules={"lin": lin},
        optimizers={"opt": opt},
        schedulers={},
        step_fn=lambda step: {"loss": 1.0 / (step + 1)},
        total_steps=300,
        ckpt_dir=tmp_path,
        ckpt_every=1000,
        progress=True,
    )
    redraws = capsys.readouterr().err.count("\r")
    assert 1 <= redraws <= 20, redraws


def test_history_stays_bounded_on_long_runs_and_covers_every_step(tmp_path, monkeypatch):
    """Beyond MAX_HISTORY steps one entry per interval, the mean of its steps (the history is in
    every checkpoint: at 250k steps one entry per step would make each ~100 MB); a resumed run
    ends with the history an uninterrupted one has."""
    from cartlib.train import loop
    from cartlib.train.loop import make_accelerator, run_loop

    monkeypatch.setattr(loop, "MAX_HISTORY", 4)

    def go(folder, stop=None):
        lin = torch.nn.Linear(2, 1)
        return run_loop(
            accelerator=make_accelerator(), modules={"lin": lin}, optimizers={}, schedulers={},
            step_fn=lambda step: {"loss": float(step)}, total_steps=10, ckpt_dir=folder,
            ckpt_every=3, stop_after=stop, progress=False,
        )  # fmt: skip

    history = go(tmp_path / "a")
    assert len(history) <= 2 * 4  # intervals of ceil(10 / 4) = 3 steps, cut at checkpoints
    assert [h["step"] for h in history] == [2, 5, 8, 9]
    assert [h["loss"] for h in history] == [1.0, 4.0, 7.0, 9.0]  # each interval's mean
    go(tmp_path / "b", stop=6)
    assert go(tmp_path / "b") == history


def test_an_update_that_breaks_the_weights_is_never_saved(tmp_path):
    """The loss is checked before each update; what the last update did is checked before its
    checkpoint is written (a NaN there made a "finished" model of NaNs, exit 0)."""
    from cartlib.train.loop import make_accelerator, run_loop

    lin = torch.nn.Linear(2, 1)

    def step_fn(step):
        if step == 3:  # the last update leaves a NaN behind
            with torch.no_grad():
                lin.weight[0, 0] = float("nan")
        return {"loss": 1.0}

    kw = dict(accelerator=make_accelerator(), modules={"lin": lin}, optimizers={},
              schedulers={}, step_fn=step_fn, total_steps=4, ckpt_dir=tmp_path, ckpt_every=2,
              progress=False)  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"not finite after step 4 \(lin.weight\).*"):
        run_loop(**kw)
    state, _ = train.load_latest(tmp_path)
    assert state["step"] == 2  # the good checkpoint stays the newest


def test_ctrl_c_finishes_the_step_saves_it_and_resumes_exactly(tmp_path):
    """Issue 37, crash 8: Ctrl-C left exit 130, a traceback from inside autograd and the steps
    since the last checkpoint lost. Now the first SIGINT ends the running step, saves it and says
    how to resume; the resumed run equals one that was never stopped."""
    from cartlib.train.stopping import Interrupted

    cfg, tok, tokens, labels = ar_setup(tmp_path / "a", steps=10, ckpt_every=100)
    _, straight = train.train_ar(cfg, tmp_path / "a", tok, tokens, labels, 8, progress=False)
    calls = []
    original = train.ar.ar_loss

    def loss_then_ctrl_c(*args):
        calls.append(1)
        if len(calls) == 4:  # inside step 3's forward/backward
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args)

    train.ar.ar_loss = loss_then_ctrl_c
    # Python's own handler while training, whatever an earlier test in this process left (a
    # pytest-xdist worker has been seen holding SIG_IGN here): the run must restore it
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(Interrupted, match=r"interrupted after step 4 of 10; saved .*resume"):
            train.train_ar(cfg, tmp_path / "b", tok, tokens, labels, 8, progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        train.ar.ar_loss = original
        signal.signal(signal.SIGINT, before)
    folder = train.ar_dir(tmp_path / "b", cfg)
    assert json.loads((folder / "checkpoints.json").read_text())["checkpoints"][0]["step"] == 4
    _, resumed = train.train_ar(cfg, tmp_path / "b", tok, tokens, labels, 8, progress=False)
    assert [h["step"] for h in resumed] == list(range(10))
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_checkpointing_draws_nothing_from_training_randomness(tmp_path):
    """Issue 37, finding 11: ckpt_every was part of the artifact key because writing a
    checkpoint was thought to change the trajectory; a save (with its weight checks) draws
    nothing from the random streams, so runs saving at different steps end with the very same
    weights (DropPath and label dropout on, so the RNG is used), and ckpt_every leaves the key:
    a run whose interval changed resumes."""
    finals = []
    for every in (3, 5):
        cfg, tok, tokens, labels = ar_setup(tmp_path / str(every), steps=10, ckpt_every=every)
        cfg = cfg.updated(ar={"drop_path": 0.3, "cond_drop": 0.3})
        model, _ = train.train_ar(
            cfg, tmp_path / str(every), tok, tokens, labels, 8, progress=False
        )
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(finals[0], finals[1])
    assert train.ar_dir(tmp_path, cfg) == train.ar_dir(tmp_path, cfg.updated(ar={"ckpt_every": 9}))


def test_each_run_says_whether_it_resumed_or_started_anew_and_why(tmp_path, capsys):
    """Issue 37, finding 11: changing lr trained a new folder from step 0 without a word about
    the partial run next to it; changing micro_batch resumed, also without a word."""
    cfg, tok, tokens, labels = ar_setup(tmp_path, steps=6, ckpt_every=2)
    go = lambda c: train.train_ar(c, tmp_path, tok, tokens, labels, 8, progress=False, stop_after=2)
    go(cfg)
    assert re.search(
        r"AR d2: starting at step 0 of 6 in \S+ar-d2-\S+$", capsys.readouterr().out, re.M
    )
    go(cfg.updated(ar={"micro_batch": 4}))
    assert re.search(r"resuming from step 2 of 6 in .*\(ar\.micro_batch: None -> 4\): the same",
                     capsys.readouterr().out)  # fmt: skip
    go(cfg.updated(ar={"lr": 1e-2}))
    assert re.search(r"starting at step 0 of 6 .*not resumed: ar-d2-\S+ holds step 4 with other "
                     r"settings \(ar\.lr: 0\.03 -> 0\.01\)", capsys.readouterr().out)  # fmt: skip
