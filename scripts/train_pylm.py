"""Train `pylm`, the small Llama (GQA) that `hf-kvplug demo` and `hf-kvplug quality` use, from the local Python
standard library's own source, deterministically from a seed, on the CPU.

Data: every `.py` file under `sysconfig.get_paths()["stdlib"]` (sorted by relative path; test suites, site-packages
and files that are not UTF-8 left out), one document per file. Files whose crc32(relative path) % 20 == 0 are held
out for evaluation (by file, never by token). The text therefore depends on the Python release that runs the script;
the model card records which one.

Tokenizer: byte-level BPE trained with `tokenizers` on the training files only; `<|endoftext|>` separates documents
and the tokenizer puts it in front of every text it encodes (so a prompt starts the way a file does).

Model: `LlamaConfig` with grouped-query attention, trained on windows of `seq_len` tokens drawn from the
concatenated training documents (window offsets from a generator seeded with (seed, step), so a resumed run draws
what an uninterrupted one would). AdamW, linear warm-up, cosine decay. Prints the held-out loss every `eval_every`
steps; keeps a resumable checkpoint in `--work`; writes the final checkpoint (fp16 weights, config asking for fp32,
tokenizer, generation config, model card) to `--out`.

    OMP_NUM_THREADS=1 python scripts/train_pylm.py --out hf_kvplug/tools/pylm --work /tmp/pylm-work
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from hf_kvplug.tools.pylm import is_heldout, stdlib_files

EOT = "<|endoftext|>"


@dataclass
class TrainConfig:
    seed: int = 0
    vocab_size: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768
    seq_len: int = 1024
    batch: int = 8  # windows per step
    steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_windows: int = 24  # held-out windows of seq_len tokens, evenly spaced over the held-out stream
    checkpoint_every: int = 25
    heldout_modulus: int = 20
    rope_theta: float = 10000.0
    bf16_autocast: bool = True


# ------------------------------------------------------------------------------------------------ data

def split_files(cfg: TrainConfig):
    files = stdlib_files()
    train = [(p, t) for p, t in files if not is_heldout(p, cfg.heldout_modulus)]
    heldout = [(p, t) for p, t in files if is_heldout(p, cfg.heldout_modulus)]
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE as a `PreTrainedTokenizerFast` that prefixes every encoded text with `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    eot = tok.token_to_id(EOT)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, eot)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   model_max_length=1 << 30)


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All documents, each preceded by `<|endoftext|>`, as one uint16 stream."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids])


def unigram_loss(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `targets` under add-one-smoothed unigram frequencies of `train`."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[targets].mean())


def eval_windows(heldout: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    """[eval_windows, seq_len + 1] evenly spaced held-out windows."""
    n = cfg.seq_len + 1
    starts = np.linspace(0, len(heldout) - n, cfg.eval_windows).astype(np.int64)
    return torch.from_numpy(np.stack([heldout[s:s + n] for s in starts]).astype(np.int64))


def train_batch(stream: np.ndarray, cfg: TrainConfig, step: int) -> torch.Tensor:
    """[batch, seq_len + 1] windows at offsets drawn from a generator seeded with (seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - cfg.seq_len - 1, (cfg.batch,), generator=g).numpy()
    return torch.from_numpy(np.stack([stream[s:s + cfg.seq_len + 1] for s in starts]).astype(np.int64))


# ------------------------------------------------------------------------------------------------ model

