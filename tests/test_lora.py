"""dyprag.engine.lora and dyprag.engine.lora_io: container checks, combine, distances, save/load,
PEFT export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import PEFT_ARCHITECTURES, random_lora, tiny_model, tokens
from peft import PeftModel
from torch.testing import assert_close

from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA, combine, delta_cosines, delta_distance, factor_mse, sum_groups
from dyprag.engine.lora_io import export_peft, load_lora, save_lora

SHAPES = {(0, "gate"): (6, 10), (0, "up"): (6, 10), (0, "down"): (10, 6),
          (1, "gate"): (6, 10), (1, "up"): (6, 10), (1, "down"): (10, 6)}


def _random(seed: int, rank: int = 2, alpha: float = 8.0, batch_size: int | None = None) -> LoRA:
    return LoRA.random(SHAPES, rank, alpha, batch_size=batch_size, std=0.5,
                       generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_container_reports_rank_alpha_scaling_and_batch():
    lora = _random(0, rank=2, alpha=8.0, batch_size=3)
    assert (lora.rank, lora.alpha, lora.scaling, lora.batch_size) == (2, 8.0, 4.0, 3)
    assert lora.layers == [0, 1]
    assert lora.keys[:3] == [(0, "gate"), (0, "up"), (0, "down")]
    assert lora[1].batch_size is None
    assert LoRA.stack([lora[0], lora[1]]).batch_size == 2


def test_container_rejects_mixed_batch_and_missing_factor():
    lora = _random(0)
    with pytest.raises(ValueError, match=r"layer 1 module down: B has shape \(1, 6, 2\)"):
        LoRA(lora.A, {**lora.B, (1, "down"): lora.B[(1, "down")][None]}, lora.alpha)
    with pytest.raises(ValueError, match="A and B cover different targets"):
        LoRA(lora.A, {k: b for k, b in lora.B.items() if k != (0, "up")}, lora.alpha)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_combine_is_the_weighted_sum_of_deltas(batch_size):
    loras = [_random(s, batch_size=batch_size) for s in (1, 2, 3)]
    loras[2] = LoRA(loras[2].A, loras[2].B, alpha=2.0)  # another scaling is folded into B
    weights = torch.tensor([0.2, 1.0, -0.5])
    merged = combine(loras, weights)
    assert merged.rank == 6 and merged.scaling == loras[0].scaling
    for key in SHAPES:
        expected = sum(w * x.delta(key) for w, x in zip(weights.double(), loras))
        assert_close(merged.delta(key), expected)


def test_combine_takes_per_sample_weights():
    loras = [_random(s, batch_size=2) for s in (1, 2)]
    weights = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # sample 0 keeps LoRA 0; sample 1 3×LoRA 1
    merged = combine(loras, weights)
    key = (1, "up")
    assert_close(merged.delta(key)[0], loras[0].delta(key)[0])
    assert_close(merged.delta(key)[1], 3 * loras[1].delta(key)[1])


def test_sum_groups_sums_each_run_of_k_rows():
    lora = _random(4, batch_size=6)  # two groups of three
    summed = sum_groups(lora, 3)
    assert (summed.batch_size, summed.rank) == (2, 6)
    for g in range(2):
        for key in lora.keys:
            expected = sum(lora[3 * g + j].delta(key) for j in range(3))
            assert_close(summed[g].delta(key), expected)
    assert sum_groups(lora, 1) is lora
    with pytest.raises(ValueError, match="groups of 4"):
        sum_groups(lora, 4)


def test_sum_groups_weights_each_document():
    lora = _random(4, batch_size=4)  # two groups of two
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    summed = sum_groups(lora, 2, weights)
    for key in lora.keys:
        assert_close(summed[0].delta(key), 0.25 * lora[0].delta(key) + 0.75 * lora[1].delta(key))
        assert_close(summed[1].delta(key), lora[2].delta(key))
    single = sum_groups(lora, 1, torch.full((4, 1), 0.5))
    assert_close(single[3].delta(key), 0.5 * lora[3].delta(key))


def test_delta_cosines_equal_those_of_the_formed_deltas():
    lora = _random(5, rank=3, batch_size=4)
    lora = LoRA.stack([lora[0], lora[1], lora[0].map(lambda t: 2 * t), lora[3]])
    flat = torch.cat([torch.stack([lora[i].delta(k).flatten() for k in lora.keys]).flatten()[None]
                      for i in range(4)])
    expected = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    cosines = delta_cosines(lora)
    assert_close(cosines, expected)
    assert_close(float(cosines[0, 2]), 1.0)  # (2A, 2B): the same direction


@pytest.mark.parametrize("batch_size", [None, 3])
def test_delta_distance_equals_formed_frobenius_norm(batch_size):
    x, y = _random(1, rank=2, batch_size=batch_size), _random(2, rank=3, alpha=3.0,
                                                              batch_size=batch_size)
    formed = sum(((x.delta(k) - y.delta(k)) ** 2).sum(dim=(-1, -2)) for k in SHAPES)
    assert_close(delta_distance(x, y), formed)
    assert_close(delta_distance(x, x), torch.zeros_like(formed), atol=1e-9, rtol=0)


def test_delta_distance_ignores_factorisation_but_factor_mse_does_not():
    x = _random(1)
    rescaled = LoRA({k: 2 * a for k, a in x.A.items()}, {k: b / 2 for k, b in x.B.items()},
                    x.alpha)
    assert_close(delta_distance(x, rescaled), torch.tensor(0.0, dtype=torch.float64),
                 atol=1e-9, rtol=0)
    assert factor_mse(x, rescaled) > 0.1


def test_factor_mse_value():
    x = _random(1, batch_size=2)
    y = x.map(lambda t: t + 0.5)
    assert_close(factor_mse(x, y), torch.full((2,), 0.5, dtype=torch.float64))


def test_save_load_round_trip(tmp_path):
    lora = _random(3, batch_size=2)
    save_lora(lora, tmp_path / "bank", meta={"base_model": "tiny"})
    loaded, meta = load_lora(tmp_path / "bank")
    assert meta["rank"] == 2 and meta["batch_size"] == 2 and meta["base_model"] == "tiny"
    assert loaded.keys == lora.keys and loaded.alpha == lora.alpha
    for key, a, b in lora.items():
        assert torch.equal(loaded.A[key], a) and torch.equal(loaded.B[key], b)
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["lora.safetensors",
                                                                    "meta.json"]


def test_load_refuses_other_base_model_and_bad_files(tmp_path):
    save_lora(_random(3), tmp_path / "x", meta={"base_model": "org/model-a"})
    with pytest.raises(ValueError, match="made for base model 'org/model-a', not 'org/model-b'"):
        load_lora(tmp_path / "x", base_model="org/model-b")
    (tmp_path / "x" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json is unreadable \(not valid JSON"):
        load_lora(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="missing/meta.json does not exist"):
        load_lora(tmp_path / "missing")


@pytest.mark.parametrize("arch", PEFT_ARCHITECTURES)
def test_peft_export_loads_in_peft_and_reproduces_logits(arch, tmp_path):
    model = tiny_model(arch)
    lora = random_lora(model)
    ids = tokens(2, 9)
    with inject_lora(model).use(lora):
        ours = model(ids).logits
    export_peft(lora, model, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["base_model_name_or_path"] == "tiny"
    base = copy.deepcopy(model)
    inject_lora(base).remove()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert_close(peft_model(ids).logits, ours)


def test_peft_export_of_a_lora_on_the_top_layers_adds_nothing_below(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    inject_lora(model, [2, 3])
    lora = random_lora(model)
    ids = tokens(2, 9)
    with inject_lora(model).use(lora):
        ours = model(ids).logits
    export_peft(lora, model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [2, 3]
    base = copy.deepcopy(model)
    inject_lora(base).remove()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert not any("layers.1." in name and "lora_A" in name for name, _ in peft_model.named_modules())
    assert_close(peft_model(ids).logits, ours)
