"""Where questions and passages come from: the synthetic world, readers of the paper's QA sets
and corpora, their fetcher (``python -m dyprag.data fetch``), and document augmentation."""
