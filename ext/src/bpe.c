/*
 * bpe.c: GPT-2 byte-level BPE, encoding and decoding exactly as Hugging Face's GPT-2 tokenizer,
 * plus the loaders of vocab.json / merges.txt.
 *
 * Encoding, as tokenizers does it for GPT-2:
 *   1. "<|endoftext|>" (an added special token) is split out of the raw text first;
 *   2. each remaining segment is cut by the pattern
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      here a hand-written scanner over code points (classes from unicode_tables.h);
 *   3. each piece's bytes become byte-level symbols, merged pairwise by lowest merge rank
 *      (leftmost first on ties) until no adjacent pair has a merge.
 * Decoding joins the tokens' raw bytes and replaces invalid UTF-8 with U+FFFD, one per maximal
 * invalid subpart (Rust's String::from_utf8_lossy, which HF's decode uses).
 *
 * A tokenizer is built from the tables once per backend and kept in its own memory context
 * under TopMemoryContext, together with a cache of already-encoded pieces. Each call reads the
 * model's row of llm_tokenizer_version (one index lookup); statement triggers on the two tables
 * set it from a sequence, so a changed, reloaded or rolled-back tokenizer never matches a stale
 * cache.
 */
#include "pg_llm.h"
#include "bpe.h"
#include "model.h"
#include "unicode_tables.h"
#include "utf8.h"

#include <sys/stat.h>

#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "storage/proc.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#define EOT_TOKEN "<|endoftext|>"
#define EOT_LEN 13
#define MAX_CACHED_TOKENIZERS 4

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

/* ---- GPT-2's byte <-> unicode map ------------------------------------------------------------
 * Printable bytes map to themselves; the 68 others to U+0100.. in byte order, so that every
 * token is a printable string. */
static uint16 byte_to_cp[256];
static int16 cp_to_byte[324];	/* -1 where a code point is not the image of a byte */
static bool byte_map_ready = false;

static void
init_byte_map(void)
{
	int			n = 0;

	if (byte_map_ready)
		return;
	for (int cp = 0; cp < 324; cp++)
		cp_to_byte[cp] = -1;
	for (int b = 0; b < 256; b++)
	{
		bool		printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);

		byte_to_cp[b] = printable ? b : 256 + n++;
		cp_to_byte[byte_to_cp[b]] = b;
	}
	byte_map_ready = true;
}

/* ---- hashing ------------------------------------------------------------------------------- */

static inline uint64
hash_bytes64(const unsigned char *s, size_t n)
{
	uint64		h = 0x9E3779B97F4A7C15ULL ^ (n * 0xff51afd7ed558ccdULL);
	uint64		v;

	while (n >= 8)
	{
		memcpy(&v, s, 8);
		h = (h ^ v) * 0xff51afd7ed558ccdULL;
		h ^= h >> 32;
		s += 8;
		n -= 8;
	}
	v = 0;
	memcpy(&v, s, n);
	h = (h ^ v) * 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 29;
	return h;
}

/* String -> int map, open addressing over indices into the caller's key arrays. */
typedef struct StrMap
{
	uint32	   *slots;			/* entry index + 1; 0 = empty */
	uint32		mask;
	const char **keys;
	int		   *lens;
	int32	   *values;
	int			n;
} StrMap;

static void
strmap_init(StrMap *m, int capacity)
{
	uint32		size = 16;

	while (size < (uint32) capacity * 2)
		size <<= 1;
	m->slots = palloc0_array(uint32, size);
	m->mask = size - 1;
	m->keys = palloc_array(const char *, capacity);
	m->lens = palloc_array(int, capacity);
	m->values = palloc_array(int32, capacity);
	m->n = 0;
}

/* The value of key, or -1. With insert_value >= 0, inserts it when absent (returns -1 then). */
static int32
strmap_lookup(StrMap *m, const char *key, int len, int32 insert_value)
{
	uint32		h = (uint32) hash_bytes64((const unsigned char *) key, len) & m->mask;

	for (;;)
	{
		uint32		e = m->slots[h];

		if (e == 0)
		{
			if (insert_value >= 0)
			{
				m->keys[m->n] = key;
				m->lens[m->n] = len;
				m->values[m->n] = insert_value;
				m->slots[h] = ++m->n;
			}
			return -1;
		}
		if (m->lens[e - 1] == len && memcmp(m->keys[e - 1], key, len) == 0)
			return m->values[e - 1];
		h = (h + 1) & m->mask;
	}
}

/* ---- the tokenizer ------------------------------------------------------------------------- */

/* (left id, right id) -> (rank, merged id) */
typedef struct MergeEntry
{
	uint64		key;			/* left << 32 | right; MERGE_EMPTY when free */
	int32		rank;
	int32		new_id;
} MergeEntry;

#define MERGE_EMPTY UINT64_MAX

/* Arena entry: this header, then n_ids ids, then the key's bytes, padded to 4 bytes. */
typedef struct WordEntry
{
	uint16		key_len;
	uint16		n_ids;
} WordEntry;

/*
 * What a query sees of the tables. Within one top transaction and subtransaction, two MVCC
 * snapshots with the same command id, xmin, xmax and in-progress lists make the same rows
 * visible, so the version read under one holds for the other.
 */
typedef struct SnapshotStamp
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
} SnapshotStamp;

typedef struct BpeTokenizer
{
	struct BpeTokenizer *next;
	MemoryContext cxt;
	char		model[LLM_MODEL_NAME_MAX + 1];
	int64		version;
	Oid			table_oid;		/* of llm_tokenizer_version when the version was read */
	bool		checked;		/* the version was read under the snapshot in stamp */
	SnapshotStamp stamp;
	int32		vocab_size;		/* largest id + 1 */
	int32		n_tokens;
	int32		n_merges;
	int32		eot_id;			/* -1 when the vocabulary has no <|endoftext|> */
	int32		byte_id[256];	/* id of each byte's one-character token, or -1 */
	uint32	   *tok_off;		/* (vocab_size + 1) offsets into tok_bytes; a gap has length 0 */
	bool	   *tok_present;	/* (vocab_size) */
	unsigned char *tok_bytes;	/* raw bytes of every token */
	MergeEntry *merges;
	uint32		merge_mask;
	int			merge_shift;

	/* Cache of encoded pieces. */
	uint64	   *word_slots;		/* hash >> 32 << 32 | (arena offset + 1); 0 = empty */
	uint32		word_mask;		/* slots - 1 */
	uint32		n_words;
	uint32	   *arena;
	uint32		arena_used,		/* in 4-byte words */
				arena_cap;
} BpeTokenizer;

