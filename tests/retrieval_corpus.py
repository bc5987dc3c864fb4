"""A six-passage corpus, paraphrased questions and one shared MiniLM for the retrieval tests.

Each question names its passage without copying its wording, so a dense retriever has to
match meaning; most still share a content word or two, which BM25 needs.
"""

from __future__ import annotations

import functools

from dyprag.data.corpus import Passage
from dyprag.retrieval.embed import Embedder

PASSAGES = [
    Passage("curie", "Marie Curie", "Marie Curie was a Polish-born physicist and chemist who conducted "
            "pioneering research on radioactivity. She was born in Warsaw in 1867."),
    Passage("eiffel", "Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower on the Champ de "
            "Mars in Paris, France, completed in 1889 for the World's Fair."),
    Passage("python", "Python (programming language)", "Python is a high-level programming language "
            "created by Guido van Rossum and first released in 1991."),
    Passage("everest", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level, "
            "located in the Himalayas on the border between Nepal and China."),
    Passage("banana", "Banana", "A banana is an elongated, edible fruit produced by several kinds of "
            "large herbaceous flowering plants in the genus Musa."),
    Passage("amazon", "Amazon River", "The Amazon River in South America is the largest river in the "
            "world by discharge volume of water."),
]

# question → the passage that answers it
DENSE_QUESTIONS = {
    "In which city was the scientist who studied radioactivity born?": "curie",
    "What is the tallest peak on the planet?": "everest",
    "Who designed the Python coding language?": "python",
    "When was the iron tower in Paris finished?": "eiffel",
}
BM25_QUESTIONS = {
    "Where was Curie born?": "curie",
    "Which fruit grows on Musa plants?": "banana",
    "Which river carries the most water?": "amazon",
}


@functools.cache
def minilm() -> Embedder:
    """The packaged MiniLM, loaded once per test session (batch 4: the corpus spans two batches)."""
    return Embedder(device="cpu", batch_size=4)
