"""Answer extraction, SQuAD-style EM / F1 and FlashRAG's acc, checked against hand-computed
values."""

from __future__ import annotations

import pytest

from dyprag.metrics import (
    accuracy,
    exact_match,
    extract_answer,
    f1_by_fact,
    f1_by_group,
    f1_score,
    facts,
    normalize_answer,
    score,
)


@pytest.mark.parametrize("raw, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  A   cat,  an apple; THE end. ", "cat apple end"),
    ("Washington, D.C.", "washington dc"),
    ("theatre anthem", "theatre anthem"),  # articles only as whole words
    ("Ma\u0142gorzata Braunek", "ma\u0142gorzata braunek"),
    ("", ""),
])
def test_normalize_answer_is_squad(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is August 25, 1963.", "August 25, 1963"),
    ("the ANSWER is: Paris", "Paris"),
    ("So the answer is 3. Wait, the answer is Rome.", "Rome"),  # last occurrence wins
    ("The answer is Paris.\nQuestion: Where is Rome?\nThe", "Paris"),  # kept generating
    ("The answer is\n  Washington, D.C.", "Washington, D.C"),  # one full stop only
    ("Paris", "Paris"),  # no prefix: the whole text
    ("  Paris.  ", "Paris"),
    ("The answer is", ""),
    ("", ""),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_custom_or_no_prefix():
    assert extract_answer("Answer: 1963, in Ohio.", prefix="answer") == "1963, in Ohio"
    assert extract_answer("The answer is Paris.", prefix=None) == "The answer is Paris"


def test_date_with_comma_is_not_truncated():
    # The reference evaluation cuts at the first comma and would score "August 25".
    pred = extract_answer("The answer is August 25, 1963.")
    assert exact_match(pred, ["August 25, 1963"]) == 1.0
    assert f1_score(pred, ["August 25, 1963"]) == 1.0
    assert f1_score("August 25", ["August 25, 1963"]) == pytest.approx(0.8)  # P=1, R=2/3


def test_reordered_tokens_give_full_f1_but_no_em():
    assert exact_match("August 25, 1963", ["25 August 1963"]) == 0.0
    assert f1_score("August 25, 1963", ["25 August 1963"]) == 1.0


def test_articles_and_punctuation_do_not_matter():
    assert exact_match("the Beatles!", ["Beatles"]) == 1.0
    assert exact_match("An Apple.", ["apple"]) == 1.0


def test_partial_overlap_f1():
    # pred tokens {edward, cahn}, gold {edward, l, cahn}: P = 1, R = 2/3 → F1 = 0.8
    assert f1_score("Edward Cahn", ["Edward L. Cahn"]) == pytest.approx(0.8)
    # pred {john, smith, jr}, gold {john, smith}: P = 2/3, R = 1 → F1 = 0.8
    assert f1_score("John Smith Jr", ["John Smith"]) == pytest.approx(0.8)
    # repeated tokens count once per occurrence: P = 1/3, R = 1 → F1 = 0.5
    assert f1_score("paris paris paris", ["Paris"]) == pytest.approx(0.5)
    assert f1_score("London", ["Paris"]) == 0.0


def test_max_over_aliases():
    golds = ["United States of America", "USA", "United States"]
    assert exact_match("U.S.A.", golds) == 1.0
    assert f1_score("the United States", golds) == 1.0
    # best alias: "United States of America" gives P=1, R=3/4 → 6/7; "United States" R=2/3
    assert f1_score("America states united", golds) == pytest.approx(6 / 7)


def test_yes_no_get_no_partial_credit():
    assert exact_match("Yes.", ["yes"]) == 1.0
    assert f1_score("Yes.", ["yes"]) == 1.0
    assert f1_score("no", ["yes"]) == 0.0
    assert f1_score("yes no", ["no"]) == 0.0  # gold is special: only an exact match counts
    assert f1_score("no", ["yes no"]) == 0.0  # prediction is special
    assert f1_score("noanswer", ["no answer"]) == 0.0
    assert f1_score("no, they are not", ["no"]) == 0.0


def test_empty_prediction():
    assert exact_match("", ["Paris"]) == 0.0
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score(extract_answer("The answer is"), ["Paris"]) == 0.0
    # a gold that normalises to nothing is matched only by a prediction that does too
    assert f1_score("", ["The"]) == 1.0
    assert f1_score("Paris", ["The"]) == 0.0


def test_gold_answers_must_be_a_non_empty_list():
    with pytest.raises(TypeError, match="list of strings"):
        exact_match("Paris", "Paris")
    with pytest.raises(ValueError, match="no gold answers"):
        f1_score("Paris", [])


def test_acc_credits_a_sentence_that_contains_the_answer():
    assert accuracy("He was born in Paris.", ["Paris"]) == 1.0
    assert exact_match("He was born in Paris.", ["Paris"]) == 0.0
    assert f1_score("He was born in Paris.", ["Paris"]) == pytest.approx(1 / 3)  # P=1/5, R=1
    assert accuracy("He died on August 25, 1963, in Ohio.", ["August 25, 1963"]) == 1.0
    assert accuracy("Paris", ["Paris"]) == 1.0  # an exact match is contained too


def test_acc_is_zero_when_no_alias_is_contained():
    assert accuracy("He was born in Lyon.", ["Paris"]) == 0.0
    assert accuracy("Paris", ["Paris, France"]) == 0.0  # the gold in the prediction, not back
    assert accuracy("August 25", ["August 25, 1963"]) == 0.0
    assert accuracy("", ["Paris"]) == 0.0
    assert accuracy("He was born in Paris.", ["Lyon", "Rome"]) == 0.0


def test_acc_tries_every_alias():
    golds = ["United States of America", "USA", "United States"]
    assert accuracy("She moved to the United States in 1990.", golds) == 1.0
    assert accuracy("She moved to the U.S.A. in 1990.", golds) == 1.0  # "usa" after punctuation
    assert accuracy("She moved to the States.", golds) == 0.0


def test_acc_normalises_both_sides():
    assert accuracy("It was THE BEATLES!", ["beatles"]) == 1.0  # case, punctuation
    assert accuracy("The answer: an apple, probably.", ["An Apple"]) == 1.0  # articles
    assert accuracy("Born in Washington, D.C., in 1950.", ["Washington DC"]) == 1.0
    assert accuracy("born in   new\nyork city", ["New York"]) == 1.0  # whitespace collapsed


def test_acc_is_a_substring_test_as_in_flashrag():
    # FlashRAG's acc: no word boundaries, no yes/no rule
    assert accuracy("It is not known", ["no"]) == 1.0
    assert accuracy("born in 1963", ["1"]) == 1.0
    assert accuracy("no, they are not", ["no"]) == 1.0
    assert f1_score("no, they are not", ["no"]) == 0.0


def test_acc_with_a_gold_that_normalises_to_nothing():
    assert accuracy("", ["The"]) == 1.0
    assert accuracy("Paris", ["The"]) == 0.0  # FlashRAG would give every prediction 1
    assert accuracy("Paris", ["The", "Paris"]) == 1.0


def test_acc_gold_answers_must_be_a_non_empty_list():
    with pytest.raises(TypeError, match="list of strings"):
        accuracy("Paris", "Paris")
    with pytest.raises(ValueError, match="no gold answers"):
        accuracy("Paris", [])


def test_score_means():
    result = score(["Paris", "Edward Cahn", "no", "", "He was born in Rome."],
                   [["Paris"], ["Edward L. Cahn"], ["yes"], ["Rome", "Roma"], ["Rome"]])
    assert result["n"] == 5
    assert result["em"] == pytest.approx(1 / 5)
    assert result["f1"] == pytest.approx((1 + 0.8 + 0 + 0 + 2 * 0.2 / 1.2) / 5)
    assert result["acc"] == pytest.approx(2 / 5)  # "Paris" and the sentence about Rome
    assert set(result) == {"em", "f1", "acc", "n"}
    assert all(isinstance(result[k], float) for k in ("em", "f1", "acc"))


def test_score_edges():
    assert score([], []) == {"em": 0.0, "f1": 0.0, "acc": 0.0, "n": 0}
    with pytest.raises(ValueError, match="2 predictions but 1 answer lists"):
        score(["a", "b"], [["a"]])


def test_f1_by_group_averages_within_each_group_in_order_of_appearance():
    by = f1_by_group(["Paris", "1957", "Rome", "x"], [["Paris"], ["1957"], ["Oslo"], ["1900"]],
                     ["city", "year", "city", "year"])
    assert list(by) == ["city", "year"]
    assert by == {"city": 0.5, "year": 0.5}
    with pytest.raises(ValueError, match="must match"):
        f1_by_group(["a"], [["a"]], [])


def test_facts_are_the_questions_attributes_only_when_every_question_names_one():
    assert facts([{"attribute": "city"}, {"attribute": "year", "doc_id": "e1"}]) == ["city", "year"]
    assert facts([{"attribute": "city"}, {}]) is None
    assert facts([]) is None


def test_f1_by_fact_is_per_mode_and_empty_when_a_question_names_no_fact():
    golds, meta = [["Oslo"], ["1957"]], [{"attribute": "city"}, {"attribute": "year"}]
    by = f1_by_fact({"rag@1": ["Oslo", "x"], "dyprag@1": ["Rome", "1957"]}, golds, meta)
    assert by == {"rag@1": {"city": 1.0, "year": 0.0}, "dyprag@1": {"city": 0.0, "year": 1.0}}
    assert f1_by_fact({"rag@1": ["Oslo", "x"]}, golds, [{"attribute": "city"}, {}]) == {}
