"""serve: the search of `embedforge search` as a small HTTP service (FastAPI on uvicorn).

    embedforge serve                                   # http://127.0.0.1:8000, models/student + data/*
    embedforge serve --model models:/embedforge-student@champion --port 8080

Endpoints (every answer names the model, its fingerprint, the index and the operating point it came from):

- `POST /search` `{"queries": ["..."], "k": 10}` -> `{"results": [[{"doc_id", "score", "text"}, ...]], ...}`
  (`GET /search?q=...&k=10` for one query, e.g. from a browser);
- `POST /embed` `{"texts": ["..."]}` -> `{"embeddings": [[...]], "dim": ...}` at the operating point's dims;
- `GET /healthz` -> `{"status": "ok", ...}`.

Everything served is loaded and checked at start-up; a request carries text only, never a path or a model name.
Limits: bodies over MAX_BODY_BYTES get 413, and a query list that is empty, too long, or holds empty or
over-long text gets 422, each with a JSON body saying what to change.

Concurrent requests are batched (`Batcher`): one worker thread encodes every text waiting, up to MAX_BATCH, in
one forward pass, and searches them together, faiss on one thread. Requests wait on the event loop (async
endpoints), so a result goes from the worker to the response with no request thread in between. A lone request
is answered at once; under load, many queries share one encoder call instead of queueing for it one by one
(bench/serve.py measures both). A query's vector can differ in the 7th digit with the batch it shares (padding
changes the float sums), as in evaluate, which encodes in batches too.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import sys
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from components.search import (
    MAX_BATCH,
    MAX_QUERY_CHARS,
    Hit,
    QueryError,
    Retriever,
    add_retriever_args,
    check_texts,
    retriever_from_args,
)

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Texts waiting for the worker: to embed (k None) or to search for their top k."""

    texts: list[str]
    k: int | None
    done: Future[Any] = field(default_factory=Future)


class Batcher:
    """One worker thread owns the model and the index; requests queue as jobs and are answered in batches."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._work, name="embedforge-batcher", daemon=True).start()

    async def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        check_texts(queries)
        self.retriever.check_k(k)
        return await self._submit(Job(queries, k))

    async def embed(self, texts: list[str]) -> np.ndarray:
        check_texts(texts)
        return await self._submit(Job(texts, None))

    async def _submit(self, job: Job) -> Any:
        """Queue `job` and wait for it on the event loop: the worker's result wakes the loop directly, with no
        request thread in between."""
        self.jobs.put(job)
        return await asyncio.wrap_future(job.done)

    def _next_batch(self, first: Job) -> tuple[list[Job], Job | None]:
        """`first` and every job waiting behind it that fits in MAX_BATCH texts; the job that did not fit
        opens the next batch."""
        batch, size = [first], len(first.texts)
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return batch, None
            if size + len(job.texts) > MAX_BATCH:
                return batch, job
            batch.append(job)
            size += len(job.texts)

    def _work(self) -> None:
        waiting: Job | None = None
        while True:
            batch, waiting = self._next_batch(waiting or self.jobs.get())
            try:
                vectors = self.retriever.embed([text for job in batch for text in job.texts])
                searched = [job for job in batch if job.k is not None]
                rows = np.concatenate([np.full(len(job.texts), job.k is not None) for job in batch])
                hits = (self.retriever.search_vectors(vectors[rows], max(job.k or 0 for job in searched))
                        if searched else [])
            except Exception as exc:  # a bug or a broken index: every caller gets the error, the worker lives on
                for job in batch:
                    job.done.set_exception(exc)
                continue
            start, found = 0, iter(hits)  # hits hold the searched jobs' rows, in batch order
            for job in batch:
                end = start + len(job.texts)
                job.done.set_result(vectors[start:end] if job.k is None
                                    else [next(found)[:job.k] for _ in job.texts])
                start = end


class SearchRequest(BaseModel):
    queries: list[str] = Field(description=f"1 to {MAX_BATCH} queries of at most {MAX_QUERY_CHARS} characters")
    k: int = Field(10, ge=1, description="results per query (at most the top_k evaluate scored)")


class EmbedRequest(BaseModel):
    texts: list[str] = Field(description=f"1 to {MAX_BATCH} texts of at most {MAX_QUERY_CHARS} characters")


MAX_BODY_BYTES = 4 * MAX_BATCH * MAX_QUERY_CHARS + 4096  # the largest valid batch, 4 UTF-8 bytes a character


class BodyTooLarge(Exception):
    pass


class LimitBody:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, by its Content-Length or, for a
    chunked body, as soon as the bytes read pass the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        from starlette.responses import JSONResponse

        response = JSONResponse({"error": f"request body over {self.limit} bytes: send at most {MAX_BATCH} texts "
                                          f"of at most {MAX_QUERY_CHARS} characters"}, status_code=413)
        await response({"type": "http"}, None, send)


def create_app(retriever: Retriever) -> Any:
    """The service around one loaded, checked retriever."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="embedforge", summary="search and embed with the pipeline's model and index")
    app.add_middleware(LimitBody, limit=MAX_BODY_BYTES)
    batcher = Batcher(retriever)

    @app.exception_handler(QueryError)
    async def refused(request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse({"error": str(exc), **retriever.version}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail), **retriever.version}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                             for error in exc.errors())
        return JSONResponse({"error": f"malformed request ({problems}); see /docs for the request schema",
                             **retriever.version}, status_code=422)

    async def searched(queries: list[str], k: int) -> dict[str, Any]:
        results = await batcher.search(queries, k)
        return {"results": [[asdict(hit) for hit in hits] for hits in results], **retriever.version}

    @app.post("/search")
    async def search(request: SearchRequest) -> dict[str, Any]:
        return await searched(request.queries, request.k)

    @app.get("/search")
    async def search_one(q: str, k: int = 10) -> dict[str, Any]:
        return await searched([q], k)

    @app.post("/embed")
    async def embed(request: EmbedRequest) -> dict[str, Any]:
        vectors = await batcher.embed(request.texts)
        return {"embeddings": vectors.tolist(), "dim": retriever.point.dim, **retriever.version}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "passages": len(retriever.doc_ids), **retriever.version}

    return app


def main(argv: list[str] | None = None) -> None:
    """CLI: `embedforge serve`."""
    # Idle OpenMP workers sleep instead of spinning: the spinning stole the cores from the request threads
    # (single-query p99 30 -> 17 ms on 2 cores, bench/serve.py). Set before torch and faiss start OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss
    import uvicorn

    from components.cli import configure_logging

    parser = argparse.ArgumentParser(prog="embedforge serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (another exposes the service)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    add_retriever_args(parser)
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    faiss.omp_set_num_threads(1)  # one query per search: OpenMP wake-ups cost more than they save
    app = create_app(retriever_from_args(args))
    log.info("serve: http://%s:%d (/search, /embed, /healthz, /docs)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    from components.cli import guarded

    sys.exit(guarded(main)())
