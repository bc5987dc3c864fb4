"""dyprag.training.distill: loss terms, KL masking, translator-only checkpoints, a short Lightning fit."""

from __future__ import annotations

import dataclasses

import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_model
from torch.testing import assert_close
from torch.utils.data import DataLoader

from dyprag.config import load_config
from dyprag.data.augment import AugmentedDoc
from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA
from dyprag.training.distill import DistillationData, EpochShuffle, TranslatorDistillation
from dyprag.training.examples import document_examples
from dyprag.training.fit import translator_recipe
from dyprag.training.translator import ParameterTranslator
from dyprag.training.world_base import build_tokenizer

EXAMPLES = [[[("Question: Where was Idris born? Answer:", False), (" Velmora </s>", True)],
             [("Idris was born in Velmora .", True)]],
            [[("Question: Who employs Tamsin? Answer:", False), (" Halvex </s>", True)]]]


def setup(teacher_std: float = 0.05):
    tokenizer = build_tokenizer(["Question: Where was Idris born? Answer: Velmora .",
                                 "Who employs Tamsin? Halvex", "Idris was born in"])
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    shapes = inject_lora(model).shapes
    torch.manual_seed(0)
    translator = ParameterTranslator(shapes, embed_dim=8, rank=2, alpha=4.0,
                                     architecture="per_layer")
    teachers = LoRA.random(shapes, 2, 4.0, batch_size=2, std=teacher_std,
                           generator=torch.Generator().manual_seed(3))
    data = DistillationData(tokenizer, torch.randn(2, 8), teachers, EXAMPLES)
    return model, tokenizer, translator, data


def batch_of(data, tokenizer):
    return data.collate([data[i] for i in range(len(data))])


def test_identical_student_and_teacher_give_zero_kl_and_mse():
    model, tokenizer, translator, data = setup()
    data.teachers = data.teachers.map(torch.zeros_like)  # the untrained student's ΔW is 0
    losses = TranslatorDistillation(model, translator).losses(batch_of(data, tokenizer))
    assert_close(losses["kl"], torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(losses["mse"], torch.tensor(0.0), atol=1e-6, rtol=0)
    assert losses["lm"] > 0


def _deep_setup(kl_on: str = "all"):
    """A 4-layer model with LoRAs on layers 2-3, a trained-looking student and teachers."""
    tokenizer = build_tokenizer(["Question: Where was Idris born? Answer: Velmora .",
                                 "Who employs Tamsin? Halvex", "Idris was born in"])
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       num_hidden_layers=4).to(torch.float64)
    shapes = inject_lora(model, [2, 3]).shapes
    torch.manual_seed(0)
    translator = ParameterTranslator(shapes, embed_dim=8, rank=2, alpha=4.0,
                                     architecture="per_layer").double()
    with torch.no_grad():
        for p in translator.parameters():
            p.add_(0.1 * torch.randn_like(p))
    teachers = LoRA.random(shapes, 2, 4.0, batch_size=1, std=0.3,
                           generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    data = DistillationData(tokenizer, torch.randn(2, 8, dtype=torch.float64), teachers,
                            EXAMPLES, torch.tensor([1.0, 0.0]))
    system = TranslatorDistillation(model, translator, kl_on=kl_on, first_layer=2)
    return model, data, system


@pytest.mark.parametrize("kl_on", ["all", "answer"])
def test_losses_and_gradients_from_cached_states_equal_full_forwards(kl_on):
    model, data, system = _deep_setup(kl_on)
    results = []
    for cached in (False, True):
        data.states = None
        if cached:
            data.cache_states(model, 2, batch_size=2)
        batch = data.collate([data[i] for i in range(len(data))])
        assert ("states" in batch) == cached
        system.first_layer = 2 if cached else 0
        system.translator.zero_grad()
        losses = system.losses(batch)
        losses["loss"].backward()
        results.append((losses, [p.grad.clone() for p in system.translator.parameters()]))
    (full, full_grads), (cached, cached_grads) = results
    assert full["kl"] > 0 and full["lm"] > 0
    for key in ("loss", "lm", "kl", "mse"):
        assert_close(cached[key], full[key], rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in full_grads)
    for c, f in zip(cached_grads, full_grads):
        assert_close(c, f, rtol=1e-9, atol=1e-12)


def test_the_kl_on_answers_reads_only_the_labelled_positions():
    model, data, system = _deep_setup("answer")
    batch = data.collate([data[i] for i in range(len(data))])
    answer = system.losses(batch)["kl"]
    system.kl_on = "all"
    every = system.losses(batch)["kl"]
    assert not torch.isclose(answer, every)
    # Changing a prompt token's teacher-student gap only where no answer is predicted leaves
    # the answer-only KL as it was: its value equals a hand computation over labelled tokens.
    from dyprag.engine.prefix import final_hidden, logits_at
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    at = (targets != -100) & (batch["distilled"] > 0)[:, None]
    student = system.translator(batch["embedding"])
    teacher = LoRA(batch["teacher_A"], batch["teacher_B"], 4.0)
    with torch.no_grad():
        with system.injection.use(student):
            s = logits_at(model, final_hidden(model, ids, mask), at)
        with system.injection.use(teacher):
            t = logits_at(model, final_hidden(model, ids, mask), at)
    want = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1).mean()
    assert_close(answer.detach(), want, rtol=1e-8, atol=1e-10)


