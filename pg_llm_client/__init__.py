"""Import shim: `from pg_llm_client import PGLLMClient` as in the seed walkthrough (see pgllm.client)."""

from pgllm.client import BeamCandidate, PGLLMClient, StreamEvent

__all__ = ["BeamCandidate", "PGLLMClient", "StreamEvent"]
