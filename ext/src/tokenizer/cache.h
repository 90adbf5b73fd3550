/*
 * bpe_tokenizer.h: a model's tokenizer as the encoder uses it, built from llm_bpe_vocab and
 * llm_bpe_merges and cached per backend (bpe_tokenizer.c); the merge table it is made of.
 */
#ifndef PG_LLM_BPE_TOKENIZER_H
#define PG_LLM_BPE_TOKENIZER_H

#include "postgres.h"

#include "base/base.h"

/* The special token, split out of the text before anything else. */
#define BPE_EOT_TOKEN "<|endoftext|>"
#define BPE_EOT_LEN 13

/* ---- the merge table: (left id, right id) -> (rank, merged id) ------------------------------- */

typedef struct BpeMergeEntry
{
	uint64		key;			/* left << 32 | right; BPE_MERGE_EMPTY when free */
	int32		rank;
	int32		new_id;
} BpeMergeEntry;

#define BPE_MERGE_EMPTY UINT64_MAX

typedef struct BpeMerges
{
	BpeMergeEntry *slots;		/* open addressing, at most half full */
	uint32		mask;
	int			shift;			/* 64 - log2(slots) */
} BpeMerges;

/* An empty table for n_merges merges, in cxt. */
extern void bpe_merges_init(BpeMerges *m, MemoryContext cxt, int n_merges);

/* Inserts or overwrites (a later merge of the same pair wins, as in tokenizers). */
extern void bpe_merges_put(BpeMerges *m, int32 a, int32 b, int32 rank, int32 new_id);

/* The merge of (a, b), if any: inline, for the encoder's inner loop. */
static inline bool
bpe_merges_find(const BpeMerges *m, int32 a, int32 b, int32 *rank, int32 *new_id)
{
	uint64		key = ((uint64) (uint32) a << 32) | (uint32) b;
	uint32		h = (uint32) ((key * 0x9E3779B97F4A7C15ULL) >> m->shift);

	for (;;)
	{
		const BpeMergeEntry *e = &m->slots[h];

		if (e->key == key)
		{
			*rank = e->rank;
			*new_id = e->new_id;
			return true;
		}
		if (e->key == BPE_MERGE_EMPTY)
			return false;
		h = (h + 1) & m->mask;
	}
}

/* ---- the tokenizer --------------------------------------------------------------------------- */

/*
 * What a query sees of the tables. Within one top transaction and subtransaction, two MVCC
 * snapshots with the same command id, xmin, xmax and in-progress lists make the same rows
 * visible, so the version read under one holds for the other.
 */
typedef struct BpeSnapshotStamp
{
	LocalTransactionId lxid;
	SubTransactionId subxid;
	CommandId	curcid;
	TransactionId xmin;
	TransactionId xmax;
	uint32		xcnt;
	int32		subxcnt;
	bool		suboverflowed;
	bool		recovery;
	TransactionId *xids;		/* xip then subxip, in the tokenizer's context */
	uint32		xids_cap;
} BpeSnapshotStamp;

typedef struct BpeTokenizer
{
	struct BpeTokenizer *next;
	MemoryContext cxt;			/* everything of the tokenizer, under TopMemoryContext */
	char		model[LLM_MODEL_NAME_MAX + 1];
	int64		version;
	Oid			table_oid;		/* of llm_tokenizer_version when the version was read */
	Oid			user;			/* whose rights read the tables: another role reads them again */
	bool		checked;		/* the version was read under the snapshot in stamp */
	BpeSnapshotStamp stamp;
	int32		vocab_size;		/* largest id + 1 */
	int32		n_tokens;
	int32		n_merges;
	int32		eot_id;			/* -1 when the vocabulary has no <|endoftext|> */
	int32		byte_id[256];	/* id of each byte's one-character token, or -1 */
	uint32	   *tok_off;		/* (vocab_size + 1) offsets into tok_bytes; a gap has length 0 */
	bool	   *tok_present;	/* (vocab_size) */
	unsigned char *tok_bytes;	/* raw bytes of every token */
	BpeMerges	merges;

	/* The encoder's cache of encoded pieces (bpe.c); empty (NULL) until its first use. */
	uint64	   *word_slots;		/* hash >> 32 << 32 | (arena offset + 1); 0 = empty */
	uint32		word_mask;		/* slots - 1 */
	uint32		n_words;
	uint32	   *arena;
	uint32		arena_used,		/* in 4-byte words */
				arena_cap;
} BpeTokenizer;

/*
 * The model's tokenizer, rebuilt when its tables changed (llm_tokenizer_version, read once per
 * snapshot). ERROR when the model has none. Valid until the next call.
 */
extern BpeTokenizer *bpe_tokenizer_get(const char *model);

/* Text from a table as UTF-8 (a no-op in a UTF8 database); *len its length. */
extern char *bpe_datum_to_utf8(Datum d, int *len);

#endif							/* PG_LLM_BPE_TOKENIZER_H */
