/*
 * tokenizer.h: GPT-2's byte-level BPE tokenizer, as the rest of pg_llm sees it: encoding and
 * decoding exactly as Hugging Face's (bpe.h), the backend's cache of each model's tokenizer built
 * from llm_bpe_vocab and llm_bpe_merges (cache.h), and the UTF-8 helpers of streaming (utf8.h).
 * The loaders of vocab.json and merges.txt (load.c) are SQL functions only.
 */
#ifndef PG_LLM_TOKENIZER_H
#define PG_LLM_TOKENIZER_H

#include "tokenizer/bpe.h"
#include "tokenizer/cache.h"
#include "tokenizer/utf8.h"

#endif							/* PG_LLM_TOKENIZER_H */
