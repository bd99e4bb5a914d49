"""TokenSchedule: the paper's schedules, sequence bookkeeping, the block-causal mask, refusals."""

import pytest
import torch

from cartlib.config import TokenizerConfig
from cartlib.schedule import ScheduleError, TokenSchedule

VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def test_var_schedule_matches_var_paper():
    s = TokenSchedule.var(VAR_256)
    assert s.n_steps == 10 and s.n_base == 10 and s.n_factors == 0
    assert s.seq_len == 680  # VAR-256's sequence length
    assert s.full_hw == (16, 16)


def test_cart_256_is_8_base_plus_6_detail_coarse_detail_first():
    s = TokenSchedule.cart((1, 2, 3, 4, 6, 8, 12, 16), n_factors=3, depth_per_factor=2)
    assert s.n_steps == 14 and s.n_base == 8 and s.depth_per_factor == 2
    assert [st.factor for st in s.steps[8:]] == [3, 3, 2, 2, 1, 1]  # D_3 first: next-detail
    assert all((st.h, st.w) == (16, 16) for st in s.steps[8:])
    assert s.seq_len == sum(p * p for p in (1, 2, 3, 4, 6, 8, 12, 16)) + 6 * 256
    assert TokenSchedule.from_counts((1, 2, 3, 4, 6, 8, 12, 16), 14, 3) == s


def test_smoke_schedule_and_offsets():
    s = TokenSchedule.cart((1, 2, 4, 8), 3, 1)
    assert s.n_steps == 7 and s.seq_len == 1 + 4 + 16 + 64 * 4
    assert s.offsets == (0, 1, 5, 21, 85, 149, 213, 277)
    lv = s.level_ids()
    for m in range(s.n_steps):
        assert (lv[s.step_slice(m)] == m).all()
    pos = s.positions()
    assert pos.shape == (s.seq_len, 2) and pos.min() > 0 and pos.max() < 1


def test_block_causal_mask_against_naive_definition():
    s = TokenSchedule.cart((1, 2, 4), 2, 2)
    mask = s.attn_mask()
    lv = s.level_ids().tolist()
    for i in range(0, s.seq_len, 7):
        for j in range(s.seq_len):
            assert bool(mask[i, j]) == (lv[j] <= lv[i])
    # every token sees its whole own step (maps are predicted in parallel)
    sl = s.step_slice(3)
    assert mask[sl, sl].all()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: TokenSchedule.from_counts((1, 2, 4, 8), 9, 3), "cannot be split evenly"),
        (lambda: TokenSchedule.var((1, 4, 2)), "largest scale last"),
        (lambda: TokenSchedule.var(()), "zero steps"),
        (lambda: TokenSchedule.cart((1, 2, 4), 2, 0), "at least one step"),
        (lambda: TokenSchedule.cart((), 2, 1), "empty"),
        (lambda: TokenSchedule.from_counts((1, 2), 3, 0), "order 0"),
    ],
)
def test_invalid_schedules_are_refused_with_the_reason(make, needle):
    with pytest.raises(ScheduleError, match=needle):
        make()


def test_from_config_maps_the_three_quantizers():
    cfg = TokenizerConfig(base_patch_nums=(1, 2, 4, 8), depth_per_factor=2)
    assert TokenSchedule.from_config(cfg, 3).n_steps == 4 + 6
    ms = TokenizerConfig(quantizer="multiscale", base_patch_nums=(1, 2, 4, 8))
    assert TokenSchedule.from_config(ms, 3) == TokenSchedule.var((1, 2, 4, 8))
    va = TokenizerConfig(quantizer="vanilla", base_patch_nums=(1, 2, 4, 8))
    assert TokenSchedule.from_config(va, 0) == TokenSchedule.var((8,))
    # order 0 base-detail is multi-scale
    assert TokenSchedule.from_config(cfg, 0) == TokenSchedule.var((1, 2, 4, 8))


def test_mask_dtype_and_device():
    m = TokenSchedule.var((1, 2)).attn_mask("cpu")
    assert m.dtype == torch.bool and m.shape == (5, 5)
