"""VAR's transformer weights through cartlib give the logits of VAR's own code.

tests/test_var_import.py checks the converter against a transcription of VAR's forward written
from the same reading of VAR's source as the converter; a misreading shared by both would pass
there. Here the reference is VAR itself: ``tests/data/var-golden/`` holds a depth-2 VAR's state
dict and the teacher-forced outputs that FoundationVision/VAR's ``VAR.forward`` computed from it
(see that folder's README). cartlib loads the state dict with :func:`load_var_transformer`, runs
its own teacher-forced forward on the same inputs and must give the same logits.

VAR's ``x_BLCv_wo_first_l`` (B, L - 1, Cvae) is exactly cartlib's ``inputs``: the accumulated
f_hat of steps < m resampled to step m, flattened row by row, for every step after the first
(:meth:`ScheduleQuantizer.teacher_inputs`); both models project it with ``word_embed`` and put the
class start token in front of it (VAR's first step is 1 x 1, so L - 1 = L - h_1 w_1).

Tolerance: ATOL = 5e-5 on logits of magnitude <= 5.4 (meta.json). Measured when this was
written: 1.9e-6 on the logits, 1e-6 on logsumexp, no argmax differs; the golden README promises
about 1e-5 (fp32, where summation order differs between VAR's and cartlib's kernels and between
machines). 5e-5 leaves that headroom and is still 1e4 times smaller than what a misread
parameter does (>= 0.48, see the last test)."""

import json
from pathlib import Path

import pytest
import torch

from cartlib.config import load_preset
from cartlib.io import sha256_file
from cartlib.model import build_model, var_import
from cartlib.model.var_import import load_var_transformer

GOLDEN = Path(__file__).parent / "data" / "var-golden"
META = json.loads((GOLDEN / "meta.json").read_text())
STATE, FORWARD = "var_d2_c10_state_dict.pth", "var_d2_c10_forward.pt"
ATOL = 5e-5  # see the module doc


def golden(name: str) -> Path:
    """The path of golden file ``name``, after checking it is the file VAR's run wrote."""
    path = GOLDEN / name
    assert sha256_file(path) == META["sha256"][name], f"{path} is not the recorded file"
    return path


def vars_model() -> torch.nn.Module:
    """cartlib's transformer with the golden VAR's settings: the var-d16-256 preset (VAR's 256 px
    schedule, vocabulary 4096, Cvae 32, 64 x depth width, depth heads) at depth 2, 10 classes."""
    ar = {"depth": META["depth"], "attn_l2_norm": META["attn_l2_norm"]}
    cfg = load_preset("var-d16-256", ar=ar | {"shared_adaln": META["shared_aln"]})
    return build_model(cfg, cfg.schedule(), META["num_classes"]).eval()


@pytest.fixture(scope="module")
def forward() -> dict[str, torch.Tensor]:
    return torch.load(golden(FORWARD), map_location="cpu", weights_only=True)


def cartlib_logits(forward) -> torch.Tensor:
    """cartlib's teacher-forced logits (B, L, V) on the golden inputs, fp32, eval mode."""
    model = load_var_transformer(vars_model(), golden(STATE))
    with torch.no_grad():
        return model(forward["label"], forward["x_BLCv_wo_first_l"]).float()


def test_golden_files_are_the_recorded_ones():
    for name in (STATE, FORWARD):
        golden(name)


def test_the_model_has_the_golden_vars_shape(forward):
    model = vars_model()
    heads = model.blocks[0].attn.heads
    assert tuple(s.h for s in model.schedule) == tuple(META["patch_nums"])
    assert (model.depth, model.width, heads) == (META["depth"], META["width"], META["heads"])
    assert (model.head.out_features, model.word_embed.in_features) == (META["V"], META["Cvae"])
    assert model.schedule.seq_len == META["L"] == forward["x_BLCv_wo_first_l"].shape[1] + 1
    assert model.num_classes == META["num_classes"]


def test_logits_equal_vars_own(forward):
    logits = cartlib_logits(forward)
    theirs = forward["logits_at_positions"]  # (B, len(positions), V)
    assert theirs.abs().max() > 1.0  # a non-trivial function of the weights
    torch.testing.assert_close(logits[:, forward["positions"]], theirs, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits.logsumexp(-1), forward["logsumexp"], atol=ATOL, rtol=0)


def test_argmax_equals_vars_own_except_at_near_ties(forward):
    """Where VAR's top two logits are more than 2 ATOL apart, logits within ATOL of VAR's have
    VAR's argmax. Where no golden logits are stored, a different argmax is allowed only if VAR's
    token scores within 2 ATOL of cartlib's best (so it is a near-tie there too)."""
    logits, argmax = cartlib_logits(forward), forward["argmax"]
    top2 = forward["logits_at_positions"].topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * ATOL  # (B, len(positions))
    at = logits[:, forward["positions"]].argmax(-1)
    assert torch.equal(at[clear], argmax[:, forward["positions"]][clear])
    ours = logits.argmax(-1)
    var_token = logits.gather(-1, argmax[..., None])[..., 0]
    near_tie = var_token >= logits.max(-1).values - 2 * ATOL
    assert bool(near_tie[ours != argmax].all()), (ours != argmax).nonzero().tolist()


@pytest.mark.parametrize(
    "constant,misreading",
    [
        ("ADALN_FROM_VAR", (0, 1, 2, 3, 4, 5)),  # VAR's chunk order taken as cartlib's
        ("ADALN_FROM_VAR", (2, 4, 0, 3, 5, 1)),  # shift and scale exchanged
        ("ADALN_FROM_VAR", (5, 3, 1, 4, 2, 0)),  # attention's and MLP's chunks exchanged
        ("HEAD_FROM_VAR", (0, 1)),  # the head's (scale, shift) taken as (shift, scale)
    ],
    ids=["adaln-unpermuted", "adaln-shift-scale", "adaln-attn-mlp", "head-unswapped"],
)
def test_a_misread_layout_fails_the_golden_comparison(forward, monkeypatch, constant, misreading):
    """The comparison is sharp: each misreading moves some logit by far more than ATOL."""
    monkeypatch.setattr(var_import, constant, misreading)
    logits = cartlib_logits(forward)[:, forward["positions"]]
    assert (logits - forward["logits_at_positions"]).abs().max() > 1e3 * ATOL
