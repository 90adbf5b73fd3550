/*
 * bpe.c: GPT-2 byte-level BPE, encoding and decoding exactly as Hugging Face's GPT-2 tokenizer:
 * the C interface (bpe.h) and llm_encode, llm_decode, llm_token_bytes, llm_tokenizer_info.
 *
 * Encoding, as tokenizers does it for GPT-2:
 *   1. "<|endoftext|>" (an added special token) is split out of the raw text first;
 *   2. each remaining segment is cut by the pattern
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      here a hand-written scanner over code points (pretokenize.h);
 *   3. each piece's bytes become byte-level symbols, merged pairwise by lowest merge rank
 *      (leftmost first on ties) until no adjacent pair has a merge.
 * Decoding joins the tokens' raw bytes and replaces invalid UTF-8 with U+FFFD, one per maximal
 * invalid subpart (Rust's String::from_utf8_lossy, which HF's decode uses).
 *
 * The tokenizer is built from the tables and cached per backend (bpe_tokenizer.c); the encoder
 * keeps a cache of already-encoded pieces in it. The loaders of vocab.json / merges.txt are in
 * bpe_load.c.
 */
#include "base/base.h"
#include "tokenizer/bpe.h"
#include "tokenizer/cache.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/strmap.h"
#include "tokenizer/utf8.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

/*
 * Word cache: pieces of up to 255 bytes with their ids, packed one after the other in an arena
 * of 4-byte words, found through an open-addressing table of (hash high half, arena offset).
 * A hit costs one slot read and one arena read. The cache is emptied when full.
 */
#define WORD_CACHE_MAX_KEY 255
#define WORD_CACHE_MIN_SLOTS (1 << 12)
#define WORD_CACHE_MAX_SLOTS (1 << 18)	/* grows by doubling: small tables stay in cache */
#define WORD_CACHE_MAX_ENTRIES (WORD_CACHE_MAX_SLOTS / 2)	/* load factor at most 1/2 */
#define WORD_CACHE_ARENA_MAX (8 << 20)	/* in 4-byte words: 32 MB */

/* Words of at most this many bytes are merged by rescanning; longer ones use a heap. */
#define BPE_SHORT_WORD 64

/* Arena entry: this header, then n_ids ids, then the key's bytes, padded to 4 bytes. */
typedef struct WordEntry
{
	uint16		key_len;
	uint16		n_ids;
} WordEntry;

/* ---- BPE ----------------------------------------------------------------------------------- */

static void
missing_byte_error(const BpeTokenizer *t, unsigned char b)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATA_EXCEPTION),
			 errmsg("byte 0x%02x has no token in the vocabulary of model \"%s\"", b, t->model),
			 errdetail("A byte-level vocabulary has a one-character token for each of the 256 bytes.")));
}

/* Merges a short word by rescanning for the lowest-ranked pair; returns the number of ids. */
static int
bpe_short(const BpeTokenizer *t, int32 *sym, int m)
{
	int32		rank[BPE_SHORT_WORD];
	int32		merged[BPE_SHORT_WORD];

	for (int i = 0; i + 1 < m; i++)
		if (!bpe_merges_find(&t->merges, sym[i], sym[i + 1], &rank[i], &merged[i]))
			rank[i] = PG_INT32_MAX;
	while (m > 1)
	{
		int			best = -1;
		int32		best_rank = PG_INT32_MAX;

		for (int i = 0; i + 1 < m; i++)
			if (rank[i] < best_rank)
			{
				best_rank = rank[i];
				best = i;
			}
		if (best < 0)
			break;
		sym[best] = merged[best];
		m--;
		for (int i = best + 1; i < m; i++)
		{
			sym[i] = sym[i + 1];
			rank[i] = rank[i + 1];
			merged[i] = merged[i + 1];
		}
		if (best > 0 && !bpe_merges_find(&t->merges, sym[best - 1], sym[best], &rank[best - 1], &merged[best - 1]))
			rank[best - 1] = PG_INT32_MAX;
		if (best + 1 < m && !bpe_merges_find(&t->merges, sym[best], sym[best + 1], &rank[best], &merged[best]))
			rank[best] = PG_INT32_MAX;
	}
	return m;
}

