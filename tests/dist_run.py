"""Two ranks on the CPU (gloo), one launch: hf_kvplug under transformers' own tensor and pipeline parallelism.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_run.py

Run by tests/test_distributed.py. Per model (Llama and Qwen3; --models adds more) and per parallel mode (TP=2, and
PP=2 where transformers has it, 5.17+): stock generate() and plugged generate() (fp and INT8), greedy and beam search,
on an unpadded and a left-padded batch. Checks, on every rank:
  plugged fp   == stock under the same parallel setup (tokens; logits <= 1e-4), except PP + left padding, where stock
                  PP itself is wrong (a transformers bug: a later stage sizes its decode mask from cache layer 0,
                  which it never fills; reported below while it lasts)
  plugged fp   == stock in one process (tokens; logits <= 1e-4), every case
  plugged int8 == plugged int8 in one process (tokens; logits <= 1e-4 under PP, <= 2% of max|logit| under TP, where
                  the all-reduce moves activations by ~1e-7, enough to move an INT8 rounding by a step)
  cache geometry: TP -> this rank's heads (half the KV heads; INT8 scales per local head); PP -> buffers only for
  the rank's layers; get_seq_length() equal on both ranks.
Exits 0 when every check passed on every rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta

T0 = time.time()
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config  # noqa: E402

import hf_kvplug  # noqa: E402
from hf_kvplug.cache import RemoteLayer  # noqa: E402
from hf_kvplug.compat import cache_kwargs  # noqa: E402

torch.set_num_threads(1)
RANK = int(os.environ.get("RANK", 0))
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=None)
CONFIGS = {"llama": lambda: LlamaConfig(**COMMON), "qwen2": lambda: Qwen2Config(**COMMON),
           "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16)}
NEW = 8
GEN = {"greedy": dict(do_sample=False, num_beams=1), "beam": dict(do_sample=False, num_beams=3)}
FAILS: list[str] = []


def log0(*a):
    if RANK == 0:
        print(f"[{time.time() - T0:5.1f}s]", *a, flush=True)


def load_kwargs(mode: str):
    """from_pretrained arguments for TP=2 / PP=2 with this transformers (None: the release has no such mode)."""
    try:
        from transformers.distributed import DistributedConfig

        return dict(distributed_config=DistributedConfig(**{f"{mode}_size": 2}))
    except (ImportError, TypeError):  # 5.4: tensor parallelism through tp_plan only, no pipeline parallelism
        return dict(tp_plan="auto") if mode == "tp" else None


def batches():
    g = torch.Generator().manual_seed(4)  # every row of every model generates >= 3 distinct tokens
    ids = torch.randint(3, 128, (2, 7), generator=g)
    pad_ids, mask = ids.clone(), torch.ones_like(ids)
    pad_ids[1, :4], mask[1, :4] = 0, 0
    return {"unpadded": dict(input_ids=ids, attention_mask=torch.ones_like(ids)),
            "leftpad": dict(input_ids=pad_ids, attention_mask=mask)}


@torch.no_grad()
def run(model, kv=False, kv_dtype=None):
    out = {}
    for b, batch in batches().items():
        for g, gkw in GEN.items():
            kw, cache = {}, None
            if kv:
                cache = hf_kvplug.PlugCache(model, max_batch_size=6, max_cache_len=32, kv_dtype=kv_dtype,
                                            block_size=16)
                kw = cache_kwargs(cache)
            res = model.generate(**batch, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True,
                                 **gkw, **kw)
            out[b, g] = (res.sequences, torch.stack(res.logits, 1), cache)
    return out


def check_prefix(tag, model):
    """Prefix caching on the distributed model: two requests sharing a 17-token system prompt, the second mapping its
    two full blocks from the index (the root probes each rank's shards of the weights), each with the tokens the
    model gives without a cache."""
    torch.manual_seed(1)
    system = torch.randint(2, COMMON["vocab_size"], (1, 17))
    cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=48, block_size=8, prefix_caching=True)
    for turn in range(2):
        ids = torch.cat([system, torch.randint(2, COMMON["vocab_size"], (1, 4 + turn))], 1)
        cache.reset()
        got = model.generate(ids, **cache_kwargs(cache), max_new_tokens=5, do_sample=False)
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        hits = cache.stats()["prefix_hit_tokens"]
        ok = torch.equal(got, want) and hits == 16 * turn
        if not ok:
            FAILS.append(f"rank{RANK} {tag} prefix caching, request {turn}: tokens_equal={torch.equal(got, want)} "
                         f"hit tokens {hits}")
        log0(f"{'ok  ' if ok else 'FAIL'} {tag:36s} prefix caching, request {turn}: hit tokens {hits}")


def check(tag, ref, got, skip=(), rel=None):
    for key in ref:
        if key[1] == "greedy" and min(len(set(row[7:].tolist())) for row in got[key][0]) < 3:
            FAILS.append(f"rank{RANK} {tag} {key}: degenerate output (fewer than 3 distinct new tokens)")
        if key in skip:
            continue
        (ta, la, _), (tb, lb, _) = ref[key], got[key]
        err = (la - lb).abs().max().item()
        tol = 1e-4 if rel is None else rel * la.abs().max().item()
        ok = torch.equal(ta, tb) and err <= tol
        if not ok:
            FAILS.append(f"rank{RANK} {tag} {key}: tokens_equal={torch.equal(ta, tb)} max|dlogit|={err:.2e}")
        log0(f"{'ok  ' if ok else 'FAIL'} {tag:36s} {key[0]:8s} {key[1]:6s} max|dlogit|={err:.1e}")


def check_cache(tag, mode, got, owned):
    for key, (_, _, cache) in got.items():
        cfg = cache.config
        here = [i for i, layer in enumerate(cache.layers) if not isinstance(layer, RemoteLayer)]
        if mode == "tp":
            ok = cfg.nheads_k == COMMON["num_key_value_heads"] // 2 and cfg.nheads == COMMON["num_attention_heads"] // 2
            if cfg.kv_dtype == "int8":
                ok &= cache.layers[0].k_scale.shape[1] == cfg.nheads_k
        else:
            ok = here == owned and len(cache.attn_layers) == len(owned)
        n = torch.tensor([int(cache.get_seq_length())])
        both = [torch.zeros(1, dtype=n.dtype) for _ in range(2)]
        dist.all_gather(both, n)
        ok &= len({int(x) for x in both}) == 1
        if not ok:
            FAILS.append(f"rank{RANK} {tag} {key} cache: nheads={cfg.nheads} nheads_k={cfg.nheads_k} layers={here} "
                         f"seq_len={[int(x) for x in both]}")
    log0(f"{'ok  ' if not FAILS else '    '} {tag} cache geometry / get_seq_length on both ranks")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama,qwen3")
    args = ap.parse_args()
    names = args.models.split(",")
    # Build before the process group exists (afterwards save_pretrained writes on rank 0 only); the same seed on both
    # ranks gives the same weights, so the one-process references agree.
    root = tempfile.mkdtemp(prefix=f"kvplug-dist-r{RANK}-")
    paths = {}
    for name in names:
        torch.manual_seed(0)
        paths[name] = os.path.join(root, name)
        AutoModelForCausalLM.from_config(CONFIGS[name]()).save_pretrained(paths[name])
    # Our own group with a short timeout: a rank that raises must not leave the other waiting (transformers' own
    # initialization would use two hours).
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    log0(f"setup {time.time() - T0:.1f}s")
    for name in names:
        def load(**kw):
            return AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32, **kw).eval()

        single = load()
        ref = run(single)
        hf_kvplug.patch(single)
        ref_int8 = run(single, kv=True, kv_dtype="int8")
        del single
        for mode in ("tp", "pp"):
            kw = load_kwargs(mode)
            if kw is None:
                log0(f"skip {name} {mode}: this transformers has no {mode.upper()}")
                continue
            model = load(**kw)
            owned = list(hf_kvplug.config.RankLayout.from_model(model).layers or range(COMMON["num_hidden_layers"]))
            stock = run(model)
            hf_kvplug.patch(model)
            fp, int8 = run(model, kv=True), run(model, kv=True, kv_dtype="int8")
            if mode == "tp":
                check_prefix(f"{name} {mode}", model)
            del model
            known_bad = {("leftpad", "greedy"), ("leftpad", "beam")} if mode == "pp" else set()
            check(f"{name} {mode} plugged vs stock {mode}", stock, fp, skip=known_bad)
            check(f"{name} {mode} plugged vs stock single", ref, fp)
            check(f"{name} {mode} plugged int8 vs int8 single", ref_int8, int8, rel=0.02 if mode == "tp" else None)
            check_cache(f"{name} {mode}", mode, fp, owned)
            check_cache(f"{name} {mode} int8", mode, int8, owned)
            for key in known_bad:  # the transformers bug: reported while it lasts, so a fixed release is noticed
                same = torch.equal(stock[key][0], ref[key][0])
                log0(f"note {name} stock pp vs stock single {key}: tokens_equal={same} "
                     f"({'transformers fixed its PP mask bug' if same else 'the known transformers PP mask bug'})")
    bad = torch.tensor([len(FAILS)])
    dist.all_reduce(bad)
    for f in FAILS:
        print("FAIL", f, flush=True)
    log0(f"{'PASSED' if int(bad) == 0 else f'{int(bad)} FAILURES'} in {time.time() - T0:.1f}s")
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is checked and said: skip the interpreter's teardown, where a gloo / thread-pool thread still
    # joinable has once aborted a rank ("terminate called without an active exception", exit -6) after PASSED
    os._exit(1 if int(bad) else 0)


if __name__ == "__main__":
    main()
