"""Question-set loaders: tiny fixture files in each native format, written per test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dyprag.config import load_config
from dyprag.data.qa import (
    QAExample,
    QAFormatError,
    detect_format,
    load_2wqa,
    load_qa,
    write_qa_jsonl,
)

TWOWIKI = [
    {"_id": "a1", "type": "compositional", "question": "When did the director of film X die?",
     "answer": "August 25, 1963", "answer_id": "", "context": [["X", ["X is a film."]]],
     "supporting_facts": [["X", 0]], "evidences": [["X", "director", "Edward L. Cahn"]]},
    {"_id": "a2", "type": "inference", "question": "Who is the mother of Y?", "answer": "Maria",
     "answer_id": "Q7", "context": [], "supporting_facts": [], "evidences": []},
    {"_id": "a3", "type": "comparison", "question": "Are A and B from the same country?",
     "answer": "no", "context": [], "supporting_facts": [], "evidences": []},
]
ALIASES = [
    {"Q_id": "Q7", "aliases": ["Maria Alexandrovna", "Maria"], "demonyms": ["Marian"]},
    {"Q_id": "Q9", "aliases": ["unused"], "demonyms": []},
]
HOTPOT = [
    {"_id": "h1", "question": "Which magazine was started first?", "answer": "Arthur's Magazine",
     "type": "comparison", "level": "medium", "supporting_facts": [["Arthur's Magazine", 0]],
     "context": [["Arthur's Magazine", ["Arthur's Magazine was a periodical."]]]},
    {"_id": "h2", "question": "Were Scott and Ed of the same nationality?", "answer": "yes",
     "type": "comparison", "level": "hard", "supporting_facts": [], "context": []},
]
POPQA = (
    'id\tsubj\tprop\tobj\ts_pop\to_pop\tquestion\tpossible_answers\n'
    '4222362\tGeorge Rankin\toccupation\tpolitician\t142\t25692\tWhat is George Rankin\'s '
    'occupation?\t"[""politician"", ""political leader"", ""polit.""]"\n'
    "1\tJohn\tgenre\tjazz\t7\t\tWhat genre is John?\t['jazz', 'jazz music', \"jazz, hot\"]\n"
)
CWQ = [
    {"ID": "WebQTrn-1", "question": "What team won the 1998 final?", "machine_question": "mq",
     "compositionality_type": "composition", "composition_answer": "c",
     "answers": [{"answer": "Real Madrid", "aliases": ["Real Madrid CF", "Los Blancos"],
                  "answer_id": "m.1"},
                 {"answer": "Madrid", "aliases": ["Real Madrid"], "answer_id": "m.2"}]},
    {"ID": "WebQTrn-2", "question": "Who wrote it?",
     "answers": [{"answer": "Jane Austen", "aliases": [], "answer_id": "m.3"}]},
]


def _json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_2wqa_merges_aliases_from_beside_the_file(tmp_path):
    _jsonl(tmp_path / "id_aliases.json", ALIASES)
    examples = load_qa(_json(tmp_path / "dev.json", TWOWIKI))
    assert examples == [
        QAExample("a1", "When did the director of film X die?", ["August 25, 1963"],
                  {"type": "compositional", "answer_id": "", "supporting_facts": [["X", 0]],
                   "evidences": [["X", "director", "Edward L. Cahn"]]}),
        QAExample("a2", "Who is the mother of Y?", ["Maria", "Maria Alexandrovna", "Marian"],
                  {"type": "inference", "answer_id": "Q7", "supporting_facts": [],
                   "evidences": []}),
        QAExample("a3", "Are A and B from the same country?", ["no"],
                  {"type": "comparison", "supporting_facts": [], "evidences": []}),
    ]


def test_2wqa_without_alias_file_and_with_explicit_one(tmp_path):
    dev = _json(tmp_path / "dev.json", TWOWIKI)
    assert load_qa(dev, limit=2)[1].answers == ["Maria"]
    elsewhere = _jsonl(tmp_path / "aliases.jsonl", ALIASES)
    assert load_2wqa(dev, aliases_path=elsewhere)[1].answers == ["Maria", "Maria Alexandrovna", "Marian"]
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        load_2wqa(dev, aliases_path=tmp_path / "nope.json")


def test_2wqa_bad_alias_line_names_file_and_line(tmp_path):
    (tmp_path / "id_aliases.json").write_text(json.dumps(ALIASES[0]) + "\n{oops\n")
    with pytest.raises(QAFormatError, match=r"id_aliases\.json:2: not valid JSON"):
        load_qa(_json(tmp_path / "dev.json", TWOWIKI))


def test_hotpotqa(tmp_path):
    examples = load_qa(_json(tmp_path / "hotpot_dev_distractor_v1.json", HOTPOT))
    assert examples == [
        QAExample("h1", "Which magazine was started first?", ["Arthur's Magazine"],
                  {"type": "comparison", "level": "medium",
                   "supporting_facts": [["Arthur's Magazine", 0]]}),
        QAExample("h2", "Were Scott and Ed of the same nationality?", ["yes"],
                  {"type": "comparison", "level": "hard", "supporting_facts": []}),
    ]


def test_popqa_parses_literal_lists(tmp_path):
    path = tmp_path / "popQA.tsv"
    path.write_text(POPQA)
    examples = load_qa(path)
    assert examples == [
        QAExample("4222362", "What is George Rankin's occupation?",
                  ["politician", "political leader", "polit."],
                  {"subj": "George Rankin", "prop": "occupation", "obj": "politician",
                   "s_pop": 142, "o_pop": 25692}),
        QAExample("1", "What genre is John?", ["jazz", "jazz music", "jazz, hot"],
                  {"subj": "John", "prop": "genre", "obj": "jazz", "s_pop": 7, "o_pop": ""}),
    ]


def test_popqa_never_evaluates_code(tmp_path):
    path = tmp_path / "popQA.tsv"
    path.write_text("id\tquestion\tobj\tpossible_answers\n"
                    "1\tQ?\tx\t__import__('os').getcwd()\n")
    with pytest.raises(QAFormatError, match=r"example 0 \(id '1'\) \(line 2\): possible_answers is not"):
        load_qa(path)


def test_popqa_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "popQA.tsv"
    path.write_text("id\tquestion\tpossible_answers\n1\tQ?\n")
    with pytest.raises(QAFormatError, match="has 2 fields, the header 3"):
        load_qa(path)


def test_cwq_merges_answers_then_aliases(tmp_path):
    examples = load_qa(_json(tmp_path / "ComplexWebQuestions_dev.json", CWQ))
    assert examples == [
        QAExample("WebQTrn-1", "What team won the 1998 final?",
                  ["Real Madrid", "Madrid", "Real Madrid CF", "Los Blancos"],
                  {"machine_question": "mq", "compositionality_type": "composition",
                   "composition_answer": "c"}),
        QAExample("WebQTrn-2", "Who wrote it?", ["Jane Austen"], {}),
    ]


def test_jsonl_round_trip(tmp_path):
    examples = [QAExample("q1", "Who?", ["Ann", "Anne"], {"type": "bridge", "hops": 2}),
                QAExample("q2", "Où est la tour\u00a0?", ["Paris"], {})]
    path = write_qa_jsonl(examples, tmp_path / "out" / "qa.jsonl")
    assert path == tmp_path / "out" / "qa.jsonl"
    assert not list(path.parent.glob("*.tmp"))
    assert load_qa(path) == examples
    assert load_qa(path, limit=1) == examples[:1]


def test_jsonl_lenient_fields(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A", "source": "x"}])
    (tmp_path / "qa.jsonl").write_text(path.read_text() + "\n")  # blank lines are skipped
    assert load_qa(path) == [QAExample("1", "Q?", ["A"], {"source": "x"})]


FLASHRAG = [
    {"id": "dev_0", "question": "Who directed X?", "golden_answers": ["Ann Lee", " Ann ", "Ann Lee"],
     "metadata": {"type": "compositional", "supporting_facts": {"title": ["X"]}}},
    {"id": "dev_1", "question": "Where is the tower?", "golden_answers": "Paris"},
]


def test_flashrag_jsonl_is_read_when_named(tmp_path):
    path = _jsonl(tmp_path / "dev.jsonl", FLASHRAG)
    assert load_qa(path, fmt="flashrag") == [
        QAExample("dev_0", "Who directed X?", ["Ann Lee", "Ann"],
                  {"type": "compositional", "supporting_facts": {"title": ["X"]}}),
        QAExample("dev_1", "Where is the tower?", ["Paris"], {}),
    ]
    assert load_config(overrides=["data.qa_format=flashrag"]).data.qa_format == "flashrag"
    # By its name it is generic jsonl, which has no golden_answers field: the format is named.
    assert detect_format(path) == "jsonl"
    with pytest.raises(QAFormatError, match=r"dev\.jsonl:1 \(id 'dev_0'\) has no answer"):
        load_qa(path)
    generic = _jsonl(tmp_path / "qa.jsonl", [{"id": "x", "question": "Q?", "answers": ["A"]}])
    with pytest.raises(QAFormatError, match="has no golden_answers .not FlashRAG's format"):
        load_qa(generic, fmt="flashrag")


def test_write_refuses_nothing(tmp_path):
    with pytest.raises(ValueError, match="no examples to write"):
        write_qa_jsonl([], tmp_path / "qa.jsonl")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, fmt", [
    ("dev.json", "2wqa"), ("hotpot_dev_distractor_v1.json", "hotpotqa"), ("popQA.tsv", "popqa"),
    ("ComplexWebQuestions_dev.json", "cwq"), ("mine.jsonl", "jsonl"), ("hotpot_dev.jsonl", "jsonl"),
])
def test_detect_format(name, fmt):
    assert detect_format(Path("/data") / name) == fmt


def test_unknown_format_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="pass fmt= one of 2wqa, hotpotqa, popqa, cwq, jsonl"):
        load_qa(tmp_path / "train.json")
    with pytest.raises(ValueError, match="unknown QA format 'squad'"):
        load_qa(tmp_path / "dev.json", fmt="squad")


def test_explicit_format_overrides_the_name(tmp_path):
    path = _json(tmp_path / "questions.json", HOTPOT)
    assert [e.id for e in load_qa(path, fmt="hotpotqa")] == ["h1", "h2"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dev.json does not exist"):
        load_qa(tmp_path / "dev.json")


def test_malformed_json(tmp_path):
    (tmp_path / "dev.json").write_text('[{"_id": "a1",\n  "question": }]')
    with pytest.raises(QAFormatError, match=r"dev\.json is not valid JSON: .*line 2"):
        load_qa(tmp_path / "dev.json")
    (tmp_path / "qa.jsonl").write_text('{"id": "1", "question": "Q", "answers": ["A"]}\n{"id": 2,\n')
    with pytest.raises(QAFormatError, match=r"qa\.jsonl:2: not valid JSON"):
        load_qa(tmp_path / "qa.jsonl")


@pytest.mark.parametrize("name, content, message", [
    ("dev.json", "", "is not valid JSON"),
    ("dev.json", "[]", "no questions in"),
    ("hotpot.json", '{"_id": "h1"}', "must hold a JSON list"),
    ("qa.jsonl", "\n\n", "no questions in"),
    ("popQA.tsv", "", "no questions in"),
    ("popQA.tsv", "id\tquestion\tpossible_answers\n", "no questions in"),
    ("popQA.tsv", "id\tquestion\n1\tQ?\n", "header lacks the column"),
])
def test_empty_or_wrong_container(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(QAFormatError, match=message):
        load_qa(tmp_path / name)


@pytest.mark.parametrize("fmt, rows, message", [
    ("2wqa", [TWOWIKI[0], {**TWOWIKI[1], "question": "  "}], r"example 1 \(id 'a2'\) has no question"),
    ("hotpotqa", [{k: v for k, v in HOTPOT[0].items() if k != "answer"}],
     r"example 0 \(id 'h1'\) has no answer"),
    ("cwq", [{**CWQ[1], "answers": []}], r"example 0 \(id 'WebQTrn-2'\) has no answer"),
    ("cwq", [{**CWQ[1], "answers": ["Jane"]}], "answers must be objects"),
    ("jsonl", [{"id": "x", "question": "Q?", "answers": [1963]}], r"qa\.jsonl:1 \(id 'x'\): answers must be"),
    ("jsonl", [{"id": "x", "answers": ["A"]}], r"qa\.jsonl:1 \(id 'x'\) has no question"),
    ("jsonl", [{"id": "x", "question": "Q", "answers": ["A"]}] * 2, "id 'x' is used by question 1 and again by question 2"),
    ("hotpotqa", [{**HOTPOT[0], "_id": None}], "example 0 has no _id"),
])
def test_bad_examples_name_file_and_example(tmp_path, fmt, rows, message):
    path = tmp_path / ("qa.jsonl" if fmt == "jsonl" else "qa.json")
    (_jsonl if fmt == "jsonl" else _json)(path, rows)
    with pytest.raises(QAFormatError, match=message):
        load_qa(path, fmt=fmt)


def test_limit(tmp_path):
    path = _json(tmp_path / "hotpot_dev.json", HOTPOT + [{"_id": "bad"}])
    assert [e.id for e in load_qa(path, limit=2)] == ["h1", "h2"]  # the bad third is never read
    with pytest.raises(ValueError, match="positive integer"):
        load_qa(path, limit=0)


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_qa_jsonl([QAExample("q1", "Who?", ["Ann"], {})], tmp_path / "qa.jsonl")
    before = path.read_text()
    with pytest.raises(TypeError):
        write_qa_jsonl([QAExample("q2", "Q?", ["A"], {"bad": object()})], path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.jsonl"]


def test_encoding(tmp_path):
    path = tmp_path / "popQA.tsv"
    path.write_bytes("\ufeffid\tquestion\tpossible_answers\n7\tQ?\t['A']\n".encode())  # BOM
    assert load_qa(path) == [QAExample("7", "Q?", ["A"], {})]
    path.write_bytes(b"id\tquestion\tpossible_answers\n7\tQ\xe9?\t['A']\n")  # Latin-1
    with pytest.raises(QAFormatError, match=r"popQA\.tsv is not UTF-8 text"):
        load_qa(path)
