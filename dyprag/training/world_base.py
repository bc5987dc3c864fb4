"""Pretrain the synthetic world's tiny base model: a word-level tokenizer and a small Llama.

    python -m dyprag.training.world_base --world /tmp/my-world --out /tmp/my-base

No LLM weights can be downloaded here, so the project builds its own base model. It is
trained (Lightning) on two kinds of text, in curriculum order (see ``pretraining_texts``):

- about the ``pretrain`` entities: bios and their rewrites (language modelling on every
  token) and closed-book questions (learning to *recall*; loss on the answer);
- about *fresh* entities with random attributes: passages followed by questions (learning
  to *read*; loss on the answers), first one passage, then several look-alikes.

Train and test entities never appear, so closed-book answers about them are at chance. The
result is saved with ``save_pretrained`` and loads back with ``dyprag.engine.models.load_model``
like any Hugging Face model. It is cached, in the run and for every run and clone on the
machine (``shared_base_dir``): pretrained again only when the world or the recipe changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader

from dyprag.config import PretrainConfig, auto
from dyprag.data.corpus import iter_corpus
from dyprag.data.qa import load_qa
from dyprag.data.world import SPLITS, Entity, fresh_entities, load_entities, render
from dyprag.engine.models import model_cache
from dyprag.engine.prompts import passage_context, qa_prompt
from dyprag.files import (
    atomic_dir,
    atomic_write_json,
    file_sha256,
    fingerprint,
    is_cached,
    linked_copy,
    read_json,
)
from dyprag.training.examples import Segments, length_sorted, pad, tokenize
from dyprag.training.optim import adamw_warmup_cosine
from dyprag.training.progress import FitProgress

SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

def build_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over every word (and punctuation mark) in ``texts``."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    vocab.update({w: i + len(vocab) for i, w in enumerate(w for w in words if w not in vocab)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk"]))
    backend.pre_tokenizer = pre
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=SPECIALS["pad"], bos_token=SPECIALS["bos"],
        eos_token=SPECIALS["eos"], unk_token=SPECIALS["unk"])


def pretraining_texts(world_dir: Path, single: int, multi: int, max_passages: int,
                      questions_per_context: int, seed: int,
                      gold_first: float = 0.0) -> list[Segments]:
    """Every pretraining sequence, in curriculum order.

    Bios, rewrites and closed-book questions are about the pretrain entities (facts to
    memorise); they are spread evenly over the whole run. Reading practice is about *fresh*
    entities with random attributes, so reading is the only way to answer (with pretrain
    entities the model answers from memory and ignores the context). It comes in two stages:

    1. ``single`` one-passage examples, mostly partial bios, one question each: short
       passages are where the copy-the-right-value skill is found at all (with full bios
       only, one-passage reading stayed at chance; bench/RESULTS.md, "world_baselines");
    2. ``multi`` examples with 1..``max_passages`` passages, half of them full bios, and
       ``questions_per_context`` questions each about one person: finding the right entity
       among several. Passages come in a retriever's order: the person asked about is first
       with probability ``gold_first`` (a retriever's precision at 1), elsewhere otherwise.

    Reading questions use both the test phrasings (``question_templates``) and the
    augmentation phrasings (``augment_question_templates``): the base model should understand
    the language of both, so that knowledge injected with one is asked for with the other.
    """
    rng = random.Random(seed)
    schema = read_json(world_dir / "schema.json")
    entities = [e for e in load_entities(world_dir) if e["split"] == "pretrain"]
    names = {e["id"] for e in entities}
    memory = [[(p.text, True)] for p in iter_corpus(world_dir / "corpus.jsonl") if p.id in names]
    memory += [[(r, True)] for e in entities for r in e["rewrites"]]
    memory += [[(qa_prompt(qa.question), False), (_answer(qa.answers[0]), True)]
               for qa in load_qa(world_dir / "qa_pretrain.jsonl")]
    pool = fresh_entities(schema, single + multi * max_passages, rng)
    stage1 = [_reading([e], 0.1, 1, schema, rng) for e in pool[:single]]
    by_part: dict[str, list[Entity]] = {}
    for e in pool[single:]:
        for part in e.name.split():
            by_part.setdefault(part, []).append(e)
    stage2 = []
    for i in range(multi):
        first = pool[single + i]
        people, k = [first], rng.randint(1, max_passages)
        while len(people) < k:
            # Retrieval returns look-alikes (bios of people sharing a first or last name), so
            # most distractors here share a name part with the person asked about.
            look_alikes = by_part[rng.choice(first.name.split())]
            other = rng.choice(look_alikes if rng.random() < 0.7 else pool[single:])
            if other.name not in {p.name for p in people}:
                people.append(other)
        if rng.random() < gold_first:
            rest = people[1:]
            rng.shuffle(rest)
            people = [first, *rest]
        else:
            rng.shuffle(people)
        stage2.append(_reading(people, 0.5, questions_per_context, schema, rng,
                               about=people.index(first)))
    rng.shuffle(stage1)
    rng.shuffle(stage2)
    reading = stage1 + stage2
    keyed = [(i / len(reading), ex) for i, ex in enumerate(reading)]
    keyed += [(rng.random(), ex) for ex in memory]
    keyed.sort(key=lambda pair: pair[0])
    return [ex for _, ex in keyed]


def _reading(people: list[Entity], p_full: float, questions: int, schema: dict[str, Any],
             rng: random.Random, about: int | None = None) -> Segments:
    """Passages about ``people`` (each all facts with probability ``p_full``, else 1..n of
    them), then ``questions`` questions about what the passages say (about ``people[about]``,
    or each about anyone shown when ``about`` is None)."""
    shown = [_some_facts(e, p_full, rng) for e in people]
    context = passage_context([render(e, schema["bio_templates"], rng) for e in shown])
    segments: Segments = [(context, False)]
    for q in range(questions):
        entity = rng.choice(shown) if about is None else shown[about]
        attr = rng.choice(list(entity.attributes))
        phrasings = schema["question_templates"][attr] + schema["augment_question_templates"][attr]
        question = rng.choice(phrasings).format(name=entity.name)
        segments += [(("" if q == 0 else " ") + f"Question: {question} Answer:", False),
                     (_answer(entity.attributes[attr]), True)]
    return segments


def _answer(value: str) -> str:
    return f" {value} {SPECIALS['eos']}"


def _some_facts(entity: Entity, p_full: float, rng: random.Random) -> Entity:
    """The entity with all its facts with probability ``p_full``, else with 1..n of them."""
    attrs = list(entity.attributes)
    if rng.random() < p_full:
        return entity
    kept = rng.sample(attrs, rng.randint(1, len(attrs)))
    return dataclasses.replace(entity, attributes={a: entity.attributes[a] for a in kept})


class BaseModelPretraining(pl.LightningModule):
    """Next-token training of a fresh Llama with AdamW, linear warm-up and cosine decay."""

    def __init__(self, model: transformers.PreTrainedModel, lr: float, warmup_steps: int,
                 total_steps: int, weight_decay: float):
        super().__init__()
        self.model = model
        self.lr, self.warmup, self.total, self.wd = lr, warmup_steps, total_steps, weight_decay

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.model.parameters(), self.lr, self.wd, self.warmup,
                                   self.total)


SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "world-base"
"""The default world's base model (configs/world.yaml, the default recipe), in the package:
``python train.py`` on a new machine copies it instead of pretraining it."""


def pretrain_base(world_dir: str | Path, out_dir: str | Path,
                  recipe: PretrainConfig | None = None, fresh: bool = False) -> Path:
    """Build tokenizer + model for the world in ``world_dir`` (``recipe``: the default job's
    when None) into ``out_dir``. Cached three ways: in ``out_dir``; for every run and clone on
    this machine in ``shared_base_dir``; and, for the default world and recipe, in the package
    (``SHIPPED``): a model whose fingerprint (world schema + recipe) matches is copied instead
    of pretrained. ``fresh``: pretrain even so (``train.py --rebuild base``); the log then says
    whether the new weights equal the shipped ones byte for byte."""
    world, out = Path(world_dir), Path(out_dir)
    recipe = recipe or PretrainConfig()
    world_key = read_json(world / "meta.json")["fingerprint"]
    config = dataclasses.asdict(recipe)  # what the fingerprint covers, also written to pretrain.json
    key = fingerprint([world_key, config])
    meta_path, shared = out / "pretrain.json", shared_base_dir(key)
    if is_cached(meta_path, key) and not fresh:
        return out
    for source in () if fresh else (shared, SHIPPED):
        if is_cached(source / meta_path.name, key):
            linked_copy(source, out)
            print(f"[dyprag] base model copied from {source} (its pretraining took "
                  f"{read_json(source / meta_path.name)['seconds']}s; --rebuild base to "
                  "pretrain it again)", flush=True)
            return out

    pl.seed_everything(recipe.seed, verbose=False)
    examples = pretraining_texts(world, recipe.reading_single, recipe.reading_multi,
                                 recipe.max_passages, recipe.questions_per_context,
                                 recipe.seed, recipe.gold_first)
    corpus_text = [p.text for p in iter_corpus(world / "corpus.jsonl")]
    all_questions = [qa.question for split in SPLITS for qa in load_qa(world / f"qa_{split}.jsonl")]
    tokenizer = build_tokenizer(corpus_text + all_questions
                                + [text for segments in examples for text, _ in segments])
    model_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_attention_heads,
        max_position_embeddings=recipe.max_position_embeddings, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    model = transformers.LlamaForCausalLM(model_config)
    rows = tokenize(tokenizer, examples)
    if recipe.length_window:
        rows = length_sorted(rows, [len(ids) for ids, _ in rows], recipe.batch_size,
                             recipe.length_window, random.Random(recipe.seed))
    # Not shuffled: the examples are already in curriculum order (shuffled within stages).
    loader = DataLoader(rows, batch_size=recipe.batch_size, shuffle=False,
                        collate_fn=lambda b: pad(b, tokenizer.pad_token_id))
    steps = recipe.epochs * len(loader)
    system = BaseModelPretraining(model, recipe.lr, recipe.warmup_steps, steps,
                                  recipe.weight_decay)
    trainer = pl.Trainer(max_epochs=recipe.epochs, accelerator="auto", devices=1,
                         logger=False, enable_checkpointing=False, gradient_clip_val=1.0,
                         callbacks=[FitProgress("pretraining")],
                         enable_model_summary=False, log_every_n_steps=10,
                         precision=auto("precision", "auto"))
    start = time.perf_counter()
    trainer.fit(system, loader)
    seconds = time.perf_counter() - start

    with atomic_dir(out) as tmp:  # a killed save leaves no half-written model
        model.eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / meta_path.name, {
            "fingerprint": key, "config": config, "world": world_key, "examples": len(examples),
            "steps": steps, "seconds": round(seconds, 1)})
    if is_cached(SHIPPED / meta_path.name, key):
        digest = file_sha256(out / WEIGHTS)
        same = digest == file_sha256(SHIPPED / WEIGHTS)
        print(f"[dyprag] the pretrained weights {'equal' if same else 'differ from'} the "
              f"shipped ones ({WEIGHTS} sha256 {digest[:16]})", flush=True)
    try:
        # Replaces a kept copy on --rebuild base; else one another job kept meanwhile stays.
        linked_copy(out, shared, keep_existing=not fresh)
    except OSError as err:  # a read-only or full cache costs later runs time, not this one
        print(f"[dyprag] could not keep the base model in {shared} ({err})", flush=True)
    return out


WEIGHTS = "model.safetensors"


def shared_base_dir(key: str) -> Path:
    """Where the world's base model of fingerprint ``key`` is kept for every run and clone:
    ``$DYPRAG_CACHE/models/world-base-<key>`` (default ``~/.cache/dyprag/models``)."""
    return model_cache() / f"world-base-{key}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Pretrain the synthetic world's base model.")
    parser.add_argument("--world", required=True, help="world directory (python -m dyprag.data.world)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--epochs", type=int, default=PretrainConfig.epochs)
    args = parser.parse_args()
    out = pretrain_base(args.world, args.out, PretrainConfig(epochs=args.epochs))
    print(json.dumps(read_json(out / "pretrain.json")))


if __name__ == "__main__":
    main()
