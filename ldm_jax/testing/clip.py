"""A tiny CLIP tokenizer and tiny transformers CLIPTextModels with random weights."""

import json
import os

import torch
import transformers

from ldm_jax.testing import perturb_norms

WORDS = ("a", "an", "the", "of", "in", "on", "and", "with", "red", "green", "blue", "small", "big", "circle",
         "square", "triangle", "photo", "painting", "cat", "dog", "house", "tree", "sky", "sun")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: one printable unicode character per byte, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's layout: bytes, bytes + '</w>', merged tokens in merge order, then BOS and EOS (the highest ids)."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            if f"{merged} {part}" not in merges:
                merges.append(f"{merged} {part}")
                tokens.append(merged + part)
            merged += part
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def make_tokenizer(folder: str, pad_token: str = EOS, model_max_length: int = 16) -> transformers.CLIPTokenizer:
    """Write a tiny byte-level BPE CLIP tokenizer into ``folder`` (a valid ``tokenizer/`` dir) and load it.

    ``pad_token`` is EOS as in SD 1.x, or "!" as in SD 2.x. Any ASCII prompt
    tokenizes; the words in WORDS are single tokens.
    """
    os.makedirs(folder, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, pad_token=pad_token,
                                                           model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


_VOCAB, _ = _vocab_and_merges()
VOCAB_SIZE = len(_VOCAB)
BOS_ID, EOS_ID = _VOCAB[BOS], _VOCAB[EOS]

CLIP_SD1_TINY = dict(
    vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
CLIP_SD2_TINY = dict(
    vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
    max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-5,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=_VOCAB["!"])


def build(config: dict, seed: int) -> transformers.CLIPTextModel:
    """transformers CLIPTextModel at ``config`` with seeded random weights, in eval mode.

    Norms and linear biases (which the default init leaves at 1 and 0) are
    randomized too, so a swapped or dropped one changes the outputs.
    """
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_(0.0, 0.1)
    return perturb_norms(model, seed + 1)
