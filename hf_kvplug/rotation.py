"""The key rotation of quantized caches: a scaled signed Hadamard matrix `R [head_dim, head_dim]`, `R R^T = g I`.

Trained LLMs' keys carry a few outlier channels (in SmolLM2 the largest channel's rms is 4-13x the median's); a
per-token INT8 / INT4 scale then spends its range on them and rounds every other channel coarsely. Rotating keys and
queries by the same orthogonal R leaves every score unchanged, `(q R) . (k R) / g = q R R^T k^T / g = q . k`, and
spreads an outlier over all channels, so the scale fits the bulk. A quantized PlugCache therefore stores `k R` and
attends with `q R` and the softmax scale / g (the layer does both, outside the kernels, which see ordinary keys and
queries); `PlugLayer.keys` rotates back. Values are not rotated:
they carry no such outliers, and rotating them would need the output rotated back.

R = diag(s) H 2^-e per block of b channels, H the Sylvester Hadamard matrix of order b (b: the largest power of two
dividing head_dim), s fixed signs (a seeded draw, the same on every process and release: the stored keys depend on
it, so a file names `VERSION`), e = ceil(log2(b) / 2). Its entries are +-2^-e, exact in every float dtype, so a
matmul in the model dtype rounds once; R R^T = g I with g = b / 4^e, 1 or 1/2, and the layers divide the softmax
scale by g (a power of two: exact) so that scores are q . k exactly as without the rotation. Measured on SmolLM2-135M
in docs/int4.md.
"""

from __future__ import annotations

import torch

VERSION = "signed-hadamard/1"
_SEED = 20261206


def hadamard(order: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of `order` (a power of two), entries +-1, fp32."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {order}")
    h = torch.ones(1, 1)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _block(head_dim: int) -> tuple[int, int]:
    """(b, e): the Hadamard blocks' order and the power of two their entries are scaled by."""
    block = head_dim & -head_dim  # the largest power of two dividing head_dim
    return block, (block.bit_length()) // 2  # ceil(log2(b) / 2) for a power of two b


def key_rotation(head_dim: int) -> torch.Tensor:
    """`R [head_dim, head_dim]` fp32 on the CPU, entries 0 or +-2^-e, `R R^T = rotation_gain(head_dim) I`:
    block-diagonal signed Hadamard."""
    block, e = _block(head_dim)
    h = hadamard(block) * 2.0 ** -e
    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(_SEED)).float() * 2 - 1
    return signs[:, None] * torch.block_diag(*[h] * (head_dim // block))


def rotation_gain(head_dim: int) -> float:
    """g with `R R^T = g I` (1 or 1/2): scores of rotated queries and keys are g times q . k."""
    block, e = _block(head_dim)
    return block / 4.0 ** e
