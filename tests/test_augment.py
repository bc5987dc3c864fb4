"""dyprag.data.augment: QA parsing, bounded retries, the world's template augmenter, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_world import CONFIG

from dyprag.data.augment import (
    AugmentedDoc,
    LLMAugmenter,
    TemplateAugmenter,
    augment_corpus,
    parse_qa,
    read_augmented,
)
from dyprag.data.corpus import Passage, iter_corpus
from dyprag.data.world import generate_world, load_schema

PASSAGES = [Passage("d1", "", "Idris Kael was born in Velmora."),
            Passage("d2", "", "Tamsin Reole works for Halvex.")]
GOOD = '[{"question": "Where was Idris Kael born?", "answer": "Velmora"}]'


def test_parse_qa_finds_the_list_in_surrounding_text():
    reply = f"Sure! Here they are:\n{GOOD}\nHope this helps."
    assert parse_qa(reply, 3) == [{"question": "Where was Idris Kael born?", "answer": "Velmora"}]


def test_parse_qa_keeps_at_most_n_and_drops_malformed_items():
    reply = json.dumps([{"question": "q1", "answer": "a1"}, {"question": "", "answer": "x"},
                        "junk", {"question": "q2", "answer": 1963}, {"question": "q3", "answer": "a3"}])
    assert parse_qa(reply, 2) == [{"question": "q1", "answer": "a1"},
                                  {"question": "q2", "answer": "1963"}]


@pytest.mark.parametrize("reply", ["no list here", "[not json]", '[{"q": 1}]', "[]"])
def test_parse_qa_rejects_unusable_replies(reply):
    with pytest.raises(ValueError):
        parse_qa(reply, 3)


def test_parse_qa_reads_question_answer_lines():
    reply = ("Question: Where was Idris Kael born?\nAnswer: Velmora.\n"
             "2. Q: In which city was Idris Kael born? A: Velmora\n"
             "Question: What did Idris Kael study?\n")  # no answer: dropped
    assert parse_qa(reply, 5) == [
        {"question": "Where was Idris Kael born?", "answer": "Velmora"},
        {"question": "In which city was Idris Kael born?", "answer": "Velmora"}]


def test_parse_qa_with_the_passage_keeps_only_answers_it_contains():
    passage = "Idris Kael was born in Velmora. Idris Kael works for Halvex."
    reply = ("Question: Where was Idris Kael born?\nAnswer: Velmora\n"
             "Question: Where was Idris Kael born?\nAnswer: Velmora\n"  # a repeat
             "Question: Who married Idris Kael?\nAnswer: Soren Vance\n"  # not in the passage
             "Question: Who is Idris Kael?\nAnswer: Idris Kael\n"  # the question's own words
             "Question: Who employs Idris Kael?\nAnswer: halvex")
    assert parse_qa(reply, 5, passage) == [
        {"question": "Where was Idris Kael born?", "answer": "Velmora"},
        {"question": "Who employs Idris Kael?", "answer": "halvex"}]
    with pytest.raises(ValueError, match="none with a usable answer found in the passage"):
        parse_qa("Question: Who married Idris Kael?\nAnswer: Soren Vance", 3, passage)


class Scripted:
    """A fake LLM: rewrites echo the passage; QA replies come from a per-call script."""

    def __init__(self, qa_replies: list[list[str]]):
        self.qa_replies, self.calls = list(qa_replies), []

    def __call__(self, prompts: list[str], sample: bool, task: str) -> list[str]:
        self.calls.append((len(prompts), sample))
        assert task == ("rewrite" if "Rewritten passage:" in prompts[0] else "qa")
        if task == "rewrite":
            return [p.split("Passage: ")[1].split("\n")[0] + " (rewritten)" for p in prompts]
        return self.qa_replies.pop(0)


def test_retries_are_bounded_and_failures_recorded():
    generate = Scripted([[GOOD, "garbage"], ["still garbage"], ["nope"]])
    records = LLMAugmenter(generate, questions=3, max_retries=2).augment(PASSAGES)
    assert records[0].error is None and records[0].qa[0]["answer"] == "Velmora"
    assert records[1].qa == [] and "after 3 attempts" in records[1].error
    assert records[1].rewrites == ["Tamsin Reole works for Halvex. (rewritten)"]
    # one rewrite call, then 3 QA attempts: greedy, then sampled retries of the failed doc only
    assert generate.calls == [(2, False), (2, False), (1, True), (1, True)]


def test_failures_are_counted_and_the_run_resumes(tmp_path):
    out = tmp_path / "aug.jsonl"
    stats = augment_corpus(PASSAGES, LLMAugmenter(Scripted([[GOOD, "bad"], ["bad"]]),
                                                  max_retries=1), out, progress=False)
    assert (stats.written, stats.failed, stats.cached) == (2, 1, 0)
    with open(out, "a") as f:
        f.write('{"doc_id": "d3", "te')  # a run killed mid-line
    more = PASSAGES + [Passage("d3", "", "Soren Vance studied geology.")]
    geology = '[{"question": "What did Soren Vance study?", "answer": "geology"}]'
    stats = augment_corpus(more, LLMAugmenter(Scripted([[geology]])), out, progress=False)
    assert (stats.written, stats.failed, stats.cached) == (1, 0, 2)
    assert [r.doc_id for r in read_augmented(out)] == ["d1", "d2", "d3"]


def test_a_corrupt_line_inside_the_file_is_an_error(tmp_path):
    out = tmp_path / "aug.jsonl"
    out.write_text("not json\n" + json.dumps(AugmentedDoc("d1", "t").to_json()) + "\n")
    with pytest.raises(ValueError, match="aug.jsonl:1"):
        read_augmented(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    schema = load_schema(CONFIG)
    schema["splits"] = {"pretrain": 4, "train": 3, "test": 2}
    return generate_world(schema, tmp_path_factory.mktemp("world"))


def test_template_augmenter_asks_every_fact_in_phrasings_unlike_the_tests(world):
    passages = list(iter_corpus(world / "corpus.jsonl"))
    records = TemplateAugmenter(world).augment(passages)
    test_questions = {json.loads(line)["question"]
                      for line in (world / "qa_test.jsonl").read_text().splitlines()}
    for record in records:
        assert record.rewrites and len(record.qa) == 10
        assert not {qa["question"] for qa in record.qa} & test_questions
        assert all(qa["answer"] in record.text for qa in record.qa)


def test_template_augmenter_refuses_test_phrasings(world, tmp_path):
    schema = json.loads((world / "schema.json").read_text())
    schema["augment_question_templates"]["city"] = schema["question_templates"]["city"]
    clash = generate_world(schema, tmp_path / "clash")
    with pytest.raises(ValueError, match="disjoint"):
        TemplateAugmenter(clash)


def test_llm_augmenter_on_a_random_model_counts_failures_and_finishes(tmp_path):
    from conftest import tiny_model

    from dyprag.training.world_base import build_tokenizer

    tokenizer = build_tokenizer([p.text for p in PASSAGES] + ["Rewrite JSON"])
    model = tiny_model(vocab_size=len(tokenizer))
    augmenter = LLMAugmenter.from_model(model, tokenizer, max_new_tokens=4, max_retries=1)
    stats = augment_corpus(PASSAGES, augmenter, tmp_path / "aug.jsonl", progress=False)
    assert stats.written == 2 and stats.failed == 2


def test_llm_augmenter_wraps_prompts_in_the_chat_template_when_there_is_one():
    from conftest import tiny_model

    from dyprag.training.world_base import build_tokenizer

    tokenizer = build_tokenizer(["user says hi"])
    model = tiny_model(vocab_size=len(tokenizer))
    hi = [{"role": "user", "content": "hi"}]
    assert LLMAugmenter.from_model(model, tokenizer).chat(hi) == "hi\n\n"
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    augmenter = LLMAugmenter.from_model(model, tokenizer)
    assert augmenter.chat(hi) == "<|user|>hi<|assistant|>"
    # the QA request: a worked example as a user/assistant exchange, then the passage
    prompt = augmenter.qa_prompt("Idris Kael was born in Velmora.")
    assert prompt.count("<|user|>") == 2 and prompt.count("<|assistant|>") == 2
    assert prompt.endswith("Passage: Idris Kael was born in Velmora.<|assistant|>")


def test_fresh_documents_are_new_people_asked_with_augmentation_phrasings(world):
    from dyprag.data.augment import fresh_documents
    from dyprag.data.world import load_entities

    docs = fresh_documents(world, 5, seed=0)
    assert [d.doc_id for d in docs] == [d.doc_id for d in fresh_documents(world, 5, seed=0)]
    names = {e["name"] for e in load_entities(world)}
    schema = load_schema(CONFIG)
    for doc in docs:
        assert not any(name in doc.text for name in names)
        assert len(doc.qa) == sum(len(t) for t in schema["augment_question_templates"].values())
        assert len(doc.rewrites) == 2 and all(qa["answer"] in doc.text for qa in doc.qa)



def test_parse_qa_on_replies_recorded_from_smollm2():
    recorded = json.loads((Path(__file__).parent / "fixtures" / "smollm2_qa_replies.json")
                          .read_text())["replies"]
    for row in recorded:
        if row["pairs"]:
            assert parse_qa(row["reply"], 3, row["passage"]) == row["pairs"]
            assert all(p["answer"].lower() in row["passage"].lower() for p in row["pairs"])
        else:
            with pytest.raises(ValueError):
                parse_qa(row["reply"], 3, row["passage"])
    # The model answered the first bio's "married?" with its employer: grounded, though wrong;
    # a name given as the answer to "Who is X?" is dropped.
    assert recorded[0]["pairs"][0] == {"question": "Where is Jorund Oakenshield born?",
                                       "answer": "Brightwater"}
    assert all(p["answer"] != "Kieran Kingsley" for p in recorded[2]["pairs"])
    assert sum(bool(row["pairs"]) for row in recorded) >= 10
