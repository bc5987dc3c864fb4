"""dyprag.training.translator: shapes, zero initial deltas, both architectures, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tokens
from torch.testing import assert_close

from dyprag.engine.inject import inject_lora
from dyprag.training.translator import ParameterTranslator, load_translator, save_translator


@pytest.fixture(params=["per_layer", "shared", "linear", "attention"])
def architecture(request) -> str:
    return request.param


def make(architecture: str, arch: str = "llama", **kwargs) -> tuple:
    model = tiny_model(arch)
    shapes = inject_lora(model).shapes
    torch.manual_seed(0)
    kwargs = {"bottleneck": 0, **kwargs}  # B reads the input itself (the config's is wider)
    if architecture == "attention":  # 16 = 4 tokens of 4 dims
        kwargs = {"token_dim": 4, "queries": 2, **kwargs}
    return model, ParameterTranslator(shapes, embed_dim=16, rank=2, alpha=32.0,
                                      architecture=architecture, **kwargs)


def test_generates_a_batched_lora_for_every_target(architecture, arch):
    model, translator = make(architecture, arch)
    lora = translator(torch.randn(5, 16))
    inject_lora(model).check(lora)
    assert lora.batch_size == 5 and lora.rank == 2 and lora.scaling == 16.0
    assert set(lora.keys) == set(inject_lora(model).shapes)


def test_first_deltas_are_zero_so_the_model_starts_as_the_base(architecture):
    model, translator = make(architecture)
    lora = translator(torch.randn(3, 16))
    for key in lora.keys:
        assert_close(lora.delta(key), torch.zeros_like(lora.delta(key)))
    ids = tokens(3, 7)
    with torch.no_grad(), inject_lora(model).use(lora):
        injected = model(ids).logits
    assert_close(injected, model(ids).logits)


def test_gradients_reach_every_translator_parameter_through_the_model(architecture):
    model, translator = make(architecture)
    ids = tokens(2, 6)
    # At the zero init only B's side learns (A's gradient is zero while B is zero); so train
    # from a moved point, where every weight shapes the LoRA.
    with torch.no_grad():
        for p in translator.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with inject_lora(model).use(translator(torch.randn(2, 16))):
        model(ids).logits.square().mean().backward()
    silent = [name for name, p in translator.named_parameters()
              if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not silent, f"no finite, non-zero gradient: {silent}"


def test_different_documents_get_different_loras_once_trained():
    model, translator = make("shared")
    with torch.no_grad():
        for p in translator.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    lora = translator(torch.randn(2, 16))
    assert not torch.allclose(lora.delta((0, "up"))[0], lora.delta((0, "up"))[1])


def test_shared_translator_is_far_smaller_on_a_deep_model():
    model = tiny_model(num_hidden_layers=8)
    shapes = inject_lora(model).shapes
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_layer = count(ParameterTranslator(shapes, 16, 2, 32.0, "per_layer"))
    shared = count(ParameterTranslator(shapes, 16, 2, 32.0, "shared"))
    assert shared < 0.25 * per_layer


def test_bad_input_is_named():
    _, translator = make("per_layer")
    with pytest.raises(ValueError, match=r"embeddings must be \(N, 16\), got \(3, 8\)"):
        translator(torch.randn(3, 8))
    with pytest.raises(ValueError, match="architecture must be one of"):
        ParameterTranslator({(0, "up"): (4, 8)}, 16, 2, 32.0, "hyper")


def test_checkpoint_round_trip_and_refusals(architecture, tmp_path):
    model, translator = make(architecture)
    with torch.no_grad():
        for p in translator.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    translator.standardize(torch.randn(10, 16) * 3 + 1)  # the linear one's statistics, saved
    out = save_translator(translator, tmp_path / "ckpt", {"base_model": "tiny-a"})
    shapes = inject_lora(model).shapes
    loaded, meta = load_translator(out, base_model="tiny-a", shapes=shapes)
    translator.eval()  # as loaded: batch-normalised slots use their running statistics
    emb = torch.randn(2, 16)
    for key in shapes:
        assert_close(loaded(emb).delta(key), translator(emb).delta(key))
    with pytest.raises(ValueError, match="'tiny-a', not 'tiny-b'"):
        load_translator(out, base_model="tiny-b")
    wider = inject_lora(tiny_model(intermediate_size=64)).shapes
    with pytest.raises(ValueError, match=r"layer 0 gate is \(in, out\) \(32, 48\); this model "
                                         r"has \(32, 64\)"):
        load_translator(out, shapes=wider)
    with pytest.raises(FileNotFoundError, match="no translator checkpoint"):
        load_translator(tmp_path / "nothing")


def test_the_linear_translator_standardises_each_dimension_over_its_documents():
    _, translator = make("linear")
    with torch.no_grad():
        for p in translator.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # Token-mean embeddings: small, sharing a large common part, differing in a small one.
    docs = torch.randn(50, 16) * 0.001 + torch.randn(16) * 0.01
    translator.standardize(docs)
    assert_close(translator.in_mean, docs.mean(0))
    small = translator(docs[:3])
    assert small.delta(small.keys[0]).abs().max() > 0.1  # the small part is the whole input
    scale, shift = torch.rand(16) * 100, torch.randn(16)  # any per-dimension affine change
    translator.standardize(docs * scale + shift)
    large = translator(docs[:3] * scale + shift)
    for key in small.keys:
        assert_close(small.delta(key), large.delta(key), rtol=1e-4, atol=1e-4)


def test_a_linear_translator_saved_before_standardisation_is_refused_with_its_fix(tmp_path):
    import json

    model, translator = make("linear")
    out = save_translator(translator, tmp_path / "old")
    loaded, _ = load_translator(out, shapes=inject_lora(model).shapes)  # today's: loads
    meta = json.loads((out / "meta.json").read_text())
    meta["translator"].pop("input_norm", None)  # as written before the standardisation
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="older dyprag.*--rebuild translator"):
        load_translator(out, shapes=inject_lora(model).shapes)


def test_a_bottleneck_keeps_the_linear_translator_linear_and_smaller(tmp_path):
    model, wide = make("linear")
    _, narrow = make("linear", bottleneck=3)
    size = lambda t: sum(p.numel() for p in t.parameters())  # noqa: E731
    assert size(narrow) < size(wide)
    lora = narrow(torch.randn(2, 16))
    for key in lora.keys:  # zero B at init: the base model
        assert_close(lora.delta(key), torch.zeros_like(lora.delta(key)))
    with torch.no_grad():
        for p in narrow.parameters():
            p.add_(torch.randn_like(p))
    x, y = torch.randn(1, 16), torch.randn(1, 16)
    key = lora.keys[0]
    # B is affine in the embedding: B(x) + B(y) = B((x + y) / 2) · 2
    b = lambda e: narrow(e).B[key]  # noqa: E731
    assert_close(b(x) + b(y), 2 * b((x + y) / 2), rtol=1e-4, atol=1e-5)
    save_translator(narrow, tmp_path / "t")
    loaded, _ = load_translator(tmp_path / "t")
    assert loaded.bottleneck == 3
    assert_close(loaded(x).B[key], b(x))


def _trained(architecture: str) -> ParameterTranslator:
    _, translator = make(architecture)
    with torch.no_grad():
        for p in translator.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # past the zero init, so B depends on the input
    return translator


def test_the_attention_translator_ignores_padding_and_token_order():
    translator = _trained("attention")
    tokens_ = torch.randn(2, 3, 4)
    padded = torch.cat([tokens_, torch.zeros(2, 1, 4)], 1).flatten(1)  # 3 tokens, 1 padding
    shuffled = torch.cat([tokens_[:, [2, 0, 1]], torch.zeros(2, 1, 4)], 1).flatten(1)
    first, second = translator(padded), translator(shuffled)
    for key in first.keys:
        assert_close(first.delta(key), second.delta(key))
    other = torch.cat([tokens_, torch.randn(2, 1, 4)], 1).flatten(1)  # a 4th real token
    assert not torch.allclose(translator(other).B[first.keys[0]], first.B[first.keys[0]])


def test_the_attention_translator_refuses_an_empty_token_list_and_bad_widths():
    translator = _trained("attention")
    with pytest.raises(ValueError, match="empty"):
        translator(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="token_dim"):
        make("attention", token_dim=5)



def test_a_loaded_translator_answers_each_document_alone_whatever_its_batch(tmp_path):
    model = make("attention")[0]
    translator = _trained("attention")  # past the zero init: B depends on the slots
    translator.train()
    for _ in range(3):  # running statistics of the batch-normalised slots
        translator(torch.randn(8, 16))
    out = save_translator(translator, tmp_path / "ckpt", {"base_model": "tiny-a"})
    loaded, _ = load_translator(out, shapes=inject_lora(model).shapes)
    assert not loaded.training
    docs = torch.randn(4, 16)
    with torch.no_grad():
        together, alone = loaded(docs), loaded(docs[:1])
    key = together.keys[0]
    assert_close(together.B[key][:1], alone.B[key])
