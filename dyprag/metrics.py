"""Answer scoring: pull the answer out of a generation, then SQuAD-style EM and token F1.

    >>> from dyprag.metrics import extract_answer, score
    >>> pred = extract_answer("He died in 1963. The answer is August 25, 1963.")
    >>> pred
    'August 25, 1963'
    >>> score([pred], [["August 25, 1963"]])
    {'em': 1.0, 'f1': 1.0, 'n': 1}

Normalisation is exactly the SQuAD v1.1 script's (lowercase, drop punctuation, drop the
articles a/an/the, collapse whitespace); every gold alias is tried and the best one counts.
Yes/no questions follow the HotpotQA / 2WikiMultihopQA official scripts: if either side
normalises to "yes", "no" or "noanswer" and the two differ, the F1 is 0, so "no" earns nothing
against a gold "yes" even where tokens overlap.

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


def _best(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction, each maximised over the gold aliases."""
    _check_golds(answers)
    pred = normalize_answer(prediction)
    golds = [normalize_answer(a) for a in answers]
    em = max(float(pred == g) for g in golds)
    f1 = max(_token_f1(pred, g) for g in golds)
    return em, f1


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    return _best(prediction, answers)[0]


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Best token F1 of the normalised prediction against any gold answer, in [0, 1]."""
    return _best(prediction, answers)[1]


def score(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Mean EM and F1 over examples: ``{"em", "f1", "n"}``; zeros with n=0 for no examples.

    Predictions are scored as given: run ``extract_answer`` on raw generations first.
    """
    if len(predictions) != len(answer_lists):
        raise ValueError(f"{len(predictions)} predictions but {len(answer_lists)} answer lists")
    n = len(predictions)
    if n == 0:
        return {"em": 0.0, "f1": 0.0, "n": 0}
    em_total = f1_total = 0.0
    for prediction, answers in zip(predictions, answer_lists):
        em, f1 = _best(prediction, answers)
        em_total += em
        f1_total += f1
    return {"em": em_total / n, "f1": f1_total / n, "n": n}
