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

Each method is one SQL call (llm_generate, llm_generate_stream, llm_beam_search); the client does
no tensor math. Methods run in a transaction of their own (a savepoint inside the caller's
transaction), so that a stream left early (its query is cancelled) leaves the connection usable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

DEFAULT_MODEL = "gpt2-small"


def default_model() -> str:
    """PGLLM_MODEL, else gpt2-small: the default of every pgllm command too."""
    return os.environ.get("PGLLM_MODEL") or DEFAULT_MODEL


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
        self._schema: sql.Identifier | None = None

    def _function(self, name: str) -> sql.Composed:
        """The function qualified with pg_llm's schema, whatever the search_path."""
        if self._schema is None:
            row = self.conn.execute("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n "
                                    "ON n.oid = e.extnamespace WHERE e.extname = 'pg_llm'").fetchone()
            if row is None:
                raise psycopg.errors.UndefinedObject(
                    "extension \"pg_llm\" is not installed in this database (run pgllm install)")
            self._schema = sql.Identifier(row[0])
        return sql.SQL("{}.{}").format(self._schema, sql.Identifier(name))

    def generate(self, prompt: str, temperature: float = 1.0, max_tokens: int = 64, top_k: int = 50,
                 top_p: float = 0.95, seed: int | None = None, model: str | None = None) -> str:
        """The text generated after the prompt (temperature 0: greedy; a seed: reproducible)."""
        query = sql.SQL("SELECT {}(%s, %s, %s, %s, %s, %s, %s)").format(self._function("llm_generate"))
        with self.conn.transaction():
            row = self.conn.execute(query, (prompt, max_tokens, temperature, top_k, top_p,
                                            model or self.model, seed)).fetchone()
        return row[0]

    def stream(self, prompt: str, max_tokens: int = 64, temperature: float = 1.0, top_k: int = 50,
               top_p: float = 0.95, seed: int | None = None, model: str | None = None) -> Iterator[StreamEvent]:
        """Yield each token as the server produces it. Leaving the loop early cancels the query."""
        query = sql.SQL("SELECT (e).* FROM (SELECT {}(%s, %s, %s, %s, %s, %s, %s) AS e) s").format(
            self._function("llm_generate_stream"))
        with self.conn.transaction(), self.conn.cursor() as cur:
            for row in cur.stream(query, (prompt, max_tokens, temperature, top_k, top_p, model or self.model, seed)):
                yield StreamEvent(*row)

    def beam_search(self, prompt: str, beam_width: int = 4, max_tokens: int = 32, length_penalty: float = 1.0,
                    model: str | None = None) -> list[BeamCandidate]:
        """beam_width hypotheses, best first, as transformers' generate(num_beams=beam_width)."""
        query = sql.SQL("SELECT rank, score, token_ids, text FROM {}(%s, %s, %s, %s, %s) ORDER BY rank").format(
            self._function("llm_beam_search"))
        with self.conn.transaction():
            rows = self.conn.execute(query, (prompt, beam_width, max_tokens, model or self.model,
                                             length_penalty)).fetchall()
        return [BeamCandidate(*row) for row in rows]