static inline void
heap_push(uint64 *heap, int *n, uint64 v)
{
	int			i = (*n)++;

	while (i > 0 && heap[(i - 1) / 2] > v)
	{
		heap[i] = heap[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	heap[i] = v;
}

static inline uint64
heap_pop(uint64 *heap, int *n)
{
	uint64		top = heap[0];
	uint64		v = heap[--(*n)];
	int			i = 0;

	for (;;)
	{
		int			c = 2 * i + 1;

		if (c >= *n)
			break;
		if (c + 1 < *n && heap[c + 1] < heap[c])
			c++;
		if (heap[c] >= v)
			break;
		heap[i] = heap[c];
		i = c;
	}
	if (*n > 0)
		heap[i] = v;
	return top;
}

/*
 * Merges a long word with a priority queue of (rank, position) over a linked list of symbols,
 * O(m log m); stale entries are skipped when popped. Same order as bpe_short: lowest rank,
 * then leftmost. Returns the number of ids, compacted into sym.
 */
static int
bpe_long(const BpeTokenizer *t, int32 *sym, int m)
{
	int		   *prev = MemoryContextAllocHuge(CurrentMemoryContext, m * sizeof(int));
	int		   *next = MemoryContextAllocHuge(CurrentMemoryContext, m * sizeof(int));
	uint64	   *heap = MemoryContextAllocHuge(CurrentMemoryContext, 3 * (size_t) m * sizeof(uint64));
	int			heap_n = 0;
	int			out = 0;
	int32		rank,
				merged;
	uint32		steps = 0;

	for (int i = 0; i < m; i++)
	{
		prev[i] = i - 1;
		next[i] = i + 1 < m ? i + 1 : -1;
		if (i + 1 < m && bpe_merges_find(&t->merges, sym[i], sym[i + 1], &rank, &merged))
			heap_push(heap, &heap_n, (uint64) rank << 32 | (uint32) i);
	}
	while (heap_n > 0)
	{
		uint64		top = heap_pop(heap, &heap_n);
		int			pos = (int) (uint32) top;
		int32		want = (int32) (top >> 32);
		int			j;

		if ((++steps & 0xFFFF) == 0)
			CHECK_FOR_INTERRUPTS();
		if (sym[pos] < 0 || (j = next[pos]) < 0 ||
			!bpe_merges_find(&t->merges, sym[pos], sym[j], &rank, &merged) || rank != want)
			continue;			/* this pair no longer exists */
		sym[pos] = merged;
		sym[j] = -1;
		next[pos] = next[j];
		if (next[j] >= 0)
			prev[next[j]] = pos;
		if (prev[pos] >= 0 && bpe_merges_find(&t->merges, sym[prev[pos]], sym[pos], &rank, &merged))
			heap_push(heap, &heap_n, (uint64) rank << 32 | (uint32) prev[pos]);
		if (next[pos] >= 0 && bpe_merges_find(&t->merges, sym[pos], sym[next[pos]], &rank, &merged))
			heap_push(heap, &heap_n, (uint64) rank << 32 | (uint32) pos);
	}
	for (int i = 0; i >= 0; i = next[i])
		sym[out++] = sym[i];
	pfree(prev);
	pfree(next);
	pfree(heap);
	return out;
}

/* The cache's first table and arena, in the tokenizer's context (it lives as long as the tokenizer). */
static void
word_cache_init(BpeTokenizer *t)
{
	t->word_slots = MemoryContextAllocZero(t->cxt, WORD_CACHE_MIN_SLOTS * sizeof(uint64));
	t->word_mask = WORD_CACHE_MIN_SLOTS - 1;
	t->arena_cap = 1 << 16;
	t->arena = MemoryContextAlloc(t->cxt, t->arena_cap * sizeof(uint32));
}

static void
word_cache_clear(BpeTokenizer *t)
{
	memset(t->word_slots, 0, ((size_t) t->word_mask + 1) * sizeof(uint64));
	t->n_words = 0;
	t->arena_used = 0;
}

static inline uint32
word_entry_size(int len, int n_ids)
{
	return 1 + n_ids + (len + 3) / 4;
}

/* Doubles the slot table, re-inserting every entry of the arena (they lie end to end). */
static void
word_cache_grow(BpeTokenizer *t)
{
	uint32		size = (t->word_mask + 1) * 2;
	uint64	   *slots = MemoryContextAllocZero(t->cxt, (size_t) size * sizeof(uint64));

	for (uint32 off = 0; off < t->arena_used;)
	{
		const WordEntry *we = (const WordEntry *) (t->arena + off);
		uint64		hash = llm_hash_bytes((const unsigned char *) (t->arena + off + 1 + we->n_ids), we->key_len);
		uint32		slot = (uint32) hash & (size - 1);

		while (slots[slot] != 0)
			slot = (slot + 1) & (size - 1);
		slots[slot] = (hash & 0xFFFFFFFF00000000ULL) | (off + 1);
		off += word_entry_size(we->key_len, we->n_ids);
	}
	pfree(t->word_slots);
	t->word_slots = slots;
	t->word_mask = size - 1;
}

/* memcmp for the short keys of the cache, without a call. */
static inline bool
bytes_equal(const unsigned char *a, const unsigned char *b, size_t n)
{
	uint64		x,
				y;
	uint32		u,
				v;

	if (n >= 8)
	{
		size_t		i;

		for (i = 0; i + 8 <= n; i += 8)
		{
			memcpy(&x, a + i, 8);
			memcpy(&y, b + i, 8);
			if (x != y)
				return false;
		}
		memcpy(&x, a + n - 8, 8);
		memcpy(&y, b + n - 8, 8);
		return x == y;
	}
	if (n >= 4)
	{
		memcpy(&u, a, 4);
		memcpy(&v, b, 4);
		if (u != v)
			return false;
		memcpy(&u, a + n - 4, 4);
		memcpy(&v, b + n - 4, 4);
		return u == v;
	}
	for (size_t i = 0; i < n; i++)
		if (a[i] != b[i])
			return false;
	return true;
}

/* Remembers a piece's ids. Space is made before anything is linked, so an error leaves it whole. */
static void
word_cache_put(BpeTokenizer *t, uint64 hash, const unsigned char *w, int len, const int32 *ids, int n)
{
	uint32		size = word_entry_size(len, n);
	uint32		slot;
	uint32	   *e;

	if (t->n_words >= WORD_CACHE_MAX_ENTRIES || t->arena_used + size > WORD_CACHE_ARENA_MAX)
		return;					/* full: the next call starts it afresh */
	if ((t->n_words + 1) * 2 > t->word_mask + 1)
		word_cache_grow(t);
	slot = (uint32) hash & t->word_mask;
	while (t->word_slots[slot] != 0)
		slot = (slot + 1) & t->word_mask;
	if (t->arena_used + size > t->arena_cap)
	{
		uint32		cap = Min(t->arena_cap * 2, WORD_CACHE_ARENA_MAX);

		t->arena = repalloc(t->arena, cap * sizeof(uint32));
		t->arena_cap = cap;
	}
	e = t->arena + t->arena_used;
	((WordEntry *) e)->key_len = len;
	((WordEntry *) e)->n_ids = n;
	memcpy(e + 1, ids, n * sizeof(int32));
	memcpy(e + 1 + n, w, len);
	t->word_slots[slot] = (hash & 0xFFFFFFFF00000000ULL) | (t->arena_used + 1);
	t->arena_used += size;
	t->n_words++;
}

/* Appends the ids of one piece to out; returns how many. */
static inline int
encode_word(BpeTokenizer *t, const unsigned char *w, size_t len, int32 *out)
{
	uint64		hash = 0;
	int			n;

	if (len == 1)
	{
		if (unlikely(t->byte_id[w[0]] < 0))
			missing_byte_error(t, w[0]);
		out[0] = t->byte_id[w[0]];
		return 1;
	}
	if (len <= WORD_CACHE_MAX_KEY)
	{
		uint32		slot;

		hash = llm_hash_bytes(w, len);
		slot = (uint32) hash & t->word_mask;
		for (;;)
		{
			uint64		v = t->word_slots[slot];

			if (v == 0)
				break;
			if ((v >> 32) == (hash >> 32))
			{
				const uint32 *e = t->arena + ((uint32) v - 1);
				const WordEntry *we = (const WordEntry *) e;

				if (we->key_len == len && bytes_equal((const unsigned char *) (e + 1 + we->n_ids), w, len))
				{
					memcpy(out, e + 1, we->n_ids * sizeof(int32));
					return we->n_ids;
				}
			}
			slot = (slot + 1) & t->word_mask;
		}
	}
	/* The caller made room for len ids (one per byte at most): merge in place there. */
	for (size_t i = 0; i < len; i++)
	{
		if (unlikely(t->byte_id[w[i]] < 0))
			missing_byte_error(t, w[i]);
		out[i] = t->byte_id[w[i]];
	}
	n = len <= BPE_SHORT_WORD ? bpe_short(t, out, (int) len) : bpe_long(t, out, (int) len);
	if (len <= WORD_CACHE_MAX_KEY)
		word_cache_put(t, hash, w, (int) len, out, n);
	return n;
}

/* Ids being produced; palloc'd in the caller's context. */
typedef struct IdBuffer
{
	int32	   *ids;
	size_t		n;
	size_t		cap;
} IdBuffer;

/* Room for at least extra more ids. */
static inline void
ids_reserve(IdBuffer *b, size_t extra)
{
	if (likely(b->n + extra <= b->cap))
		return;
	b->cap = Max(b->cap * 2, b->n + extra);
	b->ids = repalloc_huge(b->ids, b->cap * sizeof(int32));
}

/* Encodes text (len bytes), appending to out. */
static void
encode_text(BpeTokenizer *t, const unsigned char *s, size_t len, IdBuffer *out)
{
	size_t		p = 0;
	uint32		pieces = 0;

	if (t->word_slots == NULL)
		word_cache_init(t);
	else if (t->n_words >= WORD_CACHE_MAX_ENTRIES || t->arena_used > WORD_CACHE_ARENA_MAX / 2)
		word_cache_clear(t);
	while (p < len)
	{
		/* The segment up to the next <|endoftext|>, which is one token of its own. */
		const unsigned char *eot = NULL;
		size_t		end = len;

		if (t->eot_id >= 0)
		{
			eot = memmem(s + p, len - p, BPE_EOT_TOKEN, BPE_EOT_LEN);
			if (eot != NULL)
				end = eot - s;
		}
		while (p < end)
		{
			size_t		q = next_piece(s, end, p);

			/* A piece gives at most one id per byte; BPE merges in place in the output. */
			ids_reserve(out, q - p);
			out->n += encode_word(t, s + p, q - p, out->ids + out->n);
			p = q;
			if ((++pieces & 0x3FFF) == 0)
				CHECK_FOR_INTERRUPTS();
		}
		if (eot != NULL)
		{
			ids_reserve(out, 1);
			out->ids[out->n++] = t->eot_id;
			p = end + BPE_EOT_LEN;
		}
	}
}

/* ---- decoding ------------------------------------------------------------------------------ */

static void
check_id(const BpeTokenizer *t, int32 id)
{
	if (id < 0 || id >= t->vocab_size || !t->tok_present[id])
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("token id %d is not in the vocabulary of model \"%s\"", id, t->model),
				 errdetail("Token ids of this model run from 0 to %d.", t->vocab_size - 1)));
}

