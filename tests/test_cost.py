"""Parameter and MAC counts against numbers worked out by hand, and against torch's own counter."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from profiling.cost.counting import count_macs, count_params, file_size_mb


def toy_net() -> nn.Sequential:
    """A convolution, a depthwise convolution (as in MobileNet) and a linear layer, on 3x10x10 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(8 * 10 * 10, 5),
    )


# Batch 2 at 10x10 (padding keeps the size); a multiply-add counts once, biases are not counted.
TOY_MACS = {
    "conv": 2 * 8 * 10 * 10 * (3 * 3 * 3)  # every output: 3 input channels x 3x3 kernel
    + 2 * 8 * 10 * 10 * (1 * 3 * 3),  # depthwise: one input channel per output
    "linear": 2 * 800 * 5,
}


def test_count_params_by_hand() -> None:
    assert count_params(toy_net()) == (3 * 8 * 9 + 8) + (8 * 9 + 8) + (800 * 5 + 5)


def test_shared_parameters_count_once() -> None:
    shared = nn.Linear(4, 4)
    assert count_params(nn.Sequential(shared, nn.ReLU(), shared)) == 4 * 4 + 4


def test_toy_net_macs_by_hand() -> None:
    count = count_macs(toy_net(), torch.randn(2, 3, 10, 10))
    assert count.by_operator == TOY_MACS
    assert count.macs == sum(TOY_MACS.values()) == 65_600
    assert count.flops == 2 * 65_600
    assert count.skipped == {"aten::gelu": 1}  # fvcore does not count activations: listed, not hidden


def test_toy_net_agrees_with_torch_flop_counter() -> None:
    model, x = toy_net().eval(), torch.randn(2, 3, 10, 10)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() % 2 == 0
    assert count_macs(model, x).macs == counter.get_total_flops() // 2


def test_count_macs_restores_training_mode() -> None:
    model = toy_net().train()
    count_macs(model, torch.randn(1, 3, 10, 10))
    assert model.training


class Attention(nn.Module):
    """Calls SDPA directly, or spells out the same products, so both paths can be counted."""

    def __init__(self, fused: bool, gqa: bool = False) -> None:
        super().__init__()
        self.fused, self.gqa = fused, gqa

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=self.gqa)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return weights @ v


def test_sdpa_with_other_value_dim_and_lengths() -> None:
    # batch 2, 4 heads, query length 5, key/value length 7, qk dim 8, value dim 16
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 16)
    by_hand = 2 * 4 * 5 * 7 * 8 + 2 * 4 * 5 * 7 * 16  # QKᵀ + AV
    fused = count_macs(Attention(fused=True), (q, k, v))
    assert fused.by_operator == {"scaled_dot_product_attention": by_hand}
    assert fused.skipped == {}
    assert count_macs(Attention(fused=False), (q, k, v)).by_operator == {"matmul": by_hand}


def test_sdpa_grouped_query_counts_every_query_head() -> None:
    q, kv = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 7, 8)  # 4 query heads share 2 key/value heads
    assert count_macs(Attention(fused=True, gqa=True), (q, kv, kv)).macs == 1 * 4 * 5 * 7 * (8 + 8)


def tiny_vit(fused: bool) -> nn.Module:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2
    )
    for block in model.blocks:
        block.attn.fused_attn = fused  # per module: timm.layers.set_fused_attn would change a global
    return model


def test_vit_attention_is_counted() -> None:
    batch, tokens, width, depth, heads, classes = 2, (32 // 8) ** 2 + 1, 64, 2, 2, 1000
    x = torch.randn(batch, 3, 32, 32)
    fused = count_macs(tiny_vit(fused=True), x)
    explicit = count_macs(tiny_vit(fused=False), x)

    attention = depth * 2 * batch * heads * tokens * tokens * (width // heads)  # 2·B·H·L·S·D per block
    assert fused.by_operator["scaled_dot_product_attention"] == attention
    assert explicit.by_operator["matmul"] == attention
    assert fused.macs == explicit.macs

    # the rest by hand: patch embedding, qkv + proj + MLP (12·E² per token per block), head on the cls token
    assert fused.by_operator["conv"] == batch * 16 * width * 3 * 8 * 8
    assert fused.by_operator["linear"] == depth * batch * tokens * 12 * width**2 + batch * width * classes
    assert fused.macs == attention + sum(v for k, v in fused.by_operator.items() if k != "scaled_dot_product_attention")
    assert "aten::scaled_dot_product_attention" not in fused.skipped
    assert explicit.skipped["aten::softmax"] == depth  # counted by neither path, listed by both
    assert "aten::softmax" not in fused.skipped


def test_file_size_mb(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 2_500_000)
    assert file_size_mb(path) == pytest.approx(2.5)