def test_kl_ignores_padding():
    model, tokenizer, translator, data = setup()
    system = TranslatorDistillation(model, translator)
    batch = batch_of(data, tokenizer)
    kl = system.losses(batch)["kl"]
    # Changing what sits in padded positions must not change the KL.
    pad = batch["attention_mask"] == 0
    assert pad.any()
    batch["input_ids"] = batch["input_ids"].masked_fill(pad, 5)
    assert_close(system.losses(batch)["kl"], kl)


def test_checkpoint_holds_the_translator_only():
    model, _, translator, _ = setup()
    state = TranslatorDistillation(model, translator).state_dict()
    assert state and all(k.startswith("translator.") for k in state)


def test_a_short_fit_lowers_the_loss_and_leaves_the_base_untouched():
    model, tokenizer, translator, data = setup(teacher_std=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    system = TranslatorDistillation(model, translator, lr=1e-2, total_steps=30)
    batch = batch_of(data, tokenizer)
    start = system.losses(batch)["loss"].item()
    loader = DataLoader(data, batch_size=3, collate_fn=data.collate)
    trainer = pl.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(system, loader)
    assert system.losses(batch)["loss"].item() < start
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_delta_space_mse_matches_formed_matrices():
    model, tokenizer, translator, data = setup(teacher_std=0.3)
    with torch.no_grad():  # a student with nonzero B, so both sides of the distance count
        for p in translator.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = batch_of(data, tokenizer)
    losses = TranslatorDistillation(model, translator).losses(batch)
    student = translator(batch["embedding"])
    teacher = LoRA(batch["teacher_A"], batch["teacher_B"], translator.alpha)
    per_target = [((student.scaling * student.B[k] @ student.A[k]
                    - teacher.scaling * teacher.B[k] @ teacher.A[k]) ** 2).mean(dim=(-1, -2))
                  for k in student.keys]  # each (N,): mean over the entries of ΔW
    assert_close(losses["mse"], torch.stack(per_target).mean(), rtol=1e-4, atol=1e-7)
    rms = torch.stack([((teacher.scaling * teacher.B[k] @ teacher.A[k]) ** 2).mean(dim=(-1, -2))
                       for k in teacher.keys]).mean().sqrt()
    assert_close(losses["lora_rms_teacher"], rms, rtol=1e-4, atol=1e-7)


def test_factor_space_mse_is_dyprags():
    model, tokenizer, translator, data = setup(teacher_std=0.3)
    batch = batch_of(data, tokenizer)
    losses = TranslatorDistillation(model, translator, mse_space="factor").losses(batch)
    student = translator(batch["embedding"])
    teacher = LoRA(batch["teacher_A"], batch["teacher_B"], translator.alpha)
    expected = torch.stack([((student.A[k] - teacher.A[k]) ** 2).mean(dim=(-1, -2))
                            + ((student.B[k] - teacher.B[k]) ** 2).mean(dim=(-1, -2))
                            for k in student.keys]).mean()
    assert_close(losses["mse"], expected)


def test_lm_term_is_the_answer_tokens_next_token_loss():
    model, tokenizer, translator, data = setup()
    batch = batch_of(data, tokenizer)
    losses = TranslatorDistillation(model, translator).losses(batch)
    # The untrained student's ΔW is exactly 0: L_lm is the base model's loss on the labels.
    assert_close(losses["lm"], model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"],
                                     labels=batch["labels"]).loss)


