"""Answer scoring: pull the answer out of a generation, then SQuAD-style EM and token F1, and
FlashRAG's ``acc`` for models that answer in sentences.

    >>> from dyprag.metrics import extract_answer, score
    >>> pred = extract_answer("He died in 1963. The answer is August 25, 1963.")
    >>> pred
    'August 25, 1963'
    >>> score([pred], [["August 25, 1963"]])
    {'em': 1.0, 'f1': 1.0, 'acc': 1.0, 'n': 1}
    >>> score(["He was born in Paris."], [["Paris"]])["acc"]  # EM 0, F1 1/3
    1.0

Normalisation is exactly the SQuAD v1.1 script's (lowercase, drop punctuation, drop the
articles a/an/the, collapse whitespace); every gold alias is tried and the best one counts.
Yes/no questions follow the HotpotQA / 2WikiMultihopQA official scripts: if either side
normalises to "yes", "no" or "noanswer" and the two differ, the F1 is 0, so "no" earns nothing
against a gold "yes" even where tokens overlap.

``acc`` is FlashRAG's (its ``Sub_ExactMatch``): 1 if some normalised gold alias is a substring of
the normalised prediction, so "He was born in Paris." earns it against "Paris" where EM does
not. Like FlashRAG's, it is a plain substring test, not a whole-word one: a gold "1" is in
"1963" and a gold "no" in "not sure"; and it has no yes/no rule. One deviation: a gold that
normalises to nothing (FlashRAG: in every prediction) counts only for a prediction that does
too, as in EM and F1, so acc is never below EM.

Unlike the PRAG / DyPRAG evaluation, nothing is truncated at a comma or a period: theirs turns
"August 25, 1963" into "August 25". The only cuts are an explicit answer prefix and the end of
the answer's line (see ``extract_answer``).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

ANSWER_PREFIX = "The answer is"

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_LEADING = re.compile(r"^[\s:]+")
# HotpotQA's special answers: a partial token match against them means nothing.
_SPECIAL = frozenset({"yes", "no", "noanswer"})


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, no punctuation, no a/an/the, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def extract_answer(text: str, prefix: str | None = ANSWER_PREFIX) -> str:
    """The answer inside a generation.

    If ``prefix`` occurs (case-insensitively), keep what follows its last occurrence, minus
    leading ':' and whitespace: chain-of-thought outputs restate the prefix only at the end.
    Then keep the first line only, since a model that goes on past its answer usually starts
    a new line ("\\nQuestion: ..."), while commas and periods inside one line belong to the
    answer ("August 25, 1963", "Washington, D.C."). Finally strip whitespace and one trailing
    period, the sentence's full stop.
    """
    answer = text
    if prefix:
        last = None
        for last in re.finditer(re.escape(prefix), text, flags=re.IGNORECASE):
            pass
        if last is not None:
            answer = text[last.end():]
    answer = _LEADING.sub("", answer)
    answer = next(iter(answer.splitlines()), "").strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer


def _check_golds(answers: Sequence[str]) -> None:
    # A bare string would be iterated character by character and silently scored wrong.
    if isinstance(answers, str):
        raise TypeError(f"gold answers must be a list of strings, not the string {answers!r}")
    if len(answers) == 0:
        raise ValueError("no gold answers to score against")


def _token_f1(pred: str, gold: str) -> float:
    """F1 between two already-normalised answers (SQuAD formula + HotpotQA yes/no rule)."""
    if (pred in _SPECIAL or gold in _SPECIAL) and pred != gold:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    # SQuAD v2 convention: an answer that normalises to nothing only matches nothing, so
    # F1 never falls below EM.
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _contains(pred: str, gold: str) -> float:
    """FlashRAG's acc between two already-normalised answers: is ``gold`` a substring of
    ``pred``? An empty gold is in an empty prediction only (see the module's docstring)."""
    return float(gold in pred) if gold else float(not pred)


def _best(prediction: str, answers: Sequence[str]) -> tuple[float, float, float]:
    """(EM, F1, acc) of one prediction, each maximised over the gold aliases."""
    _check_golds(answers)
    pred = normalize_answer(prediction)
    golds = [normalize_answer(a) for a in answers]
    em = max(float(pred == g) for g in golds)
    f1 = max(_token_f1(pred, g) for g in golds)
    acc = max(_contains(pred, g) for g in golds)
    return em, f1, acc


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    return _best(prediction, answers)[0]


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Best token F1 of the normalised prediction against any gold answer, in [0, 1]."""
    return _best(prediction, answers)[1]


def accuracy(prediction: str, answers: Sequence[str]) -> float:
    """FlashRAG's acc: 1.0 if any normalised gold answer occurs in the normalised prediction."""
    return _best(prediction, answers)[2]


def score(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Mean EM, F1 and acc over examples: ``{"em", "f1", "acc", "n"}``; zeros with n=0 for no
    examples.

    Predictions are scored as given: run ``extract_answer`` on raw generations first.
    """
    if len(predictions) != len(answer_lists):
        raise ValueError(f"{len(predictions)} predictions but {len(answer_lists)} answer lists")
    n = len(predictions)
    if n == 0:
        return {"em": 0.0, "f1": 0.0, "acc": 0.0, "n": 0}
    em_total = f1_total = acc_total = 0.0
    for prediction, answers in zip(predictions, answer_lists):
        em, f1, acc = _best(prediction, answers)
        em_total += em
        f1_total += f1
        acc_total += acc
    return {"em": em_total / n, "f1": f1_total / n, "acc": acc_total / n, "n": n}


def f1_by_group(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]],
                groups: Sequence[str]) -> dict[str, float]:
    """Mean F1 per group (e.g. the fact a question asks: the world's ``meta.attribute``),
    groups in order of first appearance."""
    if not len(predictions) == len(answer_lists) == len(groups):
        raise ValueError(f"{len(predictions)} predictions, {len(answer_lists)} answer lists and "
                         f"{len(groups)} groups must match")
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    return {group: score([predictions[i] for i in rows], [answer_lists[i] for i in rows])["f1"]
            for group, rows in members.items()}


def f1_by_fact(predictions: dict[str, Sequence[str]], answer_lists: Sequence[Sequence[str]],
               meta: Sequence[dict]) -> dict[str, dict[str, float]]:
    """``{mode: {fact: F1}}`` for ``predictions`` by mode, where every question names the fact
    it asks (``facts``); empty otherwise."""
    asked = facts(meta)
    if asked is None:
        return {}
    return {mode: f1_by_group(answers, answer_lists, asked) for mode, answers in predictions.items()}


def facts(meta: Sequence[dict]) -> list[str] | None:
    """The fact each question asks (its ``meta["attribute"]``, as the world writes), or None
    unless every question names one."""
    found = [m.get("attribute") for m in meta]
    return found if found and all(isinstance(f, str) for f in found) else None
