"""Test models: the HF families of issue 2 built from small configs (random weights), and two
plain nn.Module transformers (one calling SDPA, one with hand-written attention).

Each Family also says where its q and v projections write each head, so tests can build
reference forward hooks that steer the model the slow way."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import transformers as T
from hypothesis import strategies as st
from torch import nn

VOCAB = 64


# ---- plain modules ------------------------------------------------------------------------
class PlainAttention(nn.Module):
    def __init__(self, d_model, heads, kv_heads, bias, causal, handwritten, gqa_mode):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, d_model // heads
        self.causal, self.handwritten, self.gqa_mode = causal, handwritten, gqa_mode
        self.q_proj = nn.Linear(d_model, heads * self.d, bias=bias)
        self.k_proj = nn.Linear(d_model, kv_heads * self.d, bias=bias)
        self.v_proj = nn.Linear(d_model, kv_heads * self.d, bias=bias)
        self.o_proj = nn.Linear(heads * self.d, d_model, bias=bias)

    def forward(self, x, key_mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        allowed = key_mask[:, None, None, :].bool()                      # [b, 1, 1, t]
        if self.causal:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        allowed = allowed | torch.eye(t, dtype=torch.bool, device=x.device)   # no empty rows
        rep = self.heads // self.kv_heads
        if self.handwritten or self.gqa_mode == "repeat":
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.handwritten:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d)
            scores = scores.masked_fill(~allowed, float("-inf"))
            z = torch.softmax(scores, dim=-1) @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=rep > 1)
        return self.o_proj(z.transpose(1, 2).reshape(b, t, -1))


class PlainBlock(nn.Module):
    def __init__(self, d_model, **kw):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = PlainAttention(d_model, **kw)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x, key_mask):
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.mlp(self.ln2(x))


class PlainTransformer(nn.Module):
    """A small decoder (or encoder, causal=False) language model written with plain torch."""

    def __init__(self, layers=2, heads=4, kv_heads=2, head_dim=8, bias=True, causal=True,
                 handwritten=False, gqa_mode="enable_gqa"):
        super().__init__()
        d_model = heads * head_dim
        self.embed = nn.Embedding(VOCAB, d_model)
        self.blocks = nn.ModuleList(PlainBlock(d_model, heads=heads, kv_heads=kv_heads, bias=bias, causal=causal,
                                               handwritten=handwritten, gqa_mode=gqa_mode) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, input_ids, attention_mask=None):
        key_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.unembed(self.ln_f(x))


# ---- families -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    name: str
    build: Callable                 # (layers, heads, kv_heads, head_dim, impl) -> model
    gqa: bool                       # supports kv_heads < heads
    causal: bool
    qv_modules: Callable            # (model, layer) -> (q module, v module)
    qv_layout: str                  # "separate" | "gpt2_fused" | "neox_fused"
    impls: tuple = ("sdpa", "eager")


def _gpt2(layers, heads, kv_heads, d, impl):
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=heads * d, n_layer=layers, n_head=heads,
                                          n_positions=128, attn_implementation=impl, bos_token_id=0,
                                          eos_token_id=0))


def _neox(layers, heads, kv_heads, d, impl):
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=heads * d, intermediate_size=4 * heads * d, num_hidden_layers=layers,
        num_attention_heads=heads, rotary_pct=0.5, max_position_embeddings=128, attn_implementation=impl,
        bos_token_id=0, eos_token_id=0))


def _bert(layers, heads, kv_heads, d, impl):
    return T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=heads * d, intermediate_size=4 * heads * d,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    max_position_embeddings=128, attn_implementation=impl))


def _llama_like(cls, config_cls, **extra):
    def build(layers, heads, kv_heads, d, impl):
        return cls(config_cls(vocab_size=VOCAB, hidden_size=heads * d, intermediate_size=4 * heads * d,
                              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                              max_position_embeddings=128, attn_implementation=impl, bos_token_id=0,
                              eos_token_id=0, **extra))
    return build


def _plain(handwritten):
    def build(layers, heads, kv_heads, d, impl):
        return PlainTransformer(layers, heads, kv_heads, d, handwritten=handwritten,
                                gqa_mode="repeat" if impl == "repeat" else "enable_gqa")
    return build


FAMILIES = {
    "gpt2": Family("gpt2", _gpt2, False, True, lambda m, l: (m.transformer.h[l].attn.c_attn,) * 2, "gpt2_fused"),
    "llama": Family("llama", _llama_like(T.LlamaForCausalLM, T.LlamaConfig), True, True,
                    lambda m, l: (m.model.layers[l].self_attn.q_proj, m.model.layers[l].self_attn.v_proj), "separate"),
    "mistral": Family("mistral", _llama_like(T.MistralForCausalLM, T.MistralConfig), True, True,
                      lambda m, l: (m.model.layers[l].self_attn.q_proj, m.model.layers[l].self_attn.v_proj), "separate"),
    "qwen2": Family("qwen2", _llama_like(T.Qwen2ForCausalLM, T.Qwen2Config), True, True,
                    lambda m, l: (m.model.layers[l].self_attn.q_proj, m.model.layers[l].self_attn.v_proj), "separate"),
    "neox": Family("neox", _neox, False, True,
                   lambda m, l: (m.gpt_neox.layers[l].attention.query_key_value,) * 2, "neox_fused"),
    "bert": Family("bert", _bert, False, False,
                   lambda m, l: (m.encoder.layer[l].attention.self.query, m.encoder.layer[l].attention.self.value),
                   "separate"),
    "plain_sdpa": Family("plain_sdpa", _plain(False), True, True,
                         lambda m, l: (m.blocks[l].attn.q_proj, m.blocks[l].attn.v_proj), "separate",
                         impls=("sdpa", "repeat")),
    "plain_handwritten": Family("plain_handwritten", _plain(True), True, True,
                                lambda m, l: (m.blocks[l].attn.q_proj, m.blocks[l].attn.v_proj), "separate",
                                impls=("handwritten",)),
}


def head_slice(family: Family, which: str, head: int, heads: int, d: int) -> slice:
    """Columns of the q or v projection output that hold one (kv) head."""
    if family.qv_layout == "separate":
        return slice(head * d, (head + 1) * d)
    if family.qv_layout == "gpt2_fused":
        offset = 0 if which == "q" else 2 * heads * d
        return slice(offset + head * d, offset + (head + 1) * d)
    offset = 0 if which == "q" else 2 * d                    # neox: [H, 3d] per token
    return slice(head * 3 * d + offset, head * 3 * d + offset + d)


def build(family: Family, layers=2, heads=4, kv_heads=None, head_dim=8, impl=None, seed=0):
    torch.manual_seed(seed)
    kv_heads = kv_heads if (kv_heads and family.gqa) else heads
    return family.build(layers, heads, kv_heads, head_dim, impl or family.impls[0]).eval()


def output_tensor(out):
    """The main tensor of a model output (logits, or the encoder's last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@st.composite
def configs(draw, family: Family):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])) if family.gqa else heads
    return dict(layers=draw(st.integers(1, 3)), heads=heads, kv_heads=kv_heads,
                head_dim=draw(st.sampled_from([4, 8, 16])), impl=draw(st.sampled_from(family.impls)))


@st.composite
def batches(draw, family: Family, max_seq=64):
    """input_ids [b, t] and an attention mask with padding (left for causal, right for BERT)."""
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, max_seq))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    for row in range(b):
        pad = draw(st.integers(0, t - 1))
        if pad:
            mask[row, :pad] = 0 if family.causal else 1
            if not family.causal:
                mask[row, t - pad:] = 0
    return ids, mask
