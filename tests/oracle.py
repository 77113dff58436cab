"""The tests' fp64 oracle: dense attention in float64 written from its definition, apart from the code it checks."""

from __future__ import annotations

import torch


def attend_fp64_ref(q, keys, values, seen, softmax_scale):
    """Oracle for tests: dense fp64 attention of `q [B, L, H, D]` over row-contiguous `keys/values [B, Hk, T, D]`,
    token i of row b seeing the slots where `seen [B, L, T]` is True (`visible_slots`); a token that sees none: 0."""
    b, L, h, d = q.shape
    hk = keys.shape[1]
    qf = q.double().transpose(1, 2)  # [B, H, L, D]
    kf = keys.double().repeat_interleave(h // hk, dim=1)
    vf = values.double().repeat_interleave(h // hk, dim=1)
    hidden = ~seen.any(1)[:, None, :, None]  # what no token sees may hold anything (NaN included): never read
    kf, vf = kf.masked_fill(hidden, 0), vf.masked_fill(hidden, 0)
    scores = qf @ kf.transpose(-1, -2) * softmax_scale  # [B, H, L, T]
    scores = scores.masked_fill(~seen.unsqueeze(1), float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # rows that see nothing: 0
    return (probs @ vf).transpose(1, 2)
