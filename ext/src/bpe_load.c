/*
 * bpe_load.c: pg_llm_load_bpe_vocab and pg_llm_load_bpe_merges, loading vocab.json and
 * merges.txt from files the server reads into llm_bpe_vocab and llm_bpe_merges.
 *
 * A malformed file is refused with the line at fault, and nothing is loaded. The vocabulary goes
 * first: merges are checked against what the tables hold.
 */
#include "pg_llm.h"
#include "bpe_tokenizer.h"
#include "model.h"
#include "strmap.h"

#include <sys/stat.h>

#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

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

/*
 * Loads of one model's tokenizer queue behind each other (pgllm tokenizer takes the same lock),
 * so that two of them cannot interleave their deletes and inserts. Inside SPI.
 */
static void
lock_model_tokenizer(const char *model)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(model)};

	llm_spi_run("locking the model's tokenizer",
				"SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pg_llm tokenizer'), pg_catalog.hashtext($1))",
				1, types, values, false, 0, SPI_OK_SELECT);
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
	llm_spi_run("counting the model's tokenizer", psprintf("SELECT count(*) FROM %s WHERE model = $1", llm_table(table)),
				1, types, values, true, 1, SPI_OK_SELECT);
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
	llm_spi_run("deleting the model's merges", psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_bpe_merges")),
				1, types, values, false, 0, SPI_OK_DELETE);
	llm_spi_run("deleting the model's vocabulary", psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_bpe_vocab")),
				1, types, values, false, 0, SPI_OK_DELETE);
	llm_spi_run("writing llm_bpe_vocab",
				psprintf("INSERT INTO %s (model, token_id, token) SELECT $1, i, t FROM unnest($2, $3) AS u(i, t)",
						 llm_table("llm_bpe_vocab")), 3, types, values, false, 0, SPI_OK_INSERT);
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
	BpeMerges	pairs;
	Oid			types[3] = {TEXTOID, TEXTARRAYOID, TEXTARRAYOID};
	Datum		values[3];

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
	if (llm_spi_run("reading llm_bpe_vocab",
					psprintf("SELECT token_id, token FROM %s WHERE model = $1", llm_table("llm_bpe_vocab")),
					1, types, values, false, 0, SPI_OK_SELECT) == 0)
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
		char	   *tok = bpe_datum_to_utf8(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &isnull), &tlen);

		strmap_lookup(&vocab, tok, tlen, id);
	}
	bpe_merges_init(&pairs, CurrentMemoryContext, n);
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
		if (bpe_merges_find(&pairs, a, b, &rank, &c))
			merges_error(path, lines[i], psprintf("the merge \"%s %s\" repeats line %d",
												  pnstrdup(lefts[i], llens[i]), pnstrdup(rights[i], rlens[i]), lines[rank]),
						 NULL);
		bpe_merges_put(&pairs, a, b, i, 0);
		pfree(both);
	}

	types[1] = TEXTARRAYOID;
	values[1] = PointerGetDatum(text_array(lefts, llens, n));
	values[2] = PointerGetDatum(text_array(rights, rlens, n));
	llm_spi_run("deleting the model's merges", psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_bpe_merges")),
				1, types, values, false, 0, SPI_OK_DELETE);
	if (n > 0)
		llm_spi_run("writing llm_bpe_merges",
					psprintf("INSERT INTO %s (model, rank, \"left\", \"right\") "
							 "SELECT $1, r - 1, l, rt FROM unnest($2, $3) WITH ORDINALITY AS u(l, rt, r)",
							 llm_table("llm_bpe_merges")), 3, types, values, false, 0, SPI_OK_INSERT);
	SPI_finish();
	PG_RETURN_INT64(n);
}
