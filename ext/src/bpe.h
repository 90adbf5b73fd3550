/*
 * bpe.h: the GPT-2 byte-level BPE tokenizer, identical to Hugging Face's GPT-2 tokenizer.
 *
 * Tokenizers live in llm_bpe_vocab / llm_bpe_merges, keyed by model, and are cached per backend
 * (rebuilt when llm_tokenizer_version says the tables changed).
 */
#ifndef PG_LLM_BPE_H
#define PG_LLM_BPE_H

#include "postgres.h"

/* All return palloc'd memory in CurrentMemoryContext and ereport(ERROR) on failure. */
extern int32 *llm_bpe_encode(const char *model, const char *text, int len, int *n_out);
extern char *llm_bpe_decode(const char *model, const int32 *ids, int n, int *len_out); /* NUL-terminated; raw bytes joined; invalid UTF-8 replaced with U+FFFD as HF's decode does */
extern bytea *llm_bpe_token_bytes(const char *model, int32 id);	/* raw bytes of one token (for streaming) */
extern int32 llm_bpe_eot_id(const char *model);	/* id of <|endoftext|>, or -1 */

/*
 * Load a model's tokenizer from the bytes of vocab.json and merges.txt (named file in messages),
 * with every check of pg_llm_load_bpe_vocab / _merges (bpe_load.c); the vocabulary first.
 * Returns the rows written.
 */
extern int64 llm_bpe_load_vocab(const char *file, char *data, size_t len, const char *model, bool replace);
extern int64 llm_bpe_load_merges(const char *file, char *data, size_t len, const char *model, bool replace);

#endif							/* PG_LLM_BPE_H */