static BpeTokenizer *tokenizers = NULL;

static inline bool
merge_find(const BpeTokenizer *t, int32 a, int32 b, int32 *rank, int32 *new_id)
{
	uint64		key = ((uint64) (uint32) a << 32) | (uint32) b;
	uint32		h = (uint32) ((key * 0x9E3779B97F4A7C15ULL) >> t->merge_shift);

	for (;;)
	{
		const MergeEntry *e = &t->merges[h];

		if (e->key == key)
		{
			*rank = e->rank;
			*new_id = e->new_id;
			return true;
		}
		if (e->key == MERGE_EMPTY)
			return false;
		h = (h + 1) & t->merge_mask;
	}
}

/* Inserts or overwrites (a later merge of the same pair wins, as in tokenizers). */
static void
merge_put(BpeTokenizer *t, int32 a, int32 b, int32 rank, int32 new_id)
{
	uint64		key = ((uint64) (uint32) a << 32) | (uint32) b;
	uint32		h = (uint32) ((key * 0x9E3779B97F4A7C15ULL) >> t->merge_shift);

	while (t->merges[h].key != MERGE_EMPTY && t->merges[h].key != key)
		h = (h + 1) & t->merge_mask;
	t->merges[h].key = key;
	t->merges[h].rank = rank;
	t->merges[h].new_id = new_id;
}

static void
merges_alloc(BpeTokenizer *t, MemoryContext cxt, int n_merges)
{
	uint32		size = 16;
	int			bits = 4;

	while (size < (uint32) n_merges * 2)
	{
		size <<= 1;
		bits++;
	}
	t->merges = MemoryContextAllocHuge(cxt, size * sizeof(MergeEntry));
	for (uint32 i = 0; i < size; i++)
		t->merges[i].key = MERGE_EMPTY;
	t->merge_mask = size - 1;
	t->merge_shift = 64 - bits;
}

/*
 * A token's raw bytes: its characters mapped back through the byte map, or, when a character is
 * not the image of a byte (a token added by hand), the token's own UTF-8 (as HF's decoder does).
 * Writes at most len bytes into out and returns the count.
 */
static int
token_string_to_bytes(const char *s, int len, unsigned char *out)
{
	const unsigned char *p = (const unsigned char *) s;
	const unsigned char *end = p + len;
	int			n = 0;

	while (p < end)
	{
		int			clen = pg_utf_mblen(p);
		pg_wchar	cp;

		if (p + clen > end)
			break;
		cp = utf8_to_unicode(p);
		if (cp >= 324 || cp_to_byte[cp] < 0)
			break;
		out[n++] = (unsigned char) cp_to_byte[cp];
		p += clen;
	}
	if (p < end)
	{
		memcpy(out, s, len);
		return len;
	}
	return n;
}

static void
tokenizer_free(BpeTokenizer *t)
{
	MemoryContextDelete(t->cxt);
}

static void
no_tokenizer_error(const char *model)
{
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("model \"%s\" has no tokenizer", model),
			 errhint("Load one with: pgllm tokenizer --model %s", model)));
}

/* Text from a table as UTF-8 (a no-op in a UTF8 database). */
static char *
datum_to_utf8(Datum d, int *len)
{
	text	   *t = DatumGetTextPP(d);
	char	   *s = VARDATA_ANY(t);
	int			n = VARSIZE_ANY_EXHDR(t);
	char	   *u = pg_server_to_any(s, n, PG_UTF8);

	*len = (u == s) ? n : (int) strlen(u);
	return u;
}

/*
 * Builds the model's tokenizer from the tables. Its memory context hangs under the caller's
 * context until it is complete, so that an error half-way frees everything.
 */
