"""The supported model families, one table row each: where the attention class lives and what truly differs.

Every family's attention is Llama's with some of these differences; the plugged forward (`attention.py`) reads the
row, the patcher finds the class from it, the cache config reads the window rule. A family is a row here, never a
copied forward.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What a model family's attention does beyond Llama's.

    qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3 and its descendants).
    output_gate: `q_proj` yields, per head, the query and an output gate; the attention output is multiplied by
        `sigmoid(gate)` before `o_proj` (Qwen3-Next, Qwen3.5).
    window_all_layers: a `sliding_window` in a config without `layer_types` applies to every layer (Mistral,
        Mixtral, Qwen3-MoE); with `layer_types`, the `sliding_attention` layers have it.
    passes_window: stock hands `sliding_window=` to the attention function (Qwen2-MoE applies it through the mask
        only, so its flash-attention path has none).
    whole_head_rope: the modeling module's `apply_rotary_pos_emb` is Llama's, over the whole head (`x * cos +
        rotate_half(x) * sin`), so a plugged decode step may apply it to q and k in one pass, once the patcher has
        seen it give the same bits (`rope.probe`); Qwen3-Next / Qwen3.5 rotate part of each head.
    """

    module: str
    attention: str
    qk_norm: bool = False
    output_gate: bool = False
    window_all_layers: bool = False
    passes_window: bool = True
    whole_head_rope: bool = True


_QWEN3_NEXT = dict(qk_norm=True, output_gate=True, whole_head_rope=False)

FAMILIES: dict[str, Family] = {
    "llama": Family("transformers.models.llama.modeling_llama", "LlamaAttention"),
    "mistral": Family("transformers.models.mistral.modeling_mistral", "MistralAttention", window_all_layers=True),
    "mixtral": Family("transformers.models.mixtral.modeling_mixtral", "MixtralAttention", window_all_layers=True),
    "qwen2": Family("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention"),
    "qwen2_moe": Family("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeAttention",
                        passes_window=False),
    "qwen3": Family("transformers.models.qwen3.modeling_qwen3", "Qwen3Attention", qk_norm=True),
    "qwen3_moe": Family("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeAttention", qk_norm=True,
                        window_all_layers=True),
    "qwen3_next": Family("transformers.models.qwen3_next.modeling_qwen3_next", "Qwen3NextAttention", **_QWEN3_NEXT),
    "qwen3_5": Family("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5Attention", **_QWEN3_NEXT),
    "qwen3_5_moe": Family("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeAttention",
                          **_QWEN3_NEXT),
}
# The text models of the Qwen3.5 vision-language checkpoints: the same attention classes (the `*_text` model type is
# what AutoModelForCausalLM loads from them; the composite type is the whole VL model, its language tower patched).
FAMILIES["qwen3_5_text"] = FAMILIES["qwen3_5"]
FAMILIES["qwen3_5_moe_text"] = FAMILIES["qwen3_5_moe"]


def family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", None))
