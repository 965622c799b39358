"""CLIP text encoder: parity with transformers' CLIPTextModel, weight and config round trips, tokenization."""

import functools
import json
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from ldm_jax.weights import convert
from ldm_jax.models import clip
from ldm_jax import testing as refs
from ldm_jax.testing import clip as ref_clip

CONFIGS = {"sd1": ref_clip.CLIP_SD1_TINY, "sd2": ref_clip.CLIP_SD2_TINY}
PAD_TOKENS = {"sd1": ref_clip.EOS, "sd2": "!"}
# "tokenizer": eos_token_id is the tokenizer's EOS (first-EOS pooling); "legacy": eos_token_id=2 (argmax pooling).
EOS_RULES = {"tokenizer": ref_clip.EOS_ID, "legacy": clip.LEGACY_EOS_TOKEN_ID}
PROMPTS = ["a red circle", "A photo of a cat, in the sky!", "", "xyz 42 qq"]
LENGTH = 16
# float32 max_rel_error measured on a 2-core AMD EPYC: at most 6.0e-7 (last hidden state), 4.2e-7 (pooled).
TOL = 1e-5
# bf16 compute (float32 params) against float32 torch, measured: max_rel_error 0.0095 (sd1), 0.0088 (sd2).
BF16_TOL = 3e-2


@functools.cache
def tokenizer(name: str, folder: str) -> transformers.CLIPTokenizer:
    return ref_clip.make_tokenizer(folder, pad_token=PAD_TOKENS[name], model_max_length=LENGTH)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizers"))


@functools.cache
def setup(name: str, rule: str):
    """(torch model, our model, our params) at config ``name`` with eos rule ``rule``."""
    config = dict(CONFIGS[name], eos_token_id=EOS_RULES[rule])
    reference = ref_clip.build(config, seed=len(name) + len(rule))
    model = clip.CLIPTextModel.from_transformers_config(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))["params"]
    state = clip.normalize_state_dict(refs.numpy_state_dict(reference))
    params = convert.state_dict_to_params(state, abstract, what="text_encoder")
    return reference, model, params


def torch_outputs(reference, ids, attention_mask=None, hidden_states=False):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask))
        out = reference(torch.from_numpy(np.asarray(ids, np.int64)), attention_mask=mask,
                        output_hidden_states=hidden_states)
    return out


def eos_probe_ids(rng: np.random.Generator) -> np.ndarray:
    """Rows on which the two pooling rules pick different positions.

    Row 0 has no EOS and its largest id away from position 0 (first-EOS picks
    0, argmax does not); row 1 has id 2 before its EOS (legacy argmax picks the
    EOS, "first id == 2" would not).
    """
    ids = rng.integers(3, ref_clip.EOS_ID, size=(2, LENGTH))
    ids[0, 5] = ref_clip.BOS_ID
    ids[1, 4], ids[1, 9] = 2, ref_clip.EOS_ID
    return ids.astype(np.int32)


@pytest.mark.parametrize("rule", sorted(EOS_RULES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_transformers(name, rule, tok_dir):
    reference, model, params = setup(name, rule)
    ids = clip.tokenize(tokenizer(name, f"{tok_dir}/{name}"), PROMPTS, LENGTH)
    ids = np.concatenate([ids, eos_probe_ids(np.random.default_rng(0))])
    last, pooled = jax.jit(model.apply)({"params": params}, ids)
    out = torch_outputs(reference, ids)
    assert last.shape == (len(ids), LENGTH, model.hidden_size) and pooled.shape == (len(ids), model.hidden_size)
    assert refs.max_rel_error(last, out.last_hidden_state) <= TOL
    assert refs.max_rel_error(pooled, out.pooler_output) <= TOL
    # On a probe row the two rules pool at different positions, so applying the wrong one would fail above.
    first_eos = np.argmax(ids[-2:] == model.eos_token_id, axis=-1)
    assert np.any(first_eos != np.argmax(ids[-2:], axis=-1))


def test_padding_attention_mask(tok_dir):
    reference, model, params = setup("sd2", "tokenizer")
    tok = tokenizer("sd2", f"{tok_dir}/sd2")
    enc = tok(PROMPTS, padding="max_length", max_length=LENGTH, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    last, pooled = jax.jit(model.apply)({"params": params}, ids, mask)
    out = torch_outputs(reference, ids, mask)
    assert refs.max_rel_error(last, out.last_hidden_state) <= TOL
    assert refs.max_rel_error(pooled, out.pooler_output) <= TOL
    unmasked = torch_outputs(reference, ids)  # the mask does change the padded positions
    assert refs.max_rel_error(unmasked.last_hidden_state, out.last_hidden_state) > 1e-2


def test_skip_last_layers_is_diffusers_clip_skip(tok_dir):
    reference, model, params = setup("sd2", "legacy")
    ids = clip.tokenize(tokenizer("sd2", f"{tok_dir}/sd2"), PROMPTS, LENGTH)
    out = torch_outputs(reference, ids, hidden_states=True)
    last, pooled = jax.jit(model.clone(skip_last_layers=1).apply)({"params": params}, ids)
    with torch.no_grad():  # diffusers' clip_skip=1: final_layer_norm(hidden_states[-2])
        expected = getattr(reference, "text_model", reference).final_layer_norm(out.hidden_states[-2])
    assert refs.max_rel_error(last, expected) <= TOL
    assert refs.max_rel_error(pooled, out.pooler_output) <= TOL
    assert refs.max_rel_error(out.last_hidden_state, expected) > 1e-2
    with pytest.raises(ValueError, match="skip_last_layers"):
        model.clone(skip_last_layers=model.num_hidden_layers)


def test_normalize_state_dict_accepts_both_layouts():
    state = {"embeddings.token_embedding.weight": 1, "text_model.final_layer_norm.bias": 2, "text_projection.weight": 3}
    assert clip.normalize_state_dict(state) == {"text_model.embeddings.token_embedding.weight": 1,
                                                "text_model.final_layer_norm.bias": 2, "text_projection.weight": 3}


def test_params_load_back_into_transformers(tok_dir, tmp_path):
    reference, model, params = setup("sd1", "tokenizer")
    state = convert.params_to_state_dict(params)
    assert all(k.startswith("text_model.") for k in state)  # the checkpoint-file layout
    ids = clip.tokenize(tokenizer("sd1", f"{tok_dir}/sd1"), PROMPTS, LENGTH)
    expected = torch_outputs(reference, ids)

    fresh = transformers.CLIPTextModel(transformers.CLIPTextConfig(**model.transformers_config()))
    live = state
    if "text_model.final_layer_norm.weight" not in fresh.state_dict():  # transformers >= 5: no prefix in memory
        live = {k.removeprefix("text_model."): v for k, v in state.items()}
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in live.items()}, strict=True)

    safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))  # as save_pretrained would
    (tmp_path / "config.json").write_text(json.dumps(model.transformers_config()))
    loaded, info = transformers.CLIPTextModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    for other in (fresh.eval(), loaded.eval()):
        out = torch_outputs(other, ids)
        assert refs.max_rel_error(out.last_hidden_state, expected.last_hidden_state) == 0.0
        assert refs.max_rel_error(out.pooler_output, expected.pooler_output) == 0.0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_round_trip(name):
    saved = transformers.CLIPTextConfig(**CONFIGS[name]).to_dict()  # what config.json holds
    model = clip.CLIPTextModel.from_transformers_config(saved)
    rebuilt = transformers.CLIPTextConfig(**model.transformers_config())
    assert rebuilt.architectures == ["CLIPTextModel"] and rebuilt.model_type == "clip_text_model"
    for key in clip.CONFIG_FIELDS:
        assert getattr(rebuilt, key) == saved[key], key
    assert clip.CLIPTextModel.from_transformers_config(rebuilt.to_dict()) == model