static BpeTokenizer *
tokenizer_build(const char *model, int64 version)
{
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "pg_llm tokenizer", ALLOCSET_DEFAULT_SIZES);
	MemoryContext old;
	BpeTokenizer *t = MemoryContextAllocZero(cxt, sizeof(BpeTokenizer));
	Oid			argtypes[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(model)};
	StrMap		ids;
	int32		max_id = -1;
	uint64		n_tokens,
				n_merges;
	size_t		total_bytes = 0;
	int			ret;

	init_byte_map();
	strlcpy(t->model, model, sizeof(t->model));
	t->cxt = cxt;
	t->version = version;
	t->eot_id = -1;

	SPI_connect();
	ret = SPI_execute_with_args(psprintf("SELECT token_id, token FROM %s WHERE model = $1",
										 llm_table("llm_bpe_vocab")),
								1, argtypes, values, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading llm_bpe_vocab failed: %s", SPI_result_code_string(ret));
	n_tokens = SPI_processed;
	if (n_tokens == 0)
		no_tokenizer_error(model);

	/* Token strings live in the SPI context until SPI_finish; ids map strings for the merges. */
	strmap_init(&ids, (int) n_tokens);
	for (uint64 r = 0; r < n_tokens; r++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[r];
		bool		isnull;
		int32		id = DatumGetInt32(SPI_getbinval(tuple, SPI_tuptable->tupdesc, 1, &isnull));
		int			len;
		char	   *s = datum_to_utf8(SPI_getbinval(tuple, SPI_tuptable->tupdesc, 2, &isnull), &len);

		if (id < 0 || id > LLM_TOKEN_ID_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("token id %d of model \"%s\" is out of range", id, model),
					 errhint("Reload the tokenizer with pgllm tokenizer --truncate.")));
		max_id = Max(max_id, id);
		strmap_lookup(&ids, s, len, id);
		total_bytes += len;
	}
	t->vocab_size = max_id + 1;
	t->n_tokens = (int32) n_tokens;
	if (total_bytes > PG_UINT32_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("the tokens of model \"%s\" take more than 4 GB", model)));

	/* Raw bytes of every token, indexed by id. */
	old = MemoryContextSwitchTo(cxt);
	t->tok_off = palloc0_array(uint32, t->vocab_size + 1);
	t->tok_present = palloc0_array(bool, t->vocab_size);
	t->tok_bytes = MemoryContextAllocHuge(cxt, Max(total_bytes, 1));
	MemoryContextSwitchTo(old);
	{
		const char **str_of = palloc0_array(const char *, t->vocab_size);
		int		   *slen_of = palloc0_array(int, t->vocab_size);
		uint32		off = 0;

		for (int i = 0; i < ids.n; i++)
		{
			str_of[ids.values[i]] = ids.keys[i];
			slen_of[ids.values[i]] = ids.lens[i];
			t->tok_present[ids.values[i]] = true;
		}
		for (int32 id = 0; id < t->vocab_size; id++)
		{
			t->tok_off[id] = off;
			if (t->tok_present[id])
				off += token_string_to_bytes(str_of[id], slen_of[id], t->tok_bytes + off);
		}
		t->tok_off[t->vocab_size] = off;
	}
	for (int b = 0; b < 256; b++)
	{
		unsigned char buf[4];

		unicode_to_utf8(byte_to_cp[b], buf);
		t->byte_id[b] = strmap_lookup(&ids, (char *) buf, pg_utf_mblen(buf), -1);
	}
	t->eot_id = strmap_lookup(&ids, EOT_TOKEN, EOT_LEN, -1);

	/* Merges, by rank; their tokens and their concatenation must be in the vocabulary. */
	ret = SPI_execute_with_args(psprintf("SELECT rank, \"left\", \"right\" FROM %s WHERE model = $1 ORDER BY rank",
										 llm_table("llm_bpe_merges")),
								1, argtypes, values, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading llm_bpe_merges failed: %s", SPI_result_code_string(ret));
	n_merges = SPI_processed;
	t->n_merges = (int32) n_merges;
	merges_alloc(t, cxt, (int) n_merges);
	for (uint64 r = 0; r < n_merges; r++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int32		rank = DatumGetInt32(SPI_getbinval(tuple, desc, 1, &isnull));
		int			llen,
					rlen;
		char	   *left = datum_to_utf8(SPI_getbinval(tuple, desc, 2, &isnull), &llen);
		char	   *right = datum_to_utf8(SPI_getbinval(tuple, desc, 3, &isnull), &rlen);
		char	   *both = palloc(llen + rlen);
		int32		a = strmap_lookup(&ids, left, llen, -1);
		int32		b = strmap_lookup(&ids, right, rlen, -1);
		int32		c;

		memcpy(both, left, llen);
		memcpy(both + llen, right, rlen);
		c = strmap_lookup(&ids, both, llen + rlen, -1);
		if (a < 0 || b < 0 || c < 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("merge rank %d of model \"%s\" (\"%s\" \"%s\") uses a token that is not in its vocabulary",
							rank, model, pnstrdup(left, llen), pnstrdup(right, rlen)),
					 errhint("Reload the tokenizer with pgllm tokenizer --truncate.")));
		merge_put(t, a, b, rank, c);
		pfree(both);
		if ((r & 4095) == 0)
			CHECK_FOR_INTERRUPTS();
	}
	SPI_finish();

	/* The word cache. */
	t->word_slots = MemoryContextAllocZero(cxt, WORD_CACHE_MIN_SLOTS * sizeof(uint64));
	t->word_mask = WORD_CACHE_MIN_SLOTS - 1;
	t->arena_cap = 1 << 16;
	t->arena = MemoryContextAlloc(cxt, t->arena_cap * sizeof(uint32));

	MemoryContextSetParent(cxt, TopMemoryContext);
	return t;
}

/*
 * The version the tables are at: the model's row of llm_tokenizer_version (0 when it has none),
 * and the version table's OID, which changes when the extension is recreated and its sequence
 * starts again.
 */
static int64
tokenizer_version(const char *model, Oid *table_oid)
{
	static SPIPlanPtr plan = NULL;
	static char *plan_table = NULL;
	char	   *table = llm_table("llm_tokenizer_version");
	Datum		values[1] = {CStringGetTextDatum(model)};
	int64		version = 0;
	int			ret;

	SPI_connect();
	if (plan == NULL || strcmp(plan_table, table) != 0)
	{
		Oid			argtypes[1] = {TEXTOID};
		SPIPlanPtr	p = SPI_prepare(psprintf("SELECT (SELECT version FROM %s WHERE model = $1), %s::regclass::oid",
											 table, quote_literal_cstr(table)), 1, argtypes);

		if (p == NULL)
			elog(ERROR, "preparing the tokenizer version lookup failed: %s", SPI_result_code_string(SPI_result));
		if (plan != NULL)
			SPI_freeplan(plan);
		plan = NULL;
		if (plan_table != NULL)
			pfree(plan_table);
		plan_table = MemoryContextStrdup(TopMemoryContext, table);
		SPI_keepplan(p);
		plan = p;
	}
	ret = SPI_execute_plan(plan, values, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading llm_tokenizer_version failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		version = isnull ? 0 : DatumGetInt64(d);
		*table_oid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	}
	SPI_finish();
	return version;
}

/* The snapshot the version row is read under, or NULL when there is none to compare. */
static Snapshot
stampable_snapshot(void)
{
	Snapshot	snap;

	if (!ActiveSnapshotSet())
		return NULL;
	snap = GetActiveSnapshot();
	return (snap->snapshot_type == SNAPSHOT_MVCC && snap->subxcnt >= 0) ? snap : NULL;
}

