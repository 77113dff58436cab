"""hf_kvplug quickstart: patch a model, give generate() a PlugCache. Runs on a CPU with a tiny random Llama;
for a real model use `AutoModelForCausalLM.from_pretrained("meta-llama/Meta-Llama-3-8B", dtype="bfloat16",
device_map="cuda")` instead of `from_config(...)`."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_kvplug

model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
hf_kvplug.patch(model)
cache = hf_kvplug.PlugCache(model, max_batch_size=1, max_cache_len=64, kv_dtype="int8")
# The cache goes in as `cache=` (transformers >= 5.24) or `past_key_values=` (earlier releases);
# hf_kvplug.CACHE_KWARG is the name the installed release prefers.
out = model.generate(torch.tensor([[1, 5, 9, 2]]), **{hf_kvplug.CACHE_KWARG: cache}, max_new_tokens=8, do_sample=False)
print(out.tolist())
