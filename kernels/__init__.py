"""Triton kernels and their launchers (installed as `hf_kvplug.kernels`). Filled in by the kernel work."""

import triton  # noqa: F401  (ImportError here makes hf_kvplug fall back to the reference)


def attend_with_kvcache(q, k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, cache_starts,
                        softmax_scale, window):
    raise NotImplementedError


def write_kvcache(k, v, k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens):
    raise NotImplementedError
