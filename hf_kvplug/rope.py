"""The one-pass RoPE of a plugged decode step: Llama's rotary embedding applied to q and k together, with the bits of
the modeling module's `apply_rotary_pos_emb` in fewer ops, where the patcher has seen that function give them
(`probe`). The tables it multiplies by are made once per forward (`DeviceState.rope_tables`)."""

from __future__ import annotations

import sys

import torch


def tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `one_pass` multiplies by, from the position embeddings `cos, sin [B, L, D]` every layer of a forward
    gets: `(cos [B, L, 1, D], sin with its first half negated [B, L, 1, D])`."""
    half = sin.shape[-1] // 2
    return cos.unsqueeze(2), torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(2)


def one_pass(q, k, cos, sin_signed) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's RoPE, `x * cos + rotate_half(x) * sin`, on `q [B, L, nheads, D]` and `k [B, L, nheads_k, D]` in one
    pass over both, with the tables `cos, sin_signed [B, L, 1, D]` of `tables`: `(q, k)` in the same layouts,
    views of one tensor. `rotate_half(x) * sin` is `cat(-x2, x1) * sin`; here the halves are swapped by a roll and
    the sign sits in the table, `x2 * -s1` where stock has `-x2 * s1`: the same bits (a product's sign is the
    operands' and its rounding symmetric), as is every other operation. 7 aten calls (the roll one) where calling
    `apply_rotary_pos_emb` takes 19 with its transposes (and, from transformers 5.25, a hub-kernel dispatch around
    it, which runs the same function outside a kernelized model's own forward, as in the plugged one)."""
    nheads = q.shape[2]
    qk = torch.cat((q, k), 2)
    qk = qk * cos + qk.roll(q.shape[-1] // 2, -1) * sin_signed
    return qk[:, :, :nheads], qk[:, :, nheads:]


def rotated_table(cos: torch.Tensor, sin_signed: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """`M [B, D, D]` fp32 with `x @ M = one_pass(x) @ rotation` (to fp32 rounding) for one position a row, from the
    tables `cos, sin_signed [B, 1, 1, D]` of `tables` and a quantized cache's key rotation `R [D, D]`: one_pass is
    `x @ A`, `A = diag(cos) + roll(I, D/2, 1) diag(sin_signed)`, so `M = A R`, whose row i is `cos_i R_i + sin_j
    R_j` with `j = (i + D/2) mod D`. `one_pass_rotated` applies it."""
    batch, dim = cos.shape[0], cos.shape[-1]
    r = rotation.to(torch.float32)
    scaled = sin_signed.reshape(batch, dim, 1).to(torch.float32) * r
    return cos.reshape(batch, dim, 1).to(torch.float32) * r + scaled.roll(-(dim // 2), 1)


def one_pass_rotated(q, k, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`one_pass` followed by a quantized cache's key rotation (`DeviceState.rotate`) of `q [B, 1, nheads, D]` and
    `k [B, 1, nheads_k, D]`, in one product with `m [B or 1, D, D]` (`rotated_table`), computed in fp32 and rounded
    to the model dtype once, where the two steps round twice: `(q R, k R)` in the same layouts, views of one
    tensor. 4 aten calls (6 in half precision) where RoPE and rotation take 7 and 12."""
    batch, q_len, nheads, dim = q.shape
    qk = torch.cat((q, k), 2).view(batch, -1, dim)
    qk = qk if qk.dtype == torch.float32 else qk.to(torch.float32)
    out = torch.mm(qk.view(-1, dim), m[0]) if m.shape[0] == 1 else torch.bmm(qk, m)
    out = out.to(q.dtype).view(batch, q_len, -1, dim)
    return out[:, :, :nheads], out[:, :, nheads:]


def probe(module):
    """`(apply_rotary_pos_emb, rotate_half)` of the modeling module if a plugged decode step of attention `module`
    may apply its RoPE in one pass (`one_pass`): its family's RoPE is Llama's over the whole head
    (`Family.whole_head_rope`) and, tried here on random vectors in fp32, bf16 and fp16, it gives the same bits as
    the one pass. Else None: the step calls it as stock does. (The step checks that the module still holds both
    functions: a RoPE, or a `rotate_half`, swapped in later is called as stock calls it.)"""
    modeling = sys.modules[type(module).__module__]
    fn, rotate_half = getattr(modeling, "apply_rotary_pos_emb", None), getattr(modeling, "rotate_half", None)
    head_dim = getattr(module, "head_dim", None)
    if not module._kvplug_family.whole_head_rope or fn is None or rotate_half is None or not head_dim:
        return None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            q, k = torch.randn(2, 1, 3, head_dim, generator=g), torch.randn(2, 1, 2, head_dim, generator=g)
            cos, sin = torch.randn(2, 1, head_dim, generator=g), torch.randn(2, 1, head_dim, generator=g)
            q, k, cos, sin = (x.to(dtype) for x in (q, k, cos, sin))
            want_q, want_k = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            got_q, got_k = one_pass(q, k, *tables(cos, sin))
            if not (torch.equal(want_q.transpose(1, 2), got_q) and torch.equal(want_k.transpose(1, 2), got_k)):
                return None
    return fn, rotate_half
