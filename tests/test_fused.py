"""The fused-kernel inference path (``pvt.layers.fused``): same outputs, and taken only where
nothing can tell the difference."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

import pvt
from pvt.layers import fused

pytestmark = pytest.mark.skipif(not fused.AVAILABLE, reason="this torch build has no oneDNN fused ops")


@contextmanager
def count_fused_calls() -> Iterator[list[int]]:
    """Counts the blocks that took the fused path (one ``linear_add`` per attention and MLP)."""
    calls = [0]
    original = fused.linear_add

    def counting(x: Tensor, layer: nn.Linear, residual: Tensor) -> Tensor:
        calls[0] += 1
        return original(x, layer, residual)

    fused.linear_add = counting  # type: ignore[assignment]
    try:
        yield calls
    finally:
        fused.linear_add = original  # type: ignore[assignment]


def blocks(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if type(m).__name__ == "Block")


# v1 (GELU in fc1's epilogue), v2 (GELU in the depthwise conv's), v2-li (ReLU in fc1's, linear SRA).
@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0", "pvt_v2_b2_li"])
def test_fused_path_matches_plain_ops(name: str) -> None:
    torch.manual_seed(0)
    model = pvt.create_model(name).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        previous = fused.set_enabled(False)
        try:
            plain = model(x)
            plain_feats = model.forward_intermediates(x, intermediates_only=True)
        finally:
            fused.set_enabled(previous)
        with count_fused_calls() as calls:
            out = model(x)
            feats = model.forward_intermediates(x, intermediates_only=True)
    assert calls[0] == 2 * 2 * blocks(model), "every block should take the fused path, twice"
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    for f, p in zip(feats, plain_feats, strict=True):
        torch.testing.assert_close(f, p, rtol=0, atol=1e-5)
        assert f.is_contiguous()


def test_fused_path_not_taken_where_it_could_be_noticed() -> None:
    model = pvt.create_model("pvt_v2_b0").eval()
    x = torch.randn(1, 3, 64, 64)
    with count_fused_calls() as calls:
        model(x)  # autograd on: training needs the modules' own backward
        model.train()
        with torch.no_grad():
            model(x)  # train mode: dropout / drop path must run
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)  # autocast picks dtypes per op
        previous = fused.set_enabled(False)
        with torch.no_grad():
            model(x)
        fused.set_enabled(previous)
        seen: list[tuple[int, ...]] = []
        handle = model.block1[0].mlp.fc1.register_forward_hook(  # type: ignore[index, union-attr]
            lambda m, args, out: seen.append(tuple(out.shape))
        )
        with torch.no_grad():
            model(x)  # a hook on fc1 must see fc1 run as a module
        handle.remove()
        assert calls[0] == 2 * (blocks(model) - 1), "only the hooked block should fall back"
        assert seen == [(1, 256, 256)]
        with torch.no_grad():
            model(x)
    assert calls[0] == 2 * (2 * blocks(model) - 1)


def test_complexity_counts_every_layer_under_the_fused_path() -> None:
    """``pvt.complexity`` hooks every module, so it sees the plain layers (same count either way)."""
    model = pvt.create_model("pvt_v2_b0").eval()
    with_fused = pvt.complexity(model, (3, 224, 224))
    previous = fused.set_enabled(False)
    try:
        plain = pvt.complexity(model, (3, 224, 224))
    finally:
        fused.set_enabled(previous)
    assert with_fused.gmacs == pytest.approx(plain.gmacs, rel=0)
    assert with_fused.gmacs == pytest.approx(0.57, abs=0.02)


def test_traced_graph_has_standard_ops_only() -> None:
    """Exporters (``torch.jit.trace``, ONNX) must not see the oneDNN-only ops."""
    model = pvt.create_model("pvt_v2_b0").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-5)
    graph = str(traced.inlined_graph)
    assert "aten::linear" in graph and "mkldnn::" not in graph


def plain_forward(model: nn.Module, x: Tensor) -> Tensor:
    previous = fused.set_enabled(False)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        fused.set_enabled(previous)


def test_packed_weights_follow_the_weights() -> None:
    """The prepacked copies are refreshed whenever the weights or the input size change, so the
    fused path never runs on stale weights."""
    torch.manual_seed(0)
    model = pvt.create_model("pvt_v2_b0", num_classes=10).eval()
    other = pvt.create_model("pvt_v2_b0", num_classes=10).eval()
    x, y = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain_forward(model, x), rtol=0, atol=1e-5)
        assert len(fused._packed) > 0
        torch.testing.assert_close(model(y), plain_forward(model, y), rtol=0, atol=1e-5)  # another size: convs repack
        model.load_state_dict(other.state_dict())  # copies into the same tensors (new versions)
        torch.testing.assert_close(model(x), plain_forward(other, x), rtol=0, atol=1e-5)
        for p in model.parameters():
            p.mul_(0.9)  # in place under no_grad, like an EMA update
        torch.testing.assert_close(model(x), plain_forward(model, x), rtol=0, atol=1e-5)
        assert not torch.allclose(model(x), other(x), atol=1e-3)
        # `.data` edits are invisible to torch's version counter; eval() drops the packs.
        model.block1[0].mlp.fc2.weight.data.zero_()  # type: ignore[index, union-attr]
        model.eval()
        assert not any(p in fused._packed for p in model.parameters())
        torch.testing.assert_close(model(x), plain_forward(model, x), rtol=0, atol=1e-5)


def test_packing_can_be_turned_off() -> None:
    torch.manual_seed(0)
    model = pvt.create_model("pvt_v2_b0", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        packed = model(x)
        previous = fused.set_packing(False)
        try:
            assert len(fused._packed) == 0
            unpacked = model(x)
            assert len(fused._packed) == 0
        finally:
            fused.set_packing(previous)
    torch.testing.assert_close(unpacked, packed, rtol=0, atol=1e-5)
    torch.testing.assert_close(unpacked, plain_forward(model, x), rtol=0, atol=1e-5)


def test_packed_weights_follow_an_ema_update() -> None:
    """The trainer's EMA (``AveragedModel``) updates its weights in place between evaluations."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = pvt.create_model("pvt_v2_b0", num_classes=10)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    ema.module.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ema.module(x)  # packs
        for p in model.parameters():
            p.add_(0.01)
        ema.update_parameters(model)
        ema.update_parameters(model)
        torch.testing.assert_close(ema.module(x), plain_forward(ema.module, x), rtol=0, atol=1e-5)