def test_lm_only_rows_are_left_out_of_the_kl_and_mse():
    model, tokenizer, translator, data = setup(teacher_std=0.3)
    system = TranslatorDistillation(model, translator)
    batch = batch_of(data, tokenizer)
    only_first = data.rows[0][0]  # the document of row 0
    batch["distilled"] = (torch.tensor([i for i, _ in data.rows]) == only_first).float()
    before = system.losses(batch)
    for key in ("teacher_A", "teacher_B"):  # garbage teachers on the LM-only rows
        batch[key] = {k: torch.where(batch["distilled"].view(-1, 1, 1) > 0, v, v * 50 + 3)
                      for k, v in batch[key].items()}
    after = system.losses(batch)
    for term in ("kl", "mse", "lm"):
        assert_close(after[term], before[term])


def test_the_teacher_runs_only_when_its_kl_counts():
    model, tokenizer, translator, data = setup(teacher_std=0.3)
    batch = batch_of(data, tokenizer)
    calls = []
    model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    assert TranslatorDistillation(model, translator, w_kl=0.01).losses(batch)["kl"] > 0
    assert len(calls) == 2  # student, teacher
    calls.clear()
    losses = TranslatorDistillation(model, translator, w_kl=0.0).losses(batch)
    assert len(calls) == 1 and losses["kl"] == 0
    calls.clear()
    batch["distilled"] = torch.zeros_like(batch["distilled"])  # LM-only rows: no teacher
    TranslatorDistillation(model, translator, w_kl=0.01).losses(batch)
    assert len(calls) == 1


