"""The dev evaluation that train and distill run while training: sentence-transformers' IR evaluator, whose texts
are encoded on a GPU the way the stages encode them there (`components.embed.encode_pipelined`).

On one H200 the evaluator's own `encode` (batches of 64, each tokenised in the main thread while the GPU waits)
took 2.6-3.4 s per evaluation of the `gpu` profile's 5,411 dev texts, against 4.5 s for the 50 training steps
between two evaluations. Its scoring (cosine, ranks, nDCG) stays sentence-transformers' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

from components.embed import encode_pipelined

PIPELINED_BATCH_SIZE = 512


class DevEvaluator(InformationRetrievalEvaluator):
    """`InformationRetrievalEvaluator` that encodes pipelined on the devices in `pipelined_devices`."""

    pipelined_devices: frozenset[str] = frozenset({"cuda"})

    def embed_inputs(self, model: SentenceTransformer, sentences: Any, encode_fn_name: str | None = None,
                     prompt_name: str | None = None, prompt: str | None = None, **kwargs: Any) -> Any:
        plain = (prompt_name is None and prompt is None and not kwargs and self.truncate_dim is None
                 and not any(model.prompts.values()) and isinstance(sentences, Sequence))
        if model.device.type not in self.pipelined_devices or not plain:
            return super().embed_inputs(model, sentences, encode_fn_name=encode_fn_name, prompt_name=prompt_name,
                                        prompt=prompt, **kwargs)
        vectors = encode_pipelined(model, list(sentences), batch_size=PIPELINED_BATCH_SIZE)
        return torch.from_numpy(vectors).to(model.device)
