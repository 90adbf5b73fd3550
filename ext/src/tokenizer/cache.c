/*
 * bpe_tokenizer.c: building a model's tokenizer from llm_bpe_vocab / llm_bpe_merges, and the
 * per-backend cache of tokenizers (see bpe_tokenizer.h).
 *
 * A tokenizer is built from the tables once per backend and kept in its own memory context
 * under TopMemoryContext. Each call reads the model's row of llm_tokenizer_version (one index
 * lookup, at most once per snapshot); statement triggers on the two tables set it from a
 * sequence, so a changed, reloaded or rolled-back tokenizer never matches a stale cache.
 */
#include "base/base.h"
#include "tokenizer/cache.h"
#include "model/model.h"
#include "tokenizer/strmap.h"

#include "catalog/pg_type.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

/* Tokenizers kept per backend; the least recently used beyond that are dropped. */
#define MAX_CACHED_TOKENIZERS 4

static BpeTokenizer *tokenizers = NULL;	/* most recently used first */

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

/* ---- the merge table ------------------------------------------------------------------------ */

void
bpe_merges_put(BpeMerges *m, int32 a, int32 b, int32 rank, int32 new_id)
{
	uint64		key = ((uint64) (uint32) a << 32) | (uint32) b;
	uint32		h = (uint32) ((key * 0x9E3779B97F4A7C15ULL) >> m->shift);

	while (m->slots[h].key != BPE_MERGE_EMPTY && m->slots[h].key != key)
		h = (h + 1) & m->mask;
	m->slots[h].key = key;
	m->slots[h].rank = rank;
	m->slots[h].new_id = new_id;
}

void
bpe_merges_init(BpeMerges *m, MemoryContext cxt, int n_merges)
{
	uint32		size = 16;
	int			bits = 4;

	while (size < (uint32) n_merges * 2)
	{
		size <<= 1;
		bits++;
	}
	m->slots = MemoryContextAllocHuge(cxt, size * sizeof(BpeMergeEntry));
	for (uint32 i = 0; i < size; i++)
		m->slots[i].key = BPE_MERGE_EMPTY;
	m->mask = size - 1;
	m->shift = 64 - bits;
}

/* ---- building a tokenizer from the tables ---------------------------------------------------- */

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

char *
bpe_datum_to_utf8(Datum d, int *len)
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

	init_byte_map();
	strlcpy(t->model, model, sizeof(t->model));
	t->cxt = cxt;
	t->version = version;
	t->eot_id = -1;

	SPI_connect();
	n_tokens = llm_spi_run("reading llm_bpe_vocab",
						   psprintf("SELECT token_id, token FROM %s WHERE model = $1", llm_table("llm_bpe_vocab")),
						   1, argtypes, values, true, 0, SPI_OK_SELECT);
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
		char	   *s = bpe_datum_to_utf8(SPI_getbinval(tuple, SPI_tuptable->tupdesc, 2, &isnull), &len);

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
	t->eot_id = strmap_lookup(&ids, BPE_EOT_TOKEN, BPE_EOT_LEN, -1);

	/* Merges, by rank; their tokens and their concatenation must be in the vocabulary. */
	n_merges = llm_spi_run("reading llm_bpe_merges",
						   psprintf("SELECT rank, \"left\", \"right\" FROM %s WHERE model = $1 ORDER BY rank",
									llm_table("llm_bpe_merges")),
						   1, argtypes, values, true, 0, SPI_OK_SELECT);
	t->n_merges = (int32) n_merges;
	bpe_merges_init(&t->merges, cxt, (int) n_merges);
	for (uint64 r = 0; r < n_merges; r++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[r];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int32		rank = DatumGetInt32(SPI_getbinval(tuple, desc, 1, &isnull));
		int			llen,
					rlen;
		char	   *left = bpe_datum_to_utf8(SPI_getbinval(tuple, desc, 2, &isnull), &llen);
		char	   *right = bpe_datum_to_utf8(SPI_getbinval(tuple, desc, 3, &isnull), &rlen);
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
		bpe_merges_put(&t->merges, a, b, rank, c);
		pfree(both);
		if ((r & 4095) == 0)
			CHECK_FOR_INTERRUPTS();
	}
	SPI_finish();

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

	SPI_connect();
	if (plan == NULL || strcmp(plan_table, table) != 0)
	{
		Oid			argtypes[1] = {TEXTOID};
		SPIPlanPtr	p = llm_spi_prepare("preparing the tokenizer version lookup",
										psprintf("SELECT (SELECT version FROM %s WHERE model = $1), %s::regclass::oid",
												 table, quote_literal_cstr(table)), 1, argtypes);

		if (plan != NULL)
			SPI_freeplan(plan);
		plan = NULL;
		if (plan_table != NULL)
			pfree(plan_table);
		plan_table = MemoryContextStrdup(TopMemoryContext, table);
		SPI_keepplan(p);
		plan = p;
	}
	if (llm_spi_run_plan("reading llm_tokenizer_version", plan, values, true, 1, SPI_OK_SELECT) == 1)
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
	const BpeSnapshotStamp *st = &t->stamp;

	return t->checked && snap != NULL &&
		st->lxid == LLM_MY_LXID && st->subxid == GetCurrentSubTransactionId() &&
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
	BpeSnapshotStamp *st = &t->stamp;
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
	st->lxid = LLM_MY_LXID;
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
 * The version row is read once per snapshot: calls for every row of one query (or of one engine
 * call) cost no table read.
 */
BpeTokenizer *
bpe_tokenizer_get(const char *model)
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
			if (stamp_matches(t, snap) && t->user == GetUserId())
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
		if (t->version == version && t->table_oid == table_oid && t->user == GetUserId())
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
	t->user = GetUserId();
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
