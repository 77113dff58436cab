"""Triton kernels and their launchers (installed as `hf_kvplug.kernels`): cache write, fused decode, extend."""

import triton  # noqa: F401  (ImportError here makes hf_kvplug fall back to the reference)

from . import decode_attn, extend_attn, write_kv
from .write_kv import write_kvcache

__all__ = ["attend_with_kvcache", "write_kvcache"]


def attend_with_kvcache(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts,
                        cache_valid, status, softmax_scale, window):
    if q.shape[1] == 1:
        return decode_attn.decode_attn(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens,
                                       cache_starts, cache_valid, status, softmax_scale, window)
    write_kv.write_kvcache(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, status)
    return extend_attn.extend_attn(q, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts,
                                   cache_valid, softmax_scale, window)
