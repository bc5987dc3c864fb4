"""Retriever end to end on a tiny corpus: dense, BM25, hybrid, and the out_dir cache."""

from __future__ import annotations

import pytest
from retrieval_corpus import BM25_QUESTIONS, DENSE_QUESTIONS, PASSAGES, minilm

from dyprag.config import IndexConfig, choices
from dyprag.data.corpus import Passage, write_corpus_jsonl
from dyprag.retrieval.embed import Embedder
from dyprag.retrieval.retriever import Retriever, build_retriever, load_retriever


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return minilm()


@pytest.fixture
def corpus(tmp_path):
    return write_corpus_jsonl(PASSAGES, tmp_path / "corpus.jsonl")


def top1(retriever: Retriever, questions: dict[str, str]) -> list[str]:
    return [hits[0][0] for hits in retriever.retrieve(list(questions), k=3)]


@pytest.mark.parametrize("method", ["dense", "hybrid"])
def test_dense_and_hybrid_find_paraphrased_passage(embedder, corpus, tmp_path, method):
    retriever = build_retriever(corpus, tmp_path / "index", method, embedder=embedder, show_progress=False)
    assert top1(retriever, DENSE_QUESTIONS) == list(DENSE_QUESTIONS.values())
    hits = retriever.retrieve(["Where was Curie born?"], k=3)
    assert len(hits) == 1 and len(hits[0]) == 3
    assert all(isinstance(pid, str) and isinstance(score, float) for pid, score in hits[0])
    assert retriever.embeddings.shape == (len(PASSAGES), embedder.dim)


def test_bm25_method_needs_no_embedder(corpus, tmp_path):
    retriever = build_retriever(corpus, tmp_path / "index", "bm25", show_progress=False)
    assert retriever.embedder is None
    assert top1(retriever, BM25_QUESTIONS) == list(BM25_QUESTIONS.values())
    assert top1(load_retriever(tmp_path / "index"), BM25_QUESTIONS) == list(BM25_QUESTIONS.values())


def test_cache_reuse_and_invalidation(embedder, corpus, tmp_path, monkeypatch):
    out = tmp_path / "index"
    first = build_retriever(corpus, out, embedder=embedder, show_progress=False)
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("embeddings.npy", "dense/index.faiss")}

    calls = []
    real_embed = Embedder.embed_corpus
    monkeypatch.setattr(Embedder, "embed_corpus", lambda self, *a, **kw: calls.append(1) or real_embed(self, *a, **kw))
    again = build_retriever(corpus, out, embedder=embedder, show_progress=False)
    assert calls == [] and stamps == {n: (out / n).stat().st_mtime_ns for n in stamps}
    assert again.retrieve(list(DENSE_QUESTIONS), 2) == first.retrieve(list(DENSE_QUESTIONS), 2)

    # another factory: a new index from the stored embeddings, still no embedding
    ivf = build_retriever(corpus, out, factory="IVF2,Flat", embedder=embedder, search_params={"nprobe": 2},
                          show_progress=False)
    assert calls == [] and ivf.dense.meta["factory"] == "IVF2,Flat"
    assert top1(ivf, DENSE_QUESTIONS) == list(DENSE_QUESTIONS.values())

    # another corpus: everything is rebuilt
    write_corpus_jsonl([*PASSAGES, Passage("nile", "Nile", "The Nile is a river in Africa.")], corpus)
    grown = build_retriever(corpus, out, factory="IVF2,Flat", embedder=embedder, show_progress=False)
    assert calls == [1] and len(grown.dense) == len(PASSAGES) + 1


def test_load_retriever(embedder, corpus, tmp_path):
    built = build_retriever(corpus, tmp_path / "index", "hybrid", embedder=embedder, show_progress=False)
    loaded = load_retriever(tmp_path / "index", embedder=embedder)
    assert loaded.method == "hybrid"
    questions = list(DENSE_QUESTIONS) + list(BM25_QUESTIONS)
    assert loaded.retrieve(questions, 3) == built.retrieve(questions, 3)


def test_load_refuses_another_embedder(embedder, corpus, tmp_path):
    build_retriever(corpus, tmp_path / "index", embedder=embedder, show_progress=False)
    impostor = object.__new__(Embedder)  # an embedder by another name; no model needed to be refused
    impostor.name, impostor.dim = "some/other-model", embedder.dim
    with pytest.raises(ValueError, match="built with embedder 'sentence-transformers/all-MiniLM-L6-v2'"):
        load_retriever(tmp_path / "index", embedder=impostor)


def test_an_embedder_named_only_by_the_index_is_never_loaded(embedder, corpus, tmp_path,
                                                             monkeypatch):
    import dyprag.retrieval.retriever as retriever
    from dyprag.files import atomic_write_json, read_json

    build_retriever(corpus, tmp_path / "index", embedder=embedder, show_progress=False)
    meta = read_json(tmp_path / "index" / "meta.json")
    atomic_write_json(tmp_path / "index" / "meta.json", {**meta, "embedder": "/shared/evil-model"})
    loaded = []

    class Recorder:  # stands in for Embedder: records what would be loaded, loads nothing
        def __init__(self, name):
            loaded.append(name)
            raise LookupError("not loaded in this test")

    monkeypatch.setattr(retriever, "Embedder", Recorder)
    with pytest.raises(ValueError, match="built with embedder '/shared/evil-model'.*--embedder"):
        load_retriever(tmp_path / "index")
    assert loaded == []
    with pytest.raises(ValueError, match="not some/other-model"):
        load_retriever(tmp_path / "index", "some/other-model")
    assert loaded == []
    with pytest.raises(LookupError):  # named by the user: loaded
        load_retriever(tmp_path / "index", "/shared/evil-model")
    assert loaded == ["/shared/evil-model"]


@pytest.mark.parametrize("method", choices(IndexConfig, "method"))
def test_every_method_the_config_offers_retrieves(embedder, corpus, tmp_path, method):
    retriever = build_retriever(corpus, tmp_path / "index", method, embedder=embedder,
                                show_progress=False)
    assert top1(retriever, BM25_QUESTIONS) == list(BM25_QUESTIONS.values())


def test_bad_method(corpus, tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        build_retriever(corpus, tmp_path / "index", "colbert")


@pytest.mark.parametrize("method", ["dense", "bm25"])
def test_a_repeated_passage_id_is_refused_naming_it(embedder, tmp_path, method):
    twice = [*PASSAGES, Passage(PASSAGES[0].id, "Someone else", "Another person's passage.")]
    corpus = write_corpus_jsonl(twice, tmp_path / "corpus.jsonl")
    with pytest.raises(ValueError, match=rf"passage id '{PASSAGES[0].id}' is used by passage 1 "
                                         rf"and again by passage {len(twice)}"):
        build_retriever(corpus, tmp_path / "index", method, embedder=embedder, show_progress=False)
    assert not (tmp_path / "index" / method).exists(), "nothing indexed"
