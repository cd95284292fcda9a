"""The HF zoo of issue 13: one tiny random config per family (2 layers, 4 heads of width 8,
vocabulary 64), built under each attention implementation HF offers for it. Sizes are kept
minimal so the whole matrix compiles in a few minutes on two cores."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers as T

VOCAB, HEADS, HEAD_DIM, LAYERS = 64, 4, 8, 2
D = HEADS * HEAD_DIM

_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(_TOKENS, vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=64)
_GQA = dict(_DECODER, num_key_value_heads=2)


@dataclass(frozen=True)
class Family:
    name: str
    config: type
    kwargs: dict
    head: str = "causal_lm"                  # causal_lm | encoder_mlm | seq2seq | speech2seq | vision
    implementations: tuple = ("eager", "sdpa")
    attention_layers: int = LAYERS           # attention computations per forward
    notes: dict = field(default_factory=dict)


def _f(name, config, kwargs, **extra):
    return Family(name, getattr(T, config), kwargs, **extra)


FAMILIES = [
    _f("gpt2", "GPT2Config", dict(_TOKENS, vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=64)),
    _f("gpt_neox", "GPTNeoXConfig", dict(_DECODER)),
    _f("gptj", "GPTJConfig", dict(_TOKENS, vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, rotary_dim=4,
                                  n_positions=64)),
    _f("opt", "OPTConfig", dict(_TOKENS, vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, ffn_dim=2 * D,
                                num_attention_heads=HEADS, word_embed_proj_dim=D, max_position_embeddings=64)),
    _f("bloom", "BloomConfig", dict(_TOKENS, vocab_size=VOCAB, hidden_size=D, n_layer=LAYERS, n_head=HEADS),
       implementations=("eager",)),
    _f("falcon", "FalconConfig", dict(_TOKENS, vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS)),
    _f("llama", "LlamaConfig", dict(_GQA), implementations=("eager", "sdpa", "flex_attention")),
    _f("mistral", "MistralConfig", dict(_GQA)),
    _f("mixtral", "MixtralConfig", dict(_GQA, num_local_experts=2, num_experts_per_tok=1)),
    _f("qwen2", "Qwen2Config", dict(_GQA)),
    _f("qwen2_moe", "Qwen2MoeConfig", dict(_GQA, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=D,
                                           shared_expert_intermediate_size=D)),
    _f("qwen3", "Qwen3Config", dict(_GQA, head_dim=HEAD_DIM)),
    _f("qwen3_moe", "Qwen3MoeConfig", dict(_GQA, head_dim=HEAD_DIM, num_experts=2, num_experts_per_tok=1,
                                           moe_intermediate_size=D)),
    _f("qwen3_next", "Qwen3NextConfig", dict(_GQA, head_dim=HEAD_DIM, num_experts=2, num_experts_per_tok=1,
                                             moe_intermediate_size=D, shared_expert_intermediate_size=D,
                                             layer_types=["full_attention"] * LAYERS)),
    _f("gemma", "GemmaConfig", dict(_GQA, head_dim=HEAD_DIM)),
    _f("gemma2", "Gemma2Config", dict(_GQA, head_dim=HEAD_DIM), implementations=("eager",)),
    _f("gemma3_text", "Gemma3TextConfig", dict(_GQA, head_dim=HEAD_DIM)),
    _f("phi", "PhiConfig", dict(_DECODER)),
    _f("phi3", "Phi3Config", dict(_GQA)),
    _f("stablelm", "StableLmConfig", dict(_GQA)),
    _f("cohere", "CohereConfig", dict(_GQA)),
    _f("olmo", "OlmoConfig", dict(_GQA)),
    _f("olmo2", "Olmo2Config", dict(_GQA)),
    _f("granite", "GraniteConfig", dict(_GQA)),
    _f("deepseek_v3", "DeepseekV3Config", dict(_DECODER, num_key_value_heads=HEADS, n_routed_experts=2,
                                               num_experts_per_tok=1, moe_intermediate_size=D, n_group=1,
                                               topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
                                               kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                               v_head_dim=HEAD_DIM)),
    _f("gpt_bigcode", "GPTBigCodeConfig", dict(_TOKENS, vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                               n_positions=64, multi_query=True)),
    _f("mpt", "MptConfig", dict(_TOKENS, vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, max_seq_len=64),
       implementations=("eager",)),
    _f("gpt_oss", "GptOssConfig", dict(_GQA, head_dim=HEAD_DIM, num_local_experts=2, num_experts_per_tok=1),
       implementations=("eager",)),
    _f("jamba", "JambaConfig", dict(_GQA, num_experts=2, num_experts_per_tok=1, attn_layer_period=2,
                                    attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                                    mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False), attention_layers=1),
    _f("gpt_neo", "GPTNeoConfig", dict(_TOKENS, vocab_size=VOCAB, hidden_size=D, num_layers=LAYERS, num_heads=HEADS,
                                       attention_types=[[["global", "local"], 1]], window_size=4,
                                       max_position_embeddings=64), implementations=("eager",)),
    # clip_qkv: HF's Dbrx forward clamps q/k/v with clip_qkv and fails on its default None.
    _f("dbrx", "DbrxConfig", dict(_TOKENS, vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, max_seq_len=64,
                                  attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                                  ffn_config=dict(ffn_hidden_size=D, moe_num_experts=2, moe_top_k=1))),
    _f("bert", "BertConfig", dict(_DECODER), head="encoder_mlm", implementations=("eager", "sdpa", "flex_attention")),
    _f("roberta", "RobertaConfig", dict(_DECODER), head="encoder_mlm"),
    _f("distilbert", "DistilBertConfig", dict(_TOKENS, vocab_size=VOCAB, dim=D, n_layers=LAYERS, n_heads=HEADS,
                                              hidden_dim=2 * D, max_position_embeddings=64), head="encoder_mlm"),
    _f("deberta_v2", "DebertaV2Config", dict(_DECODER), head="encoder_mlm", implementations=("eager",)),
    _f("modernbert", "ModernBertConfig", dict(_DECODER, cls_token_id=1, sep_token_id=2), head="encoder_mlm"),
    _f("t5", "T5Config", dict(_TOKENS, vocab_size=VOCAB, d_model=D, d_kv=HEAD_DIM, d_ff=2 * D, num_layers=LAYERS,
                              num_heads=HEADS, decoder_start_token_id=0), head="seq2seq", attention_layers=3 * LAYERS),
    _f("bart", "BartConfig", dict(_TOKENS, vocab_size=VOCAB, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                  encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                                  encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D, max_position_embeddings=64),
       head="seq2seq", attention_layers=3 * LAYERS),
    _f("whisper", "WhisperConfig", dict(_TOKENS, vocab_size=VOCAB, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                                        encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D, num_mel_bins=8,
                                        max_source_positions=8, max_target_positions=32,
                                        decoder_start_token_id=1, pad_token_id=0), head="speech2seq", attention_layers=3 * LAYERS),
    _f("vit", "ViTConfig", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                intermediate_size=2 * D, image_size=16, patch_size=8), head="vision"),
    _f("clip", "CLIPVisionConfig", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        intermediate_size=2 * D, image_size=16, patch_size=8), head="vision"),
]
BY_NAME = {f.name: f for f in FAMILIES}

# ---- what the matrix of tests/test_zoo.py checks, and what it knows to fail ------------------------
# Each check costs dynamo traces of the whole model (~1 s each on 2 cores): sites, identity and
# steering (2 traces) run under every implementation; recording and recompiles under the family's
# primary implementation; the analyses (6-8 more traces) under the primary implementation of the
# ANALYSED families, chosen to cover every distinct path, so that the matrix fits its time budget.
EVERY_IMPLEMENTATION = ("sites", "identity", "steering")
# Every family's primary implementation: the core, and generate and DLA wherever they are defined.
CORE = EVERY_IMPLEMENTATION + ("recording", "recompiles", "generate", "dla")
ANALYSES = ("relevance", "patching")
CAPABILITIES = CORE + ANALYSES
INSTRUMENT = "instrument"        # a gap on it: instrument() itself fails, so every capability does
ANALYSED = (
    "gpt2",          # Conv1D projections, LayerNorm with bias, biases everywhere
    "gpt_neox",      # parallel attention + MLP
    "llama",         # RMSNorm, GQA, RoPE
    "gemma3_text",   # (1 + w) norms, post-block norms
    "olmo2",         # post-block norms only
    "cohere",        # LayerNorm without bias, logit scale, parallel block
    "deepseek_v3",   # multi-head latent attention (v_head_dim, compressed kv)
    "qwen3_next",    # output gate between z and o_proj
    "bert",          # bidirectional encoder
    "bart",          # encoder-decoder: self- and cross-attention
    "t5",            # encoder-decoder: relative position bias, scaled tied unembedding
    "whisper",       # speech encoder-decoder
    "vit",           # vision backbone: pixel inputs, no logits
)

# Known gaps: (family, capability) → reason, applied as strict xfails, so a fixed gap fails the
# matrix until its entry is removed. family is a name (every implementation) or "name/impl".
GAPS: dict[tuple[str, str], str] = {
    ("dbrx", "dla"): "DBRX's experts loop over a data-dependent tensor (`for expert_idx in expert_hit`), a graph break "
                     "in every layer: DLA follows the stream across the graphs by a gradient, and the experts run in "
                     "graphs of their own where no hidden activation is found to hold constant, so the path is not "
                     "linear once frozen (a typed error names their ops)",
}


def primary(family: Family) -> str:
    """The implementation the analyses run under: sdpa (HF's default) where offered."""
    return "sdpa" if "sdpa" in family.implementations else family.implementations[0]


def not_applicable(family: Family, capability: str) -> str | None:
    """Why the family has no such capability by nature, or None when it has."""
    if capability == "generate" and family.head not in ("causal_lm", "seq2seq", "speech2seq"):
        return "no generate(): not a generative model"
    if capability == "dla" and family.head != "causal_lm":
        return "direct logit attribution is for decoder LMs (an unembedding after the final norm)"
    return None


def gap(family: Family, implementation: str, capability: str) -> str | None:
    """The known gap of this (family, implementation) for a capability, or None."""
    for name in (f"{family.name}/{implementation}", family.name):
        for cap in (capability, INSTRUMENT):
            if (name, cap) in GAPS:
                return GAPS[name, cap]
    return None


def cases():
    """(family, implementation, capability) triples the matrix checks, in build order."""
    for family in FAMILIES:
        for implementation in family.implementations:
            for capability in CAPABILITIES:
                if not_applicable(family, capability) is None and checked(family, implementation, capability):
                    yield family, implementation, capability


def checked(family: Family, implementation: str, capability: str) -> bool:
    """Whether the matrix checks this capability of this (family, implementation)."""
    if capability in EVERY_IMPLEMENTATION:
        return True
    if implementation != primary(family):
        return False
    return capability in CORE or family.name in ANALYSED

_HEADS = {"causal_lm": T.AutoModelForCausalLM, "encoder_mlm": T.AutoModelForMaskedLM,
          "seq2seq": T.AutoModelForSeq2SeqLM, "speech2seq": T.AutoModelForSpeechSeq2Seq,
          "vision": T.AutoModel}


def build(family: Family, implementation: str, seed: int = 0):
    torch.manual_seed(seed)
    config = family.config(**family.kwargs)
    config._attn_implementation = implementation
    model = _HEADS[family.head].from_config(config, attn_implementation=implementation)
    return model.eval()


def inputs(family: Family, model, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    """Call kwargs: token ids with the first row left-padded by 2 for text models."""
    gen = torch.Generator().manual_seed(seed)
    if family.head == "vision":
        size = model.config.image_size
        return dict(pixel_values=torch.randn(batch, 3, size, size, generator=gen))
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    if family.head == "causal_lm":
        mask[0, :2] = 0
    if family.head == "seq2seq":
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5])
    if family.head == "speech2seq":
        features = torch.randn(batch, model.config.num_mel_bins, 2 * model.config.max_source_positions,
                               generator=gen)
        return dict(input_features=features, decoder_input_ids=ids[:, :5])
    return dict(input_ids=ids, attention_mask=mask)
