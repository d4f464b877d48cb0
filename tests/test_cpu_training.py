"""CPU training speed-ups: bulk-drawn dropout, attention kernel choice, frozen weight casts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anglekit.cpu_training import (
    MATH_ATTENTION_MAX_TOKENS,
    FastDropout,
    FrozenWeightCasts,
    attention_kernels,
    use_fast_dropout,
)


def test_fast_dropout_drops_at_rate_p_and_keeps_the_mean() -> None:
    """Over a million elements the dropped share is p and the output mean stays the input's."""
    drop = FastDropout(0.1).train()
    torch.manual_seed(0)
    out = drop(torch.ones(1000, 1000))
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.002
    assert torch.allclose(out[kept], out[kept][0])  # one scale for every kept element
    assert abs(out.mean().item() - 1.0) < 0.005


def test_fast_dropout_masks_follow_the_torch_seed() -> None:
    """The same torch seed gives the same mask; another seed another mask."""
    drop = FastDropout(0.5).train()
    x = torch.ones(64, 64)
    torch.manual_seed(1)
    first = drop(x)
    torch.manual_seed(1)
    again = drop(x)
    torch.manual_seed(2)
    other = drop(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_fast_dropout_backward_uses_the_forward_mask() -> None:
    """The input gradient is the upstream gradient times the same scaled mask."""
    drop = FastDropout(0.3).train()
    x = torch.randn(32, 48, requires_grad=True)
    upstream = torch.randn(32, 48)
    torch.manual_seed(3)
    out = drop(x)
    (out * upstream).sum().backward()
    scale = out[out != 0][0] / x.detach()[out != 0][0]
    expected = upstream * (out != 0) * scale
    assert torch.allclose(x.grad, expected, atol=1e-6)


def test_fast_dropout_is_identity_in_eval_and_at_p0_and_zero_at_p1() -> None:
    """Eval mode and p=0 pass the input through; p=1 drops everything."""
    x = torch.randn(8, 16)
    assert torch.equal(FastDropout(0.4).eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.count_nonzero(FastDropout(1.0).train()(x)) == 0


def test_fast_dropout_in_bf16_keeps_the_dtype() -> None:
    """A bf16 input gives a bf16 output, dropped at rate p."""
    out = FastDropout(0.25).train()(torch.ones(256, 256, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert abs(1 - (out != 0).float().mean().item() - 0.25) < 0.01


def test_fast_dropout_leaves_other_devices_to_torch() -> None:
    """Off CPU (here the meta device) it is torch's dropout: no mask is drawn from numpy."""
    out = FastDropout(0.1).train()(torch.empty(4, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 4)


def test_checkpoint_recomputation_draws_the_same_masks() -> None:
    """Under activation checkpointing the recomputed dropout equals the original, so the
    gradients equal those of the plain forward."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 16), FastDropout(0.5), nn.Tanh(), nn.Linear(16, 4))
    block.train()
    x = torch.randn(8, 16)

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        block.zero_grad()
        torch.manual_seed(7)
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            out = block(x)
        out.pow(2).sum().backward()
        return [p.grad.clone() for p in block.parameters()]

    for plain, recomputed in zip(grads(False), grads(True), strict=True):
        assert torch.equal(plain, recomputed)


def test_use_fast_dropout_replaces_every_dropout_of_a_bert(tiny_bert) -> None:
    """Every nn.Dropout of a BERT becomes a FastDropout of the same p; eval outputs are
    unchanged."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert).eval()
    ps = [m.p for m in model.modules() if type(m) is nn.Dropout]
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    before = model(input_ids=ids).last_hidden_state
    assert use_fast_dropout(model) == len(ps) > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert [m.p for m in model.modules() if isinstance(m, FastDropout)] == ps
    assert torch.equal(model(input_ids=ids).last_hidden_state, before)


def test_attention_kernels_pick_math_only_for_short_bf16_cpu_batches() -> None:
    """Short bf16 CPU batches disable the fused kernels; anything else leaves torch's choice."""
    assert torch.backends.cuda.flash_sdp_enabled()
    with attention_kernels(torch.device("cpu"), True, MATH_ATTENTION_MAX_TOKENS):
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    for device, bf16, length in [
        ("cpu", False, 32),
        ("cpu", True, MATH_ATTENTION_MAX_TOKENS + 1),
        ("cuda", True, 32),
    ]:
        with attention_kernels(torch.device(device), bf16, length):
            assert torch.backends.cuda.flash_sdp_enabled()


def test_frozen_weight_casts_match_autocast_and_restore_the_weights() -> None:
    """Inside the block frozen linear weights are bf16 and outputs under autocast are
    bit-identical; trainable weights are untouched; afterwards the originals are back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model[0].requires_grad_(False)
    original = model[0].weight.data
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    casts = FrozenWeightCasts(model)
    with casts.swapped_in():
        assert model[0].weight.dtype == torch.bfloat16
        assert model[2].weight.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    assert torch.equal(got, expected)
    assert model[0].weight.dtype == torch.float32
    assert model[0].weight.data_ptr() == original.data_ptr()


def test_frozen_weight_casts_restore_after_an_error() -> None:
    """An exception inside the block still puts the full-precision weights back."""
    model = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(RuntimeError), FrozenWeightCasts(model).swapped_in():
        raise RuntimeError("step failed")
    assert model.weight.dtype == torch.float32
