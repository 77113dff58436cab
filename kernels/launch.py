"""The launchers' entry points: one query runs the split-KV decode kernel, more run write + extend."""

from . import decode_attn, extend_attn, write_kv
from .write_kv import write_kvcache

__all__ = ["attend_with_kvcache", "write_kvcache"]


def attend_with_kvcache(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts,
                        cache_valid, status, softmax_scale, window, causal=True, right=-1, alibi_slopes=None,
                        softcap=0.0, lse=None, num_splits=None, k_tail=None, v_tail=None):
    # k, v [B, n_new, nheads_k, D]: n_new == q_len in the model's forwards; 0 attends only (semantics: reference.py).
    # right, alibi_slopes, softcap, lse [B, nheads, q_len] (written), num_splits (one query; None: the launcher's
    # choice): flash_attn_with_kvcache's options (hf_kvplug.flash)
    # k_tail, v_tail [max_batch, nheads_k, BLOCK_SIZE, D] (int4 caches), or None / 0 elements: the exact tail, rule 4
    q_len, n_new = q.shape[1], k.shape[1]
    if q_len == 1 and n_new <= 1:  # one query: the split-KV decode kernel (writes the new token in the same pass)
        return decode_attn.decode_attn(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens,
                                       cache_starts, cache_valid, status, softmax_scale, window, num_splits=num_splits,
                                       alibi_slopes=alibi_slopes, softcap=softcap,
                                       lse=None if lse is None else lse[:, :, 0], k_tail=k_tail, v_tail=v_tail)
    write_kv.write_kvcache(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status, k_tail, v_tail)
    # the extend kernel places query i at slot seqlens[b] + i: shift the rows so the queries end with the new tokens
    seqlens = cache_seqlens if n_new == q_len else cache_seqlens + (n_new - q_len)
    return extend_attn.extend_attn(q, k_cache, v_cache, k_scale, v_scale, block_table, seqlens, cache_starts,
                                   cache_valid, softmax_scale, window, causal=causal, new_lo=q_len - n_new,
                                   right=right, alibi_slopes=alibi_slopes, softcap=softcap, lse=lse, k_tail=k_tail,
                                   v_tail=v_tail)