static bool
stamp_matches(const BpeTokenizer *t, Snapshot snap)
{
	const SnapshotStamp *st = &t->stamp;

	return t->checked && snap != NULL &&
		st->lxid == MyProc->lxid && st->subxid == GetCurrentSubTransactionId() &&
		st->curcid == snap->curcid && st->xmin == snap->xmin && st->xmax == snap->xmax &&
		st->xcnt == snap->xcnt && st->subxcnt == snap->subxcnt &&
		st->suboverflowed == snap->suboverflowed && st->recovery == snap->takenDuringRecovery &&
		(snap->xcnt == 0 || memcmp(st->xids, snap->xip, snap->xcnt * sizeof(TransactionId)) == 0) &&
		(snap->subxcnt == 0 ||
		 memcmp(st->xids + snap->xcnt, snap->subxip, snap->subxcnt * sizeof(TransactionId)) == 0);
}

static void
stamp_set(BpeTokenizer *t, Snapshot snap)
{
	SnapshotStamp *st = &t->stamp;
	uint32		n;

	t->checked = false;
	if (snap == NULL)
		return;
	n = snap->xcnt + snap->subxcnt;
	if (n > st->xids_cap)
	{
		TransactionId *xids = MemoryContextAlloc(t->cxt, n * sizeof(TransactionId));

		if (st->xids != NULL)
			pfree(st->xids);
		st->xids = xids;
		st->xids_cap = n;
	}
	st->lxid = MyProc->lxid;
	st->subxid = GetCurrentSubTransactionId();
	st->curcid = snap->curcid;
	st->xmin = snap->xmin;
	st->xmax = snap->xmax;
	st->xcnt = snap->xcnt;
	st->subxcnt = snap->subxcnt;
	st->suboverflowed = snap->suboverflowed;
	st->recovery = snap->takenDuringRecovery;
	if (snap->xcnt > 0)
		memcpy(st->xids, snap->xip, snap->xcnt * sizeof(TransactionId));
	if (snap->subxcnt > 0)
		memcpy(st->xids + snap->xcnt, snap->subxip, snap->subxcnt * sizeof(TransactionId));
	t->checked = true;
}

/*
 * The cached tokenizer of a model, rebuilt when its tables changed. The version row is read once
 * per snapshot: calls for every row of one query (or of one engine call) cost no table read.
 */
static BpeTokenizer *
tokenizer_get(const char *model)
{
	int64		version;
	Oid			table_oid = InvalidOid;
	BpeTokenizer **link;
	BpeTokenizer *t;
	int			count = 0;
	Snapshot	snap = stampable_snapshot();

	llm_check_model_name(model);
	for (t = tokenizers; t != NULL; t = t->next)
	{
		if (strcmp(t->model, model) == 0)
		{
			if (stamp_matches(t, snap))
				return t;
			break;
		}
	}

	version = tokenizer_version(model, &table_oid);
	for (link = &tokenizers; *link != NULL; link = &(*link)->next)
	{
		t = *link;
		if (strcmp(t->model, model) != 0)
			continue;
		*link = t->next;
		if (t->version == version && t->table_oid == table_oid)
		{
			t->next = tokenizers;	/* most recently used first */
			tokenizers = t;
			stamp_set(t, snap);
			return t;
		}
		tokenizer_free(t);
		break;
	}

	t = tokenizer_build(model, version);
	t->table_oid = table_oid;
	stamp_set(t, snap);
	t->next = tokenizers;
	tokenizers = t;
	/* Keep a few models; drop the least recently used beyond that. */
	for (link = &tokenizers; *link != NULL; link = &(*link)->next)
	{
		if (++count > MAX_CACHED_TOKENIZERS)
		{
			BpeTokenizer *victim = *link;

			*link = NULL;
			while (victim != NULL)
			{
				BpeTokenizer *next = victim->next;

				tokenizer_free(victim);
				victim = next;
			}
			break;
		}
	}
	return t;
}

/* ---- pre-tokenisation ---------------------------------------------------------------------- */

static const uint8 ascii_class[128] = {
	/* \t \n \v \f \r are white space; letters and digits; everything else is "other" */
	0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3, 0, 0,
	0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
	3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
	2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0,
	0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
	1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
	0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
	1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
};

static inline int
uc_class(uint32 c)
{
	return (llm_uc_blocks[llm_uc_stage1[c >> 8]][(c & 255) >> 2] >> ((c & 3) * 2)) & 3;
}

/*
 * Class and byte length of the character at s[p] (p < n). Malformed UTF-8 (only possible through
 * the C interface) counts as one "other" byte, so that scanning never runs past the end.
 */
static inline int
class_at(const unsigned char *s, size_t n, size_t p, size_t *clen)
{
	unsigned char b = s[p];
	uint32		c;

	if (b < 0x80)
	{
		*clen = 1;
		return ascii_class[b];
	}
	if (b >= 0xC2 && b < 0xE0 && p + 1 < n && (s[p + 1] & 0xC0) == 0x80)
	{
		*clen = 2;
		c = ((b & 0x1F) << 6) | (s[p + 1] & 0x3F);
	}
	else if (b >= 0xE0 && b < 0xF0 && p + 2 < n && (s[p + 1] & 0xC0) == 0x80 && (s[p + 2] & 0xC0) == 0x80)
	{
		*clen = 3;
		c = ((b & 0x0F) << 12) | ((s[p + 1] & 0x3F) << 6) | (s[p + 2] & 0x3F);
	}
	else if (b >= 0xF0 && b < 0xF5 && p + 3 < n && (s[p + 1] & 0xC0) == 0x80 &&
			 (s[p + 2] & 0xC0) == 0x80 && (s[p + 3] & 0xC0) == 0x80)
	{
		*clen = 4;
		c = ((b & 0x07) << 18) | ((s[p + 1] & 0x3F) << 12) | ((s[p + 2] & 0x3F) << 6) | (s[p + 3] & 0x3F);
		if (c > 0x10FFFF)
			c = 0xFFFF;			/* not a character: "other" */
	}
	else
	{
		*clen = 1;
		return LLM_UC_OTHER;
	}
	return uc_class(c);
}

