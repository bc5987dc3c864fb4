"""The results train.py prints and logs and evaluate.py writes: EM, F1 and acc by mode."""

from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger

from dyprag.answering.report import by_fact, markdown, table
from dyprag.run.loggers import log_results

RESULTS = {"questions": 4, "recall@1": 0.5, "recall@3": 0.75,
           "f1": {"vanilla": 0.125, "dyprag@1": 0.5},
           "em": {"vanilla": 0.0, "dyprag@1": 0.25},
           "acc": {"vanilla": 0.75, "dyprag@1": 1.0},
           "samples": [{"question": "q", "gold": "g", "vanilla": "a", "dyprag@1": "b"}]}


def test_table_has_an_acc_column_beside_em_and_f1():
    lines = table(RESULTS).splitlines()
    assert lines[0].split() == ["mode", "EM", "F1", "acc"]
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    assert lines[2].split() == ["vanilla", "0.000", "0.125", "0.750"]
    assert lines[3].split() == ["dyprag@1", "0.250", "0.500", "1.000"]
    assert lines[4] == "recall@1 0.500, recall@3 0.750"
    assert lines[-1] == "4 test questions"


def test_markdown_grid_has_an_acc_column():
    grid = {"qa_test": {"vanilla": {"em": 0.0, "f1": 0.125, "acc": 0.75, "n": 4,
                                    "ms_per_question": 12.0}}}
    lines = markdown(grid, ["vanilla"]).splitlines()
    assert lines[0] == "| dataset | mode | EM | F1 | acc | ms / question |"
    assert lines[1].count("---") == 6
    assert lines[2] == "| qa_test | vanilla | 0.000 | 0.125 | 0.750 | 12.0 |"


def test_log_results_writes_acc_beside_em_and_f1(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    log_results([logger], RESULTS)
    with (tmp_path / "logs" / "version_0" / "metrics.csv").open() as f:
        row = next(csv.DictReader(f))
    for score in ("f1", "em", "acc"):
        for mode, v in RESULTS[score].items():
            assert float(row[f"eval/{score}/{mode}"]) == v, (score, mode)


def test_f1_by_fact_is_a_row_per_mode_in_the_table_and_the_markdown():
    by = {"vanilla": {"city": 0.25, "year": 0.0}, "dyprag@1": {"city": 1.0, "year": 0.5}}
    lines = by_fact(by)
    assert lines[1].split() == ["mode", "city", "year"]
    assert lines[3].split() == ["dyprag@1", "1.000", "0.500"]
    assert by_fact({}) == []
    assert "F1 by fact" in table({**RESULTS, "f1_by_fact": by})
    grid = {"qa_test": {m: {"em": 0, "f1": 0, "acc": 0, "n": 4, "ms_per_question": 1.0}
                        for m in by}}
    md = markdown(grid, list(by), None, {"qa_test": by}).splitlines()
    assert "| qa_test: mode | city | year |" in md
    assert "| dyprag@1 | 1.000 | 0.500 |" in md
