"""Tiny random Hugging Face causal LMs built from configs, seeded, fp32, CPU."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from tiny_world import tiny_run_config

from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA
from dyprag.files import file_sha256

# Models made here (the world's base model, converted GGUF files) are kept in a cache shared by
# every run on the machine; the tests keep theirs apart (subprocesses inherit this).
os.environ["DYPRAG_CACHE"] = tempfile.mkdtemp(prefix="dyprag-test-cache-")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 8}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, {"head_dim": 8}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {}),
}
PEFT_ARCHITECTURES = ["llama", "qwen2", "mistral", "phi3"]


def tiny_model(arch: str = "llama", seed: int = 0, head_scale: float = 1.0, **overrides):
    """A random tiny model; ``head_scale`` > 1 makes next-token logits peaked (no near-ties)."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    model = model_cls(config).eval()
    if head_scale != 1.0:
        model.config.tie_word_embeddings = False
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone() * head_scale)
    return model


def random_lora(model, rank: int = 2, alpha: float = 4.0, batch_size: int | None = None,
                seed: int = 1, std: float = 0.3) -> LoRA:
    shapes = inject_lora(model).shapes
    return LoRA.random(shapes, rank, alpha, batch_size=batch_size, std=std,
                       generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request) -> str:
    return request.param


def tokens(batch: int, length: int, seed: int = 2, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def exits_with_one_line(capsys, call, *needles: str, alone: bool = False) -> str:
    """``call()`` exits 2, its last line on stderr an error naming every needle (``alone``: the
    only line, as when nothing ran before the error); returns that line."""
    with pytest.raises(SystemExit) as exit_:
        call()
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert exit_.value.code == 2 and err.startswith("error"), lines
    assert not alone or len(lines) == 1, lines
    for needle in needles:
        assert needle in err, err
    return err


# ---- a tiny trained run (train.py end to end), shared by test_train and test_infer ----------
def run_files(run: Path) -> dict[str, str]:
    """Every file of a run by its relative path → sha256 of its bytes."""
    return {str(p.relative_to(run)): file_sha256(p)
            for p in sorted(run.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(config path, run directory) of ``train.py`` on a world of 30 + 12 + 6 people, shared
    by the session: read it only (a test that trains or changes a run takes ``own_run``).
    At the session's end its files must be as they were made."""
    import train

    tmp = tmp_path_factory.mktemp("train")
    config = tiny_run_config(tmp)
    with (tmp / "train.stdout").open("w") as f, contextlib.redirect_stdout(f):
        train.main(["--config", str(config)])
    run = tmp / "checkpoints" / "tiny"
    made = run_files(run)
    yield config, run
    now = run_files(run)
    changed = sorted(k for k in made.keys() | now.keys() if made.get(k) != now.get(k))
    assert not changed, f"a test changed the shared tiny run (use own_run): {changed[:5]}"


@pytest.fixture
def own_run(tiny_run, tmp_path, monkeypatch):
    """(train.py arguments that rerun it, run directory) of a private copy of the tiny run."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, out = tiny_run
    mine = tmp_path / "checkpoints" / out.name
    shutil.copytree(out, mine, symlinks=True)
    return ["--config", str(config), f"run.root={mine.parent}",
            "eval.modes=[vanilla,dyprag@1]"], mine


@pytest.fixture(scope="session")
def tiny_run_stdout(tiny_run) -> str:
    """What ``train.py`` printed while making the tiny run."""
    return (tiny_run[0].parent / "train.stdout").read_text()