/*
 * End of the piece that starts at s[p], p < n: the first alternative of the GPT-2 pattern that
 * matches at p, as a backtracking regex engine picks it.
 */
static inline size_t
next_piece(const unsigned char *s, size_t n, size_t p)
{
	size_t		clen;
	int			cls = class_at(s, n, p, &clen);
	size_t		q,
				last;

	/* 's 't 're 've 'm 'll 'd (lowercase only) */
	if (s[p] == '\'' && p + 1 < n)
	{
		unsigned char d = s[p + 1];

		if (d == 's' || d == 't' || d == 'm' || d == 'd')
			return p + 2;
		if (p + 2 < n && ((d == 'r' && s[p + 2] == 'e') || (d == 'v' && s[p + 2] == 'e') ||
						  (d == 'l' && s[p + 2] == 'l')))
			return p + 3;
	}
	q = p + clen;
	/* An ASCII space joins the letters, numbers or other symbols that follow it. */
	if (s[p] == ' ' && q < n)
	{
		int			next = class_at(s, n, q, &clen);

		if (next != LLM_UC_SPACE)
		{
			cls = next;
			q += clen;
		}
	}
	if (cls != LLM_UC_SPACE)
	{
		while (q < n && class_at(s, n, q, &clen) == cls)
			q += clen;
		return q;
	}
	/* \s+(?!\S) leaves the last white-space character of a run to the word after it; \s+ otherwise. */
	last = p;
	while (q < n && class_at(s, n, q, &clen) == LLM_UC_SPACE)
	{
		last = q;
		q += clen;
	}
	return (q == n || last == p) ? q : last;
}

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
		if (!merge_find(t, sym[i], sym[i + 1], &rank[i], &merged[i]))
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
		if (best > 0 && !merge_find(t, sym[best - 1], sym[best], &rank[best - 1], &merged[best - 1]))
			rank[best - 1] = PG_INT32_MAX;
		if (best + 1 < m && !merge_find(t, sym[best], sym[best + 1], &rank[best], &merged[best]))
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
		if (i + 1 < m && merge_find(t, sym[i], sym[i + 1], &rank, &merged))
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
			!merge_find(t, sym[pos], sym[j], &rank, &merged) || rank != want)
			continue;			/* this pair no longer exists */
		sym[pos] = merged;
		sym[j] = -1;
		next[pos] = next[j];
		if (next[j] >= 0)
			prev[next[j]] = pos;
		if (prev[pos] >= 0 && merge_find(t, sym[prev[pos]], sym[pos], &rank, &merged))
			heap_push(heap, &heap_n, (uint64) rank << 32 | (uint32) prev[pos]);
		if (next[pos] >= 0 && merge_find(t, sym[pos], sym[next[pos]], &rank, &merged))
			heap_push(heap, &heap_n, (uint64) rank << 32 | (uint32) pos);
	}
	for (int i = 0; i >= 0; i = next[i])
		sym[out++] = sym[i];
	pfree(prev);
	pfree(next);
	pfree(heap);
	return out;
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
		uint64		hash = hash_bytes64((const unsigned char *) (t->arena + off + 1 + we->n_ids), we->key_len);
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

		hash = hash_bytes64(w, len);
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

	if (t->n_words >= WORD_CACHE_MAX_ENTRIES || t->arena_used > WORD_CACHE_ARENA_MAX / 2)
		word_cache_clear(t);
	while (p < len)
	{
		/* The segment up to the next <|endoftext|>, which is one token of its own. */
		const unsigned char *eot = NULL;
		size_t		end = len;

		if (t->eot_id >= 0)
		{
			eot = memmem(s + p, len - p, EOT_TOKEN, EOT_LEN);
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
			p = end + EOT_LEN;
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
	BpeTokenizer *t = tokenizer_get(model);
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
	BpeTokenizer *t = tokenizer_get(model);
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
	BpeTokenizer *t = tokenizer_get(model);
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
	return tokenizer_get(model)->eot_id;
}

int32
llm_bpe_vocab_size(const char *model)
{
	return tokenizer_get(model)->vocab_size;
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
				 errmsg("token ids must not be NULL")));
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
	BpeTokenizer *t = tokenizer_get(model);
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

/* ---- loaders: pg_llm_load_bpe_vocab, pg_llm_load_bpe_merges -------------------------------- */

static void
check_file_privilege(void)
{
	if (!has_privs_of_role(GetUserId(), ROLE_PG_READ_SERVER_FILES))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to read tokenizer files on the server"),
				 errdetail("Only superusers and roles with privileges of pg_read_server_files may load files the server reads."),
				 errhint("Use pgllm tokenizer, which sends the files from the client.")));
}

static int
line_of(const char *start, const char *at)
{
	int			line = 1;

	for (const char *p = start; p < at; p++)
		line += (*p == '\n');
	return line;
}

/* The whole file, NUL-terminated, after checking that it is UTF-8 (without NUL bytes). */
static char *
read_text_file(const char *path, const char *what, size_t *len_out)
{
	FILE	   *f = AllocateFile(path, PG_BINARY_R);
	struct stat st;
	char	   *buf;
	size_t		len;
	int			valid;

	if (f == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open %s file \"%s\": %m", what, path)));
	if (fstat(fileno(f), &st) != 0)
		ereport(ERROR, (errcode_for_file_access(), errmsg("could not stat file \"%s\": %m", path)));
	if (st.st_size >= (off_t) MaxAllocSize)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%s file \"%s\" is too large (%lld bytes)", what, path, (long long) st.st_size)));
	buf = palloc((size_t) st.st_size + 1);
	len = fread(buf, 1, (size_t) st.st_size, f);
	if (ferror(f) || len != (size_t) st.st_size)
		ereport(ERROR, (errcode_for_file_access(), errmsg("could not read file \"%s\": %m", path)));
	FreeFile(f);
	buf[len] = '\0';
	valid = pg_encoding_verifymbstr(PG_UTF8, buf, (int) len);
	if ((size_t) valid != len)
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("%s file \"%s\", line %d: not valid UTF-8 (or a NUL byte)",
						what, path, line_of(buf, buf + valid)),
				 errdetail("Nothing was loaded.")));
	*len_out = len;
	return buf;
}

