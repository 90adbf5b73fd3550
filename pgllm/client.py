"""PGLLMClient: text generation, streaming and beam search from Python, computed in the database.

    import psycopg
    from pg_llm_client import PGLLMClient

    with psycopg.connect("postgresql://postgres@localhost:5432/postgres") as conn:
        client = PGLLMClient(conn)
        print(client.generate("Hello from Postgres", temperature=0.6))
        for event in client.stream("Streaming tokens", max_tokens=4):
            print(event.step, event.token, event.text)
        for candidate in client.beam_search("Beam me", beam_width=2, max_tokens=6):
            print(candidate.score, candidate.text)
        texts = client.generate_batch(["First prompt", "Second prompt"], max_tokens=16)

Each method is one SQL call (llm_generate, llm_generate_stream, llm_beam_search; llm_generate_batch
per chunk of prompts); the client does no tensor math. Methods run in a transaction of their own
(a savepoint inside the caller's transaction), so that a stream left early (its query is
cancelled) leaves the connection usable. Statements are never prepared on the server, so the
client works through PgBouncer in transaction pooling mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .db import Pgllm

DEFAULT_MODEL = "gpt2-small"
MODEL_ENV = "PGLLM_MODEL"


def default_model() -> str:
    """PGLLM_MODEL, else gpt2-small: the default of every pgllm command's --model too."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


@dataclass(frozen=True)
class StreamEvent:
    """One generated token. `token` is its new text (whole characters: a token that ends inside a
    character has '' and the next one carries it); `text` is all generated text so far."""
    step: int
    token_id: int
    token: str
    text: str
    is_complete: bool


@dataclass(frozen=True)
class BeamCandidate:
    """One beam search hypothesis: score = sum of log-probabilities / length ** length_penalty."""
    rank: int
    score: float
    token_ids: list[int]
    text: str


class PGLLMClient:
    """Generation with a model stored in PostgreSQL by pg_llm, over a psycopg 3 connection."""

    def __init__(self, conn: psycopg.Connection, model: str | None = None):
        self.conn = conn
        self.model = model or default_model()
        self._pg: Pgllm | None = None

    def _sql(self, query: str) -> sql.Composed:
        """The statement with pg_llm's names qualified by its schema, whatever the search_path."""
        if self._pg is None:
            self._pg = Pgllm(self.conn)
        return self._pg.sql(query)

    def _rows(self, query: str, params: tuple) -> list[tuple]:
        """All rows of one statement, in a transaction of its own (the schema lookup included, so
        that no transaction stays open after a call)."""
        with self.conn.transaction():
            return self.conn.execute(self._sql(query), params, prepare=False).fetchall()

    def generate(self, prompt: str, temperature: float = 1.0, max_tokens: int = 64, top_k: int = 50,
                 top_p: float = 0.95, seed: int | None = None, model: str | None = None) -> str:
        """The text generated after the prompt (temperature 0: greedy; a seed: reproducible)."""
        return self._rows("SELECT {llm_generate}(%s, %s, %s, %s, %s, %s, %s)",
                          (prompt, max_tokens, temperature, top_k, top_p, model or self.model, seed))[0][0]

    def stream(self, prompt: str, max_tokens: int = 64, temperature: float = 1.0, top_k: int = 50,
               top_p: float = 0.95, seed: int | None = None, model: str | None = None) -> Iterator[StreamEvent]:
        """Yield each token as the server produces it. Leaving the loop early cancels the query."""
        with self.conn.transaction(), self.conn.cursor() as cur:
            query = self._sql("SELECT (e).* FROM (SELECT {llm_generate_stream}(%s, %s, %s, %s, %s, %s, %s) AS e) s")
            for row in cur.stream(query, (prompt, max_tokens, temperature, top_k, top_p, model or self.model, seed)):
                yield StreamEvent(*row)

    def beam_search(self, prompt: str, beam_width: int = 4, max_tokens: int = 32, length_penalty: float = 1.0,
                    model: str | None = None) -> list[BeamCandidate]:
        """beam_width hypotheses, best first, as transformers' generate(num_beams=beam_width)."""
        rows = self._rows("SELECT rank, score, token_ids, text FROM {llm_beam_search}(%s, %s, %s, %s, %s) "
                          "ORDER BY rank", (prompt, beam_width, max_tokens, model or self.model, length_penalty))
        return [BeamCandidate(*row) for row in rows]

    def generate_batch(self, prompts: Sequence[str | None], max_tokens: int = 64, temperature: float = 1.0,
                       top_k: int = 50, top_p: float = 0.95, seed: int | None = None, model: str | None = None,
                       chunk: int = 256) -> list[str | None]:
        """The text generated after each prompt, in order: item i equals generate(prompts[i], ...)
        with the same arguments (a seed seeds every prompt's own stream; None gives None). The
        prompts go to the server `chunk` at a time (one llm_generate_batch call each), decoded
        together there."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        out: list[str | None] = []
        for start in range(0, len(prompts), chunk):
            rows = self._rows("SELECT text FROM {llm_generate_batch}(%s::text[], %s, %s, %s, %s, %s, %s) ORDER BY ord",
                              (list(prompts[start:start + chunk]), max_tokens, temperature, top_k, top_p,
                               model or self.model, seed))
            out.extend(row[0] for row in rows)
        return out
