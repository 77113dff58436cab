"""Host-side launch helpers shared by the launchers: sizes, device queries, layout checks, how a kernel is launched."""

import contextlib
import functools
import os

import torch

INTERPRET_SM_COUNT = 4  # the CPU interpreter has no SMs; small, so that tests still see several splits


def cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv costs microseconds per host call (a JIT function); launchers run every step


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_SM_COUNT
    return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())


def device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def launcher(kernel):
    if is_interpreter():  # nothing to trace on the CPU interpreter, and Triton < 3.7 gives it no JITFunction to wrap
        return kernel
    return torch.library.wrap_triton(kernel)


def upcast_dot(dtype: torch.dtype) -> bool:
    # The triton interpreter computes bf16 tl.dot wrongly: upcast the operands to fp32 there.
    return is_interpreter() and dtype == torch.bfloat16


def check_cache(k_cache, v_cache, k_scale, v_scale, block_table, cache_seqlens, nheads_k, head_dim):
    """Asserts the paged layout (hf_kvplug/reference.py); returns the format: "fp", "int8" or "int4"."""
    kind = {torch.int8: "int8", torch.uint8: "int4"}.get(k_cache.dtype, "fp")
    width = head_dim // 2 if kind == "int4" else head_dim
    assert k_cache.dim() == 4 and k_cache.shape[1] == nheads_k and k_cache.shape[3] == width, k_cache.shape
    assert v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype
    assert k_cache.stride(-1) == 1 and v_cache.stride() == k_cache.stride(), "caches: contiguous last dim, same strides"
    assert block_table.dtype == torch.int32 and block_table.dim() == 2 and block_table.stride(1) == 1
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.dim() == 1 and cache_seqlens.stride(0) == 1
    if kind == "int8":
        assert k_scale.dtype == torch.float32 and k_scale.shape == k_cache.shape[:3], k_scale.shape
    if kind == "int4":
        assert k_scale.dtype == torch.float16 and k_scale.shape == (*k_cache.shape[:3], 4), k_scale.shape
        assert k_scale.stride(-1) == 1
    if kind != "fp":
        assert v_scale.shape == k_scale.shape and v_scale.stride() == k_scale.stride()
    return kind


def check_valid(cache_valid, batch: int) -> bool:
    """True when a slot mask is given: `[>= batch, max_len]` uint8 with a contiguous last dim."""
    if cache_valid.numel() == 0:
        return False
    assert cache_valid.dtype == torch.uint8 and cache_valid.dim() == 2 and cache_valid.stride(1) == 1
    assert cache_valid.shape[0] >= batch, cache_valid.shape
    return True


def scale_strides(k_scale, quantized: bool):
    return tuple(k_scale.stride()[:3]) if quantized else (0, 0, 0)


def check_tail(k_tail, v_tail, kind: str, batch: int, nheads_k: int, block_size: int, head_dim: int, dtype) -> bool:
    """True when an exact tail is given (None or 0 elements: none): `[>= batch, nheads_k, block_size, head_dim]` in
    the model dtype with a contiguous last dim, v_tail laid out as k_tail. Only int4 caches keep one."""
    if k_tail is None or k_tail.numel() == 0:
        assert v_tail is None or v_tail.numel() == 0, "k_tail and v_tail: both given, or neither"
        return False
    if kind != "int4":
        raise NotImplementedError(f"the exact tail (k_tail, v_tail) is implemented for int4 caches only, not {kind}")
    assert k_tail.dim() == 4 and k_tail.shape[0] >= batch, (k_tail.shape, batch)
    assert tuple(k_tail.shape[1:]) == (nheads_k, block_size, head_dim), (k_tail.shape, nheads_k, block_size, head_dim)
    assert k_tail.dtype == dtype and k_tail.stride(-1) == 1, "k_tail: the model dtype, contiguous last dim"
    assert v_tail is not None and v_tail.shape == k_tail.shape and v_tail.dtype == dtype
    assert v_tail.stride() == k_tail.stride(), "v_tail: laid out as k_tail"
    return True


def tail_args(k_tail, v_tail, has_tail: bool, fill) -> tuple:
    """The tail's kernel arguments: both pointers and the strides of row, head and slot; without a tail, `fill`
    stands in for the pointers (never read), so no tensor is allocated per call."""
    if not has_tail:
        return (fill, fill, 0, 0, 0)
    return (k_tail, v_tail, *k_tail.stride()[:3])