/* Strings cannot hold a raw newline, so white space between tokens is where lines end. */
typedef struct JsonCursor
{
	const char *p;
	const char *end;
	const char *path;
	int			line;
} JsonCursor;

static void
vocab_error(const char *path, int line, const char *fmt,...) pg_attribute_printf(3, 4);

static void
vocab_error(const char *path, int line, const char *fmt,...)
{
	char		msg[1024];
	va_list		args;

	va_start(args, fmt);
	vsnprintf(msg, sizeof(msg), fmt, args);
	va_end(args);
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("vocabulary file \"%s\", line %d: %s", path, line, msg),
			 errdetail("Nothing was loaded."),
			 errhint("vocab.json must be one JSON object mapping each token to a distinct id.")));
}

static void
json_skip_ws(JsonCursor *c)
{
	while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
		c->line += (*c->p++ == '\n');
}

static int
hex4(JsonCursor *c)
{
	int			v = 0;

	if (c->end - c->p < 4)
		vocab_error(c->path, c->line, "truncated \\u escape");
	for (int i = 0; i < 4; i++)
	{
		char		h = *c->p++;

		v <<= 4;
		if (h >= '0' && h <= '9')
			v |= h - '0';
		else if (h >= 'a' && h <= 'f')
			v |= h - 'a' + 10;
		else if (h >= 'A' && h <= 'F')
			v |= h - 'A' + 10;
		else
			vocab_error(c->path, c->line, "bad \\u escape");
	}
	return v;
}

/* A JSON string at c->p (the opening quote), decoded into a palloc'd buffer. */
static char *
json_string(JsonCursor *c, int *len_out)
{
	StringInfoData buf;

	if (c->p >= c->end || *c->p != '"')
		vocab_error(c->path, c->line, "expected a token in double quotes");
	c->p++;
	initStringInfo(&buf);
	for (;;)
	{
		unsigned char ch;

		if (c->p >= c->end)
			vocab_error(c->path, c->line, "unterminated string");
		ch = (unsigned char) *c->p++;
		if (ch == '"')
			break;
		if (ch < 0x20)
			vocab_error(c->path, c->line, "control character in a string");
		if (ch != '\\')
		{
			appendStringInfoChar(&buf, (char) ch);
			continue;
		}
		if (c->p >= c->end)
			vocab_error(c->path, c->line, "unterminated string");
		ch = (unsigned char) *c->p++;
		switch (ch)
		{
			case '"':
			case '\\':
			case '/':
				appendStringInfoChar(&buf, (char) ch);
				break;
			case 'b':
				appendStringInfoChar(&buf, '\b');
				break;
			case 'f':
				appendStringInfoChar(&buf, '\f');
				break;
			case 'n':
				appendStringInfoChar(&buf, '\n');
				break;
			case 'r':
				appendStringInfoChar(&buf, '\r');
				break;
			case 't':
				appendStringInfoChar(&buf, '\t');
				break;
			case 'u':
				{
					pg_wchar	cp = hex4(c);
					unsigned char utf8[4];

					if (cp >= 0xD800 && cp <= 0xDBFF)
					{
						pg_wchar	lo;

						if (c->end - c->p < 2 || c->p[0] != '\\' || c->p[1] != 'u')
							vocab_error(c->path, c->line, "unpaired surrogate in a \\u escape");
						c->p += 2;
						lo = hex4(c);
						if (lo < 0xDC00 || lo > 0xDFFF)
							vocab_error(c->path, c->line, "unpaired surrogate in a \\u escape");
						cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
					}
					else if (cp >= 0xDC00 && cp <= 0xDFFF)
						vocab_error(c->path, c->line, "unpaired surrogate in a \\u escape");
					if (cp == 0)
						vocab_error(c->path, c->line, "a token contains \\u0000, which text cannot hold");
					unicode_to_utf8(cp, utf8);
					appendBinaryStringInfo(&buf, (char *) utf8, pg_utf_mblen(utf8));
					break;
				}
			default:
				vocab_error(c->path, c->line, "bad escape \\%c", ch);
		}
	}
	*len_out = buf.len;
	return buf.data;
}