/* ---- the C interface ----------------------------------------------------------------------- */

int32 *
llm_bpe_encode(const char *model, const char *text, int len, int *n_out)
{
	BpeTokenizer *t = bpe_tokenizer_get(model);
	IdBuffer	out;

	if (len < 0)
		elog(ERROR, "llm_bpe_encode: negative length");
	/* GPT-2 averages 2 to 4 bytes a token on prose and code; the buffer doubles when short. */
	out.cap = (size_t) len / 3 + 16;
	out.n = 0;
	out.ids = MemoryContextAllocHuge(CurrentMemoryContext, out.cap * sizeof(int32));
	encode_text(t, (const unsigned char *) text, len, &out);
	*n_out = (int) out.n;
	return out.ids;
}

char *
llm_bpe_decode(const char *model, const int32 *ids, int n, int *len_out)
{
	BpeTokenizer *t = bpe_tokenizer_get(model);
	size_t		total = 0;
	unsigned char *raw;
	char	   *out;
	size_t		o = 0;

	for (int i = 0; i < n; i++)
	{
		check_id(t, ids[i]);
		total += t->tok_off[ids[i] + 1] - t->tok_off[ids[i]];
	}
	/* Replacements only lengthen the text, so this is a lower bound of its length. */
	if (total > MaxAllocSize - VARHDRSZ - 1)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("decoded text would be too long (%zu bytes)", total)));
	raw = MemoryContextAllocHuge(CurrentMemoryContext, Max(total, 1));
	for (int i = 0; i < n; i++)
	{
		uint32		off = t->tok_off[ids[i]];
		uint32		len = t->tok_off[ids[i] + 1] - off;

		memcpy(raw + o, t->tok_bytes + off, len);
		o += len;
	}
	out = MemoryContextAllocHuge(CurrentMemoryContext, total * 3 + 1);
	o = llm_utf8_lossy(raw, total, out);
	pfree(raw);
	if (o > MaxAllocSize - VARHDRSZ - 1)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("decoded text would be too long (%zu bytes)", o)));
	*len_out = (int) o;
	return out;
}