def test_the_teacher_reads_only_the_rows_with_a_teacher():
    model, tokenizer, translator, data = setup(teacher_std=0.3)
    batch = batch_of(data, tokenizer)  # rows: doc 0, doc 0, doc 1
    system = TranslatorDistillation(model, translator)
    batch["distilled"] = torch.tensor([0.0, 0.0, 1.0])
    rows = []
    model.get_decoder().register_forward_hook(lambda m, args, kwargs, out: rows.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    kl = system.losses(batch)["kl"]
    assert rows == [3, 1]  # the student on every row, the teacher on row 2 alone
    # The KL of row 2 alone, as a batch of that one row computes it:
    alone = {k: (v[2:] if torch.is_tensor(v) else {t: x[2:] for t, x in v.items()})
             for k, v in batch.items()}
    assert_close(kl, system.losses(alone)["kl"])


def test_epoch_shuffle_batches_rows_of_similar_lengths_in_a_seeded_order():
    lengths = [15] * 300 + [65] * 100  # the world: closed-book questions and with-passage ones
    sampler = EpochShuffle(len(lengths), seed=0, lengths=lengths, batch_size=10, window=8)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    padded = sum(max(lengths[i] for i in order[b:b + 10]) * 10 for b in range(0, 400, 10))
    shuffled = list(EpochShuffle(len(lengths), seed=0))
    assert padded < 0.6 * sum(max(lengths[i] for i in shuffled[b:b + 10]) * 10
                              for b in range(0, 400, 10))
    assert list(EpochShuffle(len(lengths), 0, lengths, 10, 8)) == order  # the seed alone
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_the_translator_trains_on_qa_and_on_passages_only_when_asked():
    doc = AugmentedDoc("d", "Idris was born in Velmora .", ["Velmora is where Idris was born ."],
                       [{"question": "Where was Idris born?", "answer": "Velmora"}])
    tokenizer = build_tokenizer([doc.text, *doc.rewrites, "Question: Answer: Passage: Where"])

    def texts(overrides: list[str]) -> list[str]:
        config = load_config(None, overrides)
        recipe = translator_recipe(config.bank, config.train)
        return ["".join(t for t, _ in ex) for ex in document_examples(doc, recipe, tokenizer)]

    qa_only = texts(["train.qa_with_passage=0"])
    assert len(qa_only) == 1 and "Velmora" not in qa_only[0].split("Answer:")[0]
    with_text = texts(["train.passage_lm=true", "train.qa_with_passage=0"])
    assert any(t.startswith(doc.text) for t in with_text) and len(with_text) == 3
    with_passage = texts([])  # the default, train.qa_with_passage=1
    assert len(with_passage) == 3  # + the QA after each of 2 texts
    assert with_passage[0].startswith(f"Passage: {doc.text}")


def test_spread_passage_questions_differ_per_text():
    qa = [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(10)]
    doc = AugmentedDoc("d", "Idris was born in Velmora .", ["R1 .", "R2 ."], qa)
    tokenizer = build_tokenizer([doc.text, "R1 R2 Question: Answer: Passage:"] + [
        f"Q{i} A{i}" for i in range(10)])
    config = load_config(None, ["train.qa_with_passage=1"])
    recipe = translator_recipe(config.bank, config.train)

    def asked(spread: bool) -> list[tuple[str, str]]:
        rows = document_examples(doc, dataclasses.replace(recipe, spread=spread), tokenizer)
        with_text = [ex[0][0] for ex in rows if ex[0][0].startswith("Passage:")]
        return [(p.split("Passage: ")[1].split(" Question")[0].strip(), p.split("Question: ")[1].split()[0])
                for p in with_text]

    assert [q for _, q in asked(False)] == ["Q0?"] * 3  # the first pair with every text
    spread = asked(True)
    assert [t for t, _ in spread] == [doc.text, "R1 .", "R2 ."]
    assert [q for _, q in spread] == ["Q0?", "Q3?", "Q6?"]  # one per text, spread over ten
    def closed(spread: bool) -> list:
        rows = document_examples(doc, dataclasses.replace(recipe, spread=spread), tokenizer)
        return [ex for ex in rows if not ex[0][0].startswith("Passage:")]

    assert closed(True) == closed(False)


def test_lm_only_documents_share_one_zero_teacher():
    model, tokenizer, _, data = setup(teacher_std=0.3)
    first = data.teachers[0]
    mixed = DistillationData(tokenizer, data.embeddings, LoRA.stack([first]), EXAMPLES, torch.tensor([1, 0]))
    batch = mixed.collate([mixed[i] for i in range(len(mixed))])
    assert mixed.teachers.batch_size == 2  # the bank LoRA and the placeholder
    for key in first.keys:
        for row, (doc, _) in enumerate(mixed.rows):
            expected = first.A[key] if doc == 0 else torch.zeros_like(first.A[key])
            assert_close(batch["teacher_A"][key][row], expected)
    assert batch["distilled"].tolist() == [1.0 if d == 0 else 0.0 for d, _ in mixed.rows]
    with pytest.raises(ValueError, match="2 bank LoRAs the 1 distilled"):
        DistillationData(tokenizer, data.embeddings, LoRA.stack([first, first]), EXAMPLES, torch.tensor([1, 0]))