def test_unsupported_activation():
    with pytest.raises(ValueError, match="unsupported CLIP hidden_act 'swish'"):
        clip.CLIPTextModel.from_transformers_config(dict(ref_clip.CLIP_SD1_TINY, hidden_act="swish"))


@pytest.mark.parametrize("name", sorted(clip.ACTIVATIONS))
def test_activations_match_transformers(name):
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    expected = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(clip.activation(name)(x), expected, atol=1e-6)


def test_partitioning_names():
    _, model, _ = setup("sd1", "tokenizer")
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))
    specs = jax.tree_util.tree_map(tuple, nn.get_partition_spec(abstract))["params"]["text_model"]
    layer = specs["encoder"]["layers_0"]
    assert specs["embeddings"]["token_embedding"]["embedding"] == ("vocab", "embed")
    assert specs["embeddings"]["position_embedding"]["embedding"] == (None, "embed")
    assert layer["self_attn"]["q_proj"]["kernel"] == ("embed", "heads")
    assert layer["self_attn"]["out_proj"]["kernel"] == ("heads", "embed")
    assert layer["mlp"]["fc1"]["kernel"] == ("embed", "mlp") and layer["mlp"]["fc2"]["kernel"] == ("mlp", "embed")
    assert specs["final_layer_norm"]["scale"] == ("norm",)


def test_bf16_compute_close_to_float32(tok_dir):
    reference, model, params = setup("sd1", "tokenizer")
    ids = clip.tokenize(tokenizer("sd1", f"{tok_dir}/sd1"), PROMPTS, LENGTH)
    bf16 = model.clone(dtype=jnp.bfloat16)
    last, pooled = jax.jit(bf16.apply)({"params": params}, ids)
    assert last.dtype == jnp.bfloat16
    out = torch_outputs(reference, ids)
    err = max(refs.max_rel_error(np.float32(last), out.last_hidden_state),
              refs.max_rel_error(np.float32(pooled), out.pooler_output))
    assert TOL < err <= BF16_TOL, err  # > TOL: the computation really ran in bf16


def test_tokenize_pads_and_truncates_with_warning(tok_dir):
    for name, pad_id in (("sd1", ref_clip.EOS_ID), ("sd2", 0)):
        tokenizer(name, f"{tok_dir}/{name}")  # writes the folder
        tok = clip.load_tokenizer(f"{tok_dir}/{name}")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ids = clip.tokenize(tok, "a red circle")
        assert ids.dtype == np.int32 and ids.shape == (1, LENGTH)
        assert list(ids[0, :5]) == [ref_clip.BOS_ID, *tok.convert_tokens_to_ids(
            ["a</w>", "red</w>", "circle</w>"]), ref_clip.EOS_ID]
        assert np.all(ids[0, 5:] == pad_id)
    long = "a photo of a big red cat in the house with the sun and a dog"
    with pytest.warns(UserWarning, match=r"prompt 'a photo of .* dog' is 18 tokens long; truncated to the limit "
                                         r"of 16 tokens, dropping 'a dog'"):
        ids = clip.tokenize(tok, ["a cat", long])
    assert ids.shape == (2, LENGTH) and ids[1, 0] == ref_clip.BOS_ID and ids[1, -1] == ref_clip.EOS_ID


def test_import_does_not_load_torch_or_tensorflow():
    code = ("import sys, ldm_jax.models.clip; "
            "bad = [m for m in ('torch', 'tensorflow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