/* Parses vocab.json into parallel arrays (tokens, their lengths, ids, lines); returns the count. */
static int
parse_vocab(const char *path, const char *data, size_t len, char ***tokens_out, int **lens_out,
			int32 **ids_out)
{
	JsonCursor	c = {data, data + len, path, 1};
	int			cap = 1024;
	int			n = 0;
	char	  **tokens = palloc_array(char *, cap);
	int		   *lens = palloc_array(int, cap);
	int32	   *ids = palloc_array(int32, cap);
	int		   *lines = palloc_array(int, cap);
	StrMap		seen;
	int32	   *line_of_id;
	int32		max_id = -1;

	json_skip_ws(&c);
	if (c.p >= c.end || *c.p != '{')
		vocab_error(path, c.line, "expected a JSON object ({)");
	c.p++;
	json_skip_ws(&c);
	if (c.p < c.end && *c.p == '}')
		vocab_error(path, c.line, "the vocabulary is empty");
	for (;;)
	{
		int64		v = 0;
		int			digits = 0;

		CHECK_FOR_INTERRUPTS();
		json_skip_ws(&c);
		if (n == cap)
		{
			cap *= 2;
			tokens = repalloc_array(tokens, char *, cap);
			lens = repalloc_array(lens, int, cap);
			ids = repalloc_array(ids, int32, cap);
			lines = repalloc_array(lines, int, cap);
		}
		lines[n] = c.line;
		tokens[n] = json_string(&c, &lens[n]);
		json_skip_ws(&c);
		if (c.p >= c.end || *c.p != ':')
			vocab_error(path, c.line, "expected : after a token");
		c.p++;
		json_skip_ws(&c);
		if (c.p < c.end && *c.p == '-')
			vocab_error(path, c.line, "token \"%s\" has a negative id", tokens[n]);
		while (c.p < c.end && *c.p >= '0' && *c.p <= '9')
		{
			if (v <= LLM_TOKEN_ID_MAX)
				v = v * 10 + (*c.p - '0');
			c.p++;
			digits++;
		}
		if (digits == 0 || (c.p < c.end && (*c.p == '.' || *c.p == 'e' || *c.p == 'E')))
			vocab_error(path, c.line, "token \"%s\" needs a non-negative integer id", tokens[n]);
		if (v > LLM_TOKEN_ID_MAX)
			vocab_error(path, c.line, "token \"%s\" has id past %d", tokens[n], LLM_TOKEN_ID_MAX);
		ids[n] = (int32) v;
		max_id = Max(max_id, ids[n]);
		n++;
		json_skip_ws(&c);
		if (c.p < c.end && *c.p == ',')
		{
			c.p++;
			continue;
		}
		if (c.p < c.end && *c.p == '}')
		{
			c.p++;
			break;
		}
		vocab_error(path, c.line, "expected , or } after an id");
	}
	json_skip_ws(&c);
	if (c.p != c.end)
		vocab_error(path, c.line, "unexpected text after the JSON object");

	/* Distinct tokens, distinct ids. */
	strmap_init(&seen, n);
	line_of_id = palloc0_array(int32, max_id + 1);
	for (int i = 0; i < n; i++)
	{
		int32		first = strmap_lookup(&seen, tokens[i], lens[i], i);

		if (first >= 0)
			vocab_error(path, lines[i], "token \"%s\" appears twice (first on line %d)", tokens[i], lines[first]);
		if (line_of_id[ids[i]] != 0)
			vocab_error(path, lines[i], "id %d is given to two tokens (the other on line %d)",
						ids[i], line_of_id[ids[i]]);
		line_of_id[ids[i]] = lines[i];
	}
	*tokens_out = tokens;
	*lens_out = lens;
	*ids_out = ids;
	return n;
}

static ArrayType *
text_array(char **strings, const int *lens, int n)
{
	Datum	   *d = palloc_array(Datum, Max(n, 1));

	for (int i = 0; i < n; i++)
	{
		char	   *s = pg_any_to_server(strings[i], lens[i], PG_UTF8);

		d[i] = PointerGetDatum(cstring_to_text_with_len(s, s == strings[i] ? lens[i] : (int) strlen(s)));
	}
	return construct_array(d, n, TEXTOID, -1, false, TYPALIGN_INT);
}

static void
spi_exec(const char *sql, int nargs, Oid *types, Datum *values, int expect)
{
	int			ret = SPI_execute_with_args(sql, nargs, types, values, NULL, false, 0);

	if (ret != expect)
		elog(ERROR, "%s failed: %s", sql, SPI_result_code_string(ret));
}

/*
 * Loads of one model's tokenizer queue behind each other (pgllm tokenizer takes the same lock),
 * so that two of them cannot interleave their deletes and inserts. Inside SPI.
 */
static void
lock_model_tokenizer(const char *model)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(model)};

	spi_exec("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pg_llm tokenizer'), pg_catalog.hashtext($1))",
			 1, types, values, SPI_OK_SELECT);
}

/* Without replace, a model that already has rows in the table is refused. Inside SPI. */
static void
refuse_existing(const char *table, const char *one, const char *many, const char *model, bool replace)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(model)};
	bool		isnull;
	int64		count;

	if (replace)
		return;
	spi_exec(psprintf("SELECT count(*) FROM %s WHERE model = $1", llm_table(table)), 1, types, values, SPI_OK_SELECT);
	count = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (count > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("model \"%s\" already has a tokenizer (" INT64_FORMAT " %s)",
						model, count, count == 1 ? one : many),
				 errhint("Pass replace => true to replace it, or use pgllm tokenizer --truncate.")));
}

PG_FUNCTION_INFO_V1(pg_llm_load_bpe_vocab);
Datum
pg_llm_load_bpe_vocab(PG_FUNCTION_ARGS)
{
	char	   *path = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	bool		replace = PG_GETARG_BOOL(2);
	size_t		len;
	char	   *data;
	char	  **tokens;
	int		   *lens;
	int32	   *ids;
	int			n;
	Oid			types[3] = {TEXTOID, INT4ARRAYOID, TEXTARRAYOID};
	Datum		values[3];

	check_file_privilege();
	llm_check_model_name(model);
	data = read_text_file(path, "vocabulary", &len);
	n = parse_vocab(path, data, len, &tokens, &lens, &ids);

	values[0] = CStringGetTextDatum(model);
	{
		Datum	   *d = palloc_array(Datum, n);

		for (int i = 0; i < n; i++)
			d[i] = Int32GetDatum(ids[i]);
		values[1] = PointerGetDatum(construct_array(d, n, INT4OID, sizeof(int32), true, TYPALIGN_INT));
	}
	values[2] = PointerGetDatum(text_array(tokens, lens, n));
	SPI_connect();
	lock_model_tokenizer(model);
	refuse_existing("llm_bpe_vocab", "token", "tokens", model, replace);
	refuse_existing("llm_bpe_merges", "merge", "merges", model, replace);
	/* A new vocabulary replaces the model's tokenizer: merges refer to the old one's tokens. */
	spi_exec(psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_bpe_merges")), 1, types, values, SPI_OK_DELETE);
	spi_exec(psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_bpe_vocab")), 1, types, values, SPI_OK_DELETE);
	spi_exec(psprintf("INSERT INTO %s (model, token_id, token) SELECT $1, i, t FROM unnest($2, $3) AS u(i, t)",
					  llm_table("llm_bpe_vocab")), 3, types, values, SPI_OK_INSERT);
	SPI_finish();
	PG_RETURN_INT64(n);
}

static void
merges_error(const char *path, int line, const char *msg, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("merges file \"%s\", line %d: %s", path, line, msg),
			 detail ? errdetail("%s Nothing was loaded.", detail) : errdetail("Nothing was loaded."),
			 errhint("merges.txt starts with a \"#version\" line, then one merge per line: two tokens separated by one space.")));
}