def build_model(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.seq_len,
                         rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                         tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def loss_of(model, batch: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of `batch [B, seq_len + 1]`."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, cfg: TrainConfig, fp32: bool = False) -> float:
    model.eval()
    run = dataclasses.replace(cfg, bf16_autocast=cfg.bf16_autocast and not fp32)
    total = sum(float(loss_of(model, windows[i:i + 4], run)) * len(windows[i:i + 4])
                for i in range(0, len(windows), 4))
    model.train()
    return total / len(windows)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# ------------------------------------------------------------------------------------------------ run

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the final checkpoint")
    p.add_argument("--work", required=True, help="directory of the resumable training checkpoint and history")
    for f in dataclasses.fields(TrainConfig):
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if f.type in ("bool", bool) else type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    args = p.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.makedirs(args.work, exist_ok=True)
    started = time.time()

    train_files, heldout_files = split_files(cfg)
    tokenizer = train_tokenizer([t for _, t in train_files], cfg.vocab_size)
    train = encode_stream(tokenizer, [t for _, t in train_files])
    heldout = encode_stream(tokenizer, [t for _, t in heldout_files])
    train_bytes = sum(len(t.encode()) for _, t in train_files)
    windows = eval_windows(heldout, cfg)
    uni = unigram_loss(train, windows[:, 1:].flatten().numpy(), len(tokenizer))
    data = dict(python=platform.python_version(), train_files=len(train_files), heldout_files=len(heldout_files),
                train_bytes=train_bytes, train_tokens=int(len(train)), heldout_tokens=int(len(heldout)),
                eval_tokens=int(windows[:, 1:].numel()), bytes_per_token=train_bytes / len(train),
                unigram_heldout_loss=uni)
    log(f"data: {json.dumps(data)}")

    model = build_model(cfg, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params:,} parameters; config {json.dumps(dataclasses.asdict(cfg))}")
    opt = make_optimizer(model, cfg)
    ckpt_path = os.path.join(args.work, "state.pt")
    history: list[dict] = []
    step = 0
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False)
        if state["config"] != dataclasses.asdict(cfg):
            raise SystemExit(f"{ckpt_path} was written with another config; remove it or pass the same arguments")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, history = state["step"], state["history"]
        log(f"resumed at step {step}")
    model.train()
    window_start, tokens_per_step = time.time(), cfg.batch * cfg.seq_len
    while step < cfg.steps:
        if step % cfg.eval_every == 0 and not any(h["step"] == step for h in history):
            history.append(dict(step=step, heldout=heldout_loss(model, windows, cfg), time=time.time() - started))
            log(f"step {step:5d} held-out loss {history[-1]['heldout']:.4f} (unigram {uni:.4f})")
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = loss_of(model, train_batch(train, cfg, step), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        if step % 10 == 0:
            rate = 10 * tokens_per_step / (time.time() - window_start)
            log(f"step {step:5d} train loss {loss.item():.4f} lr {lr_at(step - 1, cfg):.2e} {rate:,.0f} tokens/s")
            window_start = time.time()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            torch.save(dict(config=dataclasses.asdict(cfg), model=model.state_dict(), opt=opt.state_dict(),
                            step=step, history=history), ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
    final_bf16 = heldout_loss(model, windows, cfg)
    history.append(dict(step=step, heldout=final_bf16, time=time.time() - started))
    log(f"step {step:5d} held-out loss {final_bf16:.4f} (unigram {uni:.4f})")
    export(model, tokenizer, cfg, args.out, windows, data, history, params, started)
    return 0


def export(model, tokenizer, cfg: TrainConfig, out: str, windows, data: dict, history: list[dict], params: int,
           started: float) -> None:
    """fp16 weights (config says fp32, so `from_pretrained` upcasts), tokenizer, generation config, card, history."""
    from transformers import GenerationConfig

    model = model.to(torch.float16).to(torch.float32)  # what the shipped fp16 weights give back
    final = heldout_loss(model, windows, cfg, fp32=True)
    log(f"shipped weights (fp16 storage, fp32 compute): held-out loss {final:.4f}")
    model.config.dtype = torch.float32
    os.makedirs(out, exist_ok=True)
    model.half().save_pretrained(out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config["dtype"] = "float32"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, do_sample=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = dict(data=data, config=dataclasses.asdict(cfg), params=params, final_heldout_fp32=final,
                   wall_s=time.time() - started, torch=torch.__version__, history=history)
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(summary, model.config))
    log(f"wrote {out} ({sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)) / 1e6:.2f} MB)")


def model_card(s: dict, config) -> str:
    """The checkpoint's README: data, size, steps, held-out loss against a unigram model, the rebuilding command."""
    d, c = s["data"], s["config"]
    seen = c["steps"] * c["batch"] * c["seq_len"]
    curve = "\n".join(f"| {h['step']} | {h['heldout']:.4f} | {h['time'] / 60:.1f} |" for h in s["history"])
    command = "OMP_NUM_THREADS=1 python scripts/train_pylm.py " + " ".join(sys.argv[1:])
    return f"""# pylm: a {s['params'] / 1e6:.1f}M-parameter Llama trained on the Python standard library

Built by `scripts/train_pylm.py` (hf_kvplug) on the CPU, to give `hf-kvplug demo` and `hf-kvplug quality` a model
whose attention does real work, without a download. It completes Python; it is not a useful assistant.

- **Architecture**: `LlamaForCausalLM`, {config.num_hidden_layers} layers, hidden {config.hidden_size}, MLP \
{config.intermediate_size}, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads (GQA) of \
head_dim {config.hidden_size // config.num_attention_heads}, RoPE theta {c['rope_theta']:g}, tied embeddings, \
context {config.max_position_embeddings}; {s['params']:,} parameters, stored in fp16 (`config.json` asks for fp32,
so `from_pretrained` upcasts; the figures below are for the fp16-rounded weights run in fp32).
- **Tokenizer**: byte-level BPE, {config.vocab_size} tokens, trained with `tokenizers` on the training files;
`<|endoftext|>` (id {config.eos_token_id}) starts every document and every encoded text.
- **Data**: the `.py` files of Python {d['python']}'s standard library (`sysconfig.get_paths()["stdlib"]`, test
suites and site-packages left out), one document per file. Held out by file: crc32(relative path) % \
{c['heldout_modulus']} == 0 → {d['heldout_files']} files, {d['heldout_tokens']:,} tokens; training: \
{d['train_files']} files, {d['train_bytes'] / 1e6:.1f} MB, {d['train_tokens']:,} tokens \
({d['bytes_per_token']:.2f} bytes/token).
- **Training**: {c['steps']} steps x {c['batch']} windows x {c['seq_len']} tokens = {seen / 1e6:.1f}M tokens \
({seen / d['train_tokens']:.1f} epochs), AdamW (lr {c['lr']:g}, betas 0.9/0.95, weight decay {c['weight_decay']:g}, {c['warmup']} warm-up steps, \
cosine to {c['min_lr_ratio']:g} x), grad clip {c['grad_clip']:g}, bf16 autocast = {c['bf16_autocast']}, seed \
{c['seed']}; one CPU thread, {s['wall_s'] / 3600:.2f} h wall, torch {s['torch']}.
- **Held-out loss** ({d['eval_tokens']:,} tokens: {c['eval_windows']} windows of {c['seq_len']}): \
**{s['final_heldout_fp32']:.3f} nats/token** ({s['final_heldout_fp32'] / math.log(2) / d['bytes_per_token']:.2f} \
bits/byte), against **{d['unigram_heldout_loss']:.3f}** for a unigram model of the training tokens (add-one \
smoothed): {d['unigram_heldout_loss'] - s['final_heldout_fp32']:.2f} nats/token lower.

Rebuild (deterministic for a given Python release, torch build and seed):

```bash
{command}
```

Held-out loss during training:

| step | held-out loss | minutes |
|---|---|---|
{curve}
"""


if __name__ == "__main__":
    sys.exit(main())
