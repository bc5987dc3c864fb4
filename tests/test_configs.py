"""Every file in configs/ loads and validates; the config mechanism's overrides and errors."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dyprag.config import Config, Section, dump, load_config, parse_override
from dyprag.data.world import load_schema

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATASETS = ("2wqa", "hotpotqa", "popqa", "cwq")
RUNNABLE = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("world"))
PAPER = [p for p in RUNNABLE if p.stem.rsplit("-", 1)[-1] in DATASETS]  # model × dataset
BASES = sorted((CONFIGS / "base").glob("*.yaml"))


def test_there_are_configs_for_every_model_and_dataset():
    names = {p.stem for p in RUNNABLE}
    for model in ("llama3.2-1b", "qwen2.5-1.5b", "llama3-8b"):
        for data in DATASETS:
            assert f"{model}-{data}" in names


def test_the_world_schema_loads():
    assert load_schema(CONFIGS / "world.yaml")["splits"]["test"] > 0


def test_the_real_model_world_config_uses_the_packaged_chat_model():
    config = load_config(CONFIGS / "smollm2-world.yaml")
    assert config.run.name == "smollm2-world"
    assert (config.data.kind, config.model.name) == ("world", "smollm2-135m-instruct")
    # The world's own QA pairs, so its tables measure the translator (issue 23); a test set
    # of at least 30 people; LoRAs on the top layers, trained from cached states.
    assert (config.prompt.format, config.augment.method) == ("chat", "template")
    assert config.data.test_questions >= 300
    assert config.model.lora_layers == "20-29" and config.train.kl_on == "answer"
    assert {"vanilla", "rag@1", "prag@1", "dyprag@1", "prag+rag@1",
            "dyprag+rag@1"} <= set(config.eval.modes)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_run_config_loads_and_validates(path):
    config = load_config(path)
    assert config.data.kind == "qa" and config.model.name != "world"
    assert config.run.name == path.stem  # outputs never collide between configs
    # PRAG / DyPRAG hyperparameters unless the file says otherwise.
    assert (config.bank.rank, config.bank.alpha) == (2, 32.0)
    assert config.bank.epochs == (2 if "popqa" in path.name else 1)
    assert (config.train.w_lm, config.train.w_kl, config.train.w_mse) == \
        (1.0, 0.01, 100.0)
    assert config.train.lr == 1e-5
    assert config.prompt.format == "chat"  # instruct models, asked through their template


def _leaves(mapping: dict, prefix: str = ""):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", BASES + RUNNABLE, ids=lambda p: p.name)
def test_every_value_a_file_sets_is_the_loaded_value(path):
    config = load_config(path, complete=path not in BASES).to_dict()
    text = yaml.safe_load(path.read_text())
    text.pop("base", None)
    for name, value in _leaves(text):
        loaded = config
        for part in name.split("."):
            loaded = loaded[part]
        assert loaded == value, name


def test_the_printed_config_loads_back_as_the_same_config(tmp_path):
    config = load_config(CONFIGS / "smollm2-world.yaml", ["model.pretrain.epochs=2"])
    (tmp_path / "printed.yaml").write_text(dump(config))
    assert load_config(tmp_path / "printed.yaml") == config
    assert load_config() == Config()  # no file: the default job


def test_nested_sections_are_checked_like_the_others():
    with pytest.raises(ValueError) as err:
        load_config(None, ["model.pretrain.hiden_size=3", "model.pretrain.epochs=0",
                           "bank.rank=0", "wandb.mode=loud"])
    for culprit in ("model.pretrain.hiden_size: unknown key", "model.pretrain.epochs: must be ≥ 1",
                    "bank.rank: must be ≥ 1", "wandb.mode: must be one of (None, 'offline'"):
        assert culprit in str(err.value)


def test_modules_take_their_choices_from_the_config():
    from dyprag.config import TranslatorConfig, choices
    from dyprag.training import translator

    assert translator.ARCHITECTURES == choices(TranslatorConfig, "architecture") == (
        "per_layer", "shared", "linear", "attention")


def test_a_token_list_is_read_by_the_token_translators_and_by_them_alone():
    load_config(None, ["translator.architecture=linear", "translator.embedding=tokens"])
    for bad in (["translator.architecture=linear"], ["translator.embedding=tokens"],
                ["translator.architecture=attention", "translator.embedding=llm"]):
        with pytest.raises(ValueError, match="translator.*'token_list'"):
            load_config(None, bad)


def test_overrides_parse_yaml_values_and_short_floats():
    config = load_config(None, ["train.lr=2e-3", "eval.modes=[vanilla,dyprag@1]",
                                "data.test_questions=5", "wandb.name=x"])
    assert config.train.lr == 2e-3
    assert config.eval.modes == ["vanilla", "dyprag@1"]
    assert config.data.test_questions == 5 and config.wandb.name == "x"
    assert parse_override("model.pretrain.epochs=2") == {"model": {"pretrain": {"epochs": 2}}}


def test_every_problem_is_named_in_one_error():
    with pytest.raises(ValueError) as err:
        load_config(None, ["train.lr=fast", "train.bogus=1", "eval.modes=[dyprag]",
                           "translator.architecture=huge"])
    message = str(err.value)
    for culprit in ("train.bogus: unknown key", "train.lr: must be float", "dyprag@3",
                    "translator.architecture: must be one of"):
        assert culprit in message


def test_bad_override_syntax_and_missing_or_looping_files(tmp_path):
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="loops"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_qa_runs_need_data_and_a_real_model():
    with pytest.raises(ValueError) as err:
        load_config(None, ["data.kind=qa"])
    for field in ("data.corpus", "data.train_qa", "data.test_qa", "model.name"):
        assert field in str(err.value)


def test_extra_documents_count_is_checked_and_a_qa_job_keeps_the_default():
    assert load_config(None, ["data.extra_docs=10"]).data.extra_docs == 10
    with pytest.raises(ValueError, match="data.extra_docs"):
        load_config(None, ["data.extra_docs=-1"])
    qa = load_config(None, ["data.kind=qa", "data.corpus=c", "data.train_qa=t",
                            "data.test_qa=t", "model.name=m"])  # ignored there: world only
    assert qa.data.extra_docs > 0


def test_template_augmentation_is_refused_for_a_qa_dataset():
    with pytest.raises(ValueError, match="augment.method: 'template' is the synthetic world's"):
        load_config(CONFIGS / "llama3.2-1b-2wqa.yaml", ["augment.method=template"])
    with pytest.raises(ValueError, match=r"prompt.format: must be one of \('auto', 'plain', 'chat'\)"):
        load_config(None, ["prompt.format=json"])


@pytest.mark.parametrize("override", ["train.lr=.nan", "train.w_kl=.inf", "bank.lr=-.inf"])
def test_non_finite_numbers_are_refused_by_name(override):
    with pytest.raises(ValueError, match=f"{override.split('=')[0]}: must be a finite number"):
        load_config(None, [override])


def test_a_directory_given_as_config_is_named_as_one(tmp_path):
    with pytest.raises(ValueError, match="is a directory; give a YAML file"):
        load_config(tmp_path)


def test_the_config_imports_without_torch():
    """Reading and validating a config (train.py --help, --print-config) imports no torch."""
    code = "import sys, dyprag.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".world.old", "run name"])
def test_a_run_name_is_one_folder_inside_the_root(name):
    with pytest.raises(ValueError, match="run.name: must be letters, digits and ._-"):
        load_config(None, [f"run.name={name!r}"])


def test_run_names_of_every_shipped_config_are_valid():
    for path in RUNNABLE:
        load_config(path)
    load_config(None, ["run.name=llama3.2-1b_popqa-2"])


def test_a_non_string_base_and_a_deeply_nested_file_are_one_line_each(tmp_path):
    (tmp_path / "base.yaml").write_text("base: 3\n")
    with pytest.raises(ValueError, match="'base:' must be a file name"):
        load_config(tmp_path / "base.yaml")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        load_config(tmp_path / "deep.yaml")
    with pytest.raises(ValueError, match="nested too deeply"):
        load_config(None, ["train.lr=" + "[" * 5000 + "]" * 5000])


def test_a_bad_value_is_echoed_in_a_few_hundred_characters_at_most(tmp_path):
    levels = ["&a [x, x, x, x, x, x, x, x, x]"] + [
        f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcd", "bcde")]
    bomb = f"train: {{lr: [{', '.join(levels)}]}}\n"  # ~230 bytes, 9⁵ x's once expanded
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(ValueError, match="train.lr: must be float") as err:
        load_config(tmp_path / "bomb.yaml")
    assert len(str(err.value)) < 400 and "characters)" in str(err.value)


def _bounded(config: Config):
    """(section.field, value, upper bound) of every bounded number of ``config``."""
    sections = [("", config)]
    while sections:
        prefix, section = sections.pop()
        for name, (_, most) in type(section).RANGES.items():
            yield f"{prefix}{name}", getattr(section, name), most
        sections += [(f"{prefix}{f.name}.", getattr(section, f.name))
                     for f in dataclasses.fields(section)
                     if isinstance(getattr(section, f.name), Section)]


def test_every_upper_bound_is_100x_what_any_config_or_bench_uses():
    uses = [(str(p), load_config(p, complete=p not in BASES)) for p in RUNNABLE + BASES]
    uses.append(("the defaults", Config()))
    for script in sorted((CONFIGS.parent / "bench").glob("*.py")):  # their overrides: key=number
        for key, value in re.findall(r"([a-z_]+(?:\.[a-z_]+)+)=(\d+)\b", script.read_text()):
            uses.append((f"{script.name}: {key}={value}", load_config(None, [f"{key}={value}"])))
    checked = 0
    for where, config in uses:
        for name, value, most in _bounded(config):
            if value is not None and most != math.inf:
                assert 100 * value <= most, f"{where}: {name}={value} is within 100x of {most}"
                checked += 1
    assert checked >= 40 * len(uses)  # every section, model.pretrain too


def test_a_huge_size_is_refused_naming_the_bound():
    with pytest.raises(ValueError, match=r"bank.rank: must be ≤ 4,096, got 800,000.*eval.batch_"):
        load_config(None, ["bank.rank=800000", "eval.batch_size=10000000"])


SNAPSHOTS = Path(__file__).parent / "fixtures" / "configs"  # `train.py --print-config` of each


def _resolved() -> dict[str, str]:
    """What every config resolves to (``dump``, as ``train.py --print-config`` prints it), by
    snapshot name: the embedded default job, the run configs and the bases."""
    return {"default.yaml": dump(Config()),
            **{p.name: dump(load_config(p)) for p in RUNNABLE},
            **{f"base-{p.name}": dump(load_config(p, complete=False)) for p in BASES}}


def test_every_config_resolves_to_its_snapshot():
    """A changed default changes the recipes that inherit it: this names them, and the change
    is made on purpose by rewriting the snapshots (DYPRAG_UPDATE_SNAPSHOTS=1 pytest -k snapshot),
    then measuring the configs it names again."""
    import os

    resolved = _resolved()
    if os.environ.get("DYPRAG_UPDATE_SNAPSHOTS"):
        SNAPSHOTS.mkdir(parents=True, exist_ok=True)
        for old in SNAPSHOTS.glob("*.yaml"):
            old.unlink()
        for name, text in resolved.items():
            (SNAPSHOTS / name).write_text(text)
    stored = {p.name: p.read_text() for p in SNAPSHOTS.glob("*.yaml")}
    changed = sorted(n for n in resolved.keys() | stored.keys() if resolved.get(n) != stored.get(n))
    assert not changed, (f"these configs no longer resolve to their snapshot in {SNAPSHOTS}: "
                         f"{changed}")