bytea *
llm_bpe_token_bytes(const char *model, int32 id)
{
	BpeTokenizer *t = bpe_tokenizer_get(model);
	uint32		off,
				len;
	bytea	   *b;

	check_id(t, id);
	off = t->tok_off[id];
	len = t->tok_off[id + 1] - off;
	b = palloc(VARHDRSZ + len);
	SET_VARSIZE(b, VARHDRSZ + len);
	memcpy(VARDATA(b), t->tok_bytes + off, len);
	return b;
}

int32
llm_bpe_eot_id(const char *model)
{
	return bpe_tokenizer_get(model)->eot_id;
}

/* ---- SQL: llm_encode, llm_decode ----------------------------------------------------------- */

PG_FUNCTION_INFO_V1(llm_encode);
Datum
llm_encode(PG_FUNCTION_ARGS)
{
	text	   *input = PG_GETARG_TEXT_PP(0);
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	const char *s = VARDATA_ANY(input);
	int			len = VARSIZE_ANY_EXHDR(input);
	char	   *utf8 = pg_server_to_any(s, len, PG_UTF8);
	int32	   *ids;
	int			n;
	size_t		bytes;
	ArrayType  *result;

	if (utf8 != s)
		len = strlen(utf8);
	ids = llm_bpe_encode(model, utf8, len, &n);
	bytes = ARR_OVERHEAD_NONULLS(1) + (size_t) n * sizeof(int32);
	if (bytes > MaxAllocSize)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("text has too many tokens for one array (%d)", n)));
	result = palloc(bytes);
	SET_VARSIZE(result, bytes);
	result->ndim = 1;
	result->dataoffset = 0;
	result->elemtype = INT4OID;
	ARR_DIMS(result)[0] = n;
	ARR_LBOUND(result)[0] = 1;
	memcpy(ARR_DATA_PTR(result), ids, (size_t) n * sizeof(int32));
	pfree(ids);
	PG_RETURN_ARRAYTYPE_P(result);
}