PG_FUNCTION_INFO_V1(pg_llm_load_bpe_merges);
Datum
pg_llm_load_bpe_merges(PG_FUNCTION_ARGS)
{
	char	   *path = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	bool		replace = PG_GETARG_BOOL(2);
	size_t		len;
	char	   *data;
	char	   *p;
	char	   *end;
	int			line = 1;
	int			cap = 1024;
	int			n = 0;
	char	  **lefts,
			  **rights;
	int		   *llens,
			   *rlens;
	int		   *lines;
	StrMap		vocab;
	BpeTokenizer pairs;
	Oid			types[3] = {TEXTOID, TEXTARRAYOID, TEXTARRAYOID};
	Datum		values[3];
	int			ret;

	check_file_privilege();
	llm_check_model_name(model);
	data = read_text_file(path, "merges", &len);
	end = data + len;

	/* The header, then "left right" per line; a final newline ends the last line. */
	p = memchr(data, '\n', len);
	if (strncmp(data, "#version", 8) != 0)
		merges_error(path, 1, "expected a \"#version\" header line", NULL);
	p = p ? p + 1 : end;
	lefts = palloc_array(char *, cap);
	rights = palloc_array(char *, cap);
	llens = palloc_array(int, cap);
	rlens = palloc_array(int, cap);
	lines = palloc_array(int, cap);
	while (p < end)
	{
		char	   *eol = memchr(p, '\n', end - p);
		char	   *stop = eol ? eol : end;
		char	   *space;

		line++;
		if (stop > p && stop[-1] == '\r')
			stop--;
		space = memchr(p, ' ', stop - p);
		if (space == NULL || space == p || space + 1 == stop || memchr(space + 1, ' ', stop - space - 1) != NULL)
			merges_error(path, line, "expected two tokens separated by one space", NULL);
		if (n == cap)
		{
			cap *= 2;
			lefts = repalloc_array(lefts, char *, cap);
			rights = repalloc_array(rights, char *, cap);
			llens = repalloc_array(llens, int, cap);
			rlens = repalloc_array(rlens, int, cap);
			lines = repalloc_array(lines, int, cap);
		}
		lefts[n] = p;
		llens[n] = space - p;
		rights[n] = space + 1;
		rlens[n] = stop - space - 1;
		lines[n] = line;
		n++;
		p = eol ? eol + 1 : end;
	}

	/* Every merge must join two tokens of the model's vocabulary into a third, once. */
	values[0] = CStringGetTextDatum(model);
	SPI_connect();
	lock_model_tokenizer(model);
	refuse_existing("llm_bpe_merges", "merge", "merges", model, replace);
	ret = SPI_execute_with_args(psprintf("SELECT token_id, token FROM %s WHERE model = $1", llm_table("llm_bpe_vocab")),
								1, types, values, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "reading llm_bpe_vocab failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" has no vocabulary to check the merges against", model),
				 errhint("Load vocab.json first with pg_llm_load_bpe_vocab, or use pgllm tokenizer.")));
	strmap_init(&vocab, (int) SPI_processed);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		int32		id = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));
		int			tlen;
		char	   *tok = datum_to_utf8(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &isnull), &tlen);

		strmap_lookup(&vocab, tok, tlen, id);
	}
	memset(&pairs, 0, sizeof(pairs));
	merges_alloc(&pairs, CurrentMemoryContext, n);
	for (int i = 0; i < n; i++)
	{
		int32		a = strmap_lookup(&vocab, lefts[i], llens[i], -1);
		int32		b = strmap_lookup(&vocab, rights[i], rlens[i], -1);
		char	   *both = palloc(llens[i] + rlens[i] + 1);
		int32		rank,
					c;

		memcpy(both, lefts[i], llens[i]);
		memcpy(both + llens[i], rights[i], rlens[i]);
		both[llens[i] + rlens[i]] = '\0';
		if (a < 0 || b < 0 || strmap_lookup(&vocab, both, llens[i] + rlens[i], -1) < 0)
		{
			const char *missing = a < 0 ? pnstrdup(lefts[i], llens[i]) : b < 0 ? pnstrdup(rights[i], rlens[i]) : both;

			merges_error(path, lines[i], psprintf("token \"%s\" is not in the vocabulary of model \"%s\"", missing, model),
						 "Each merge joins two tokens of vocab.json into a third one of vocab.json.");
		}
		if (merge_find(&pairs, a, b, &rank, &c))
			merges_error(path, lines[i], psprintf("the merge \"%s %s\" repeats line %d",
												  pnstrdup(lefts[i], llens[i]), pnstrdup(rights[i], rlens[i]), lines[rank]),
						 NULL);
		merge_put(&pairs, a, b, i, 0);
		pfree(both);
	}

	types[1] = TEXTARRAYOID;
	values[1] = PointerGetDatum(text_array(lefts, llens, n));
	values[2] = PointerGetDatum(text_array(rights, rlens, n));
	spi_exec(psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_bpe_merges")), 1, types, values, SPI_OK_DELETE);
	if (n > 0)
		spi_exec(psprintf("INSERT INTO %s (model, rank, \"left\", \"right\") "
						  "SELECT $1, r - 1, l, rt FROM unnest($2, $3) WITH ORDINALITY AS u(l, rt, r)",
						  llm_table("llm_bpe_merges")), 3, types, values, SPI_OK_INSERT);
	SPI_finish();
	PG_RETURN_INT64(n);
}