PG_FUNCTION_INFO_V1(llm_decode);
Datum
llm_decode(PG_FUNCTION_ARGS)
{
	ArrayType  *arr = PG_GETARG_ARRAYTYPE_P(0);
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	int			n = ArrayGetNItems(ARR_NDIM(arr), ARR_DIMS(arr));
	char	   *out;
	char	   *server;
	int			len;

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("token ids must be a one-dimensional array")));
	if (ARR_HASNULL(arr) && array_contains_nulls(arr))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("token ids must not be null")));
	out = llm_bpe_decode(model, n > 0 ? (int32 *) ARR_DATA_PTR(arr) : NULL, n, &len);
	server = pg_any_to_server(out, len, PG_UTF8);
	PG_RETURN_TEXT_P(cstring_to_text_with_len(server, server == out ? len : (int) strlen(server)));
}

PG_FUNCTION_INFO_V1(llm_token_bytes);
Datum
llm_token_bytes(PG_FUNCTION_ARGS)
{
	int32		id = PG_GETARG_INT32(0);
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));

	PG_RETURN_BYTEA_P(llm_bpe_token_bytes(model, id));
}

PG_FUNCTION_INFO_V1(llm_tokenizer_info);
Datum
llm_tokenizer_info(PG_FUNCTION_ARGS)
{
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(0));
	BpeTokenizer *t = bpe_tokenizer_get(model);
	TupleDesc	desc;
	Datum		values[5];
	bool		nulls[5] = {false};

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "llm_tokenizer_info must return a record");
	values[0] = Int32GetDatum(t->vocab_size);
	values[1] = Int32GetDatum(t->n_tokens);
	values[2] = Int32GetDatum(t->n_merges);
	values[3] = Int32GetDatum(t->eot_id);
	values[4] = Int64GetDatum(t->version);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}
