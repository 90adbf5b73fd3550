/*
 * bpe_load.c: loading a tokenizer's files, vocab.json and merges.txt, into llm_bpe_vocab and
 * llm_bpe_merges: the one validator of those files.
 *
 * Two ways in, one loader: pg_llm_load_bpe_vocab/merges read files on the server (superusers and
 * pg_read_server_files only); pg_llm_load_bpe_vocab_bytes/merges_bytes take the files' bytes from
 * the client (pgllm tokenizer sends them), with the rights a tokenizer load needs on the tables.
 * Every rule is checked here, and a file that breaks one is refused with the line at fault and
 * nothing loaded:
 *   - both files are UTF-8 without NUL bytes;
 *   - vocab.json is one JSON object (PostgreSQL's own JSON parser reads it) mapping each token, a
 *     non-empty string, to a non-negative integer id up to LLM_TOKEN_ID_MAX; no token and no id
 *     twice (the parser itself would let a repeated key through);
 *   - merges.txt starts with a "#version" line, then one merge per line, two tokens separated by
 *     one space, each of them and their concatenation in the model's vocabulary, no merge twice.
 * The vocabulary goes first: merges are checked against what the tables hold.
 */
#include "pg_llm.h"
#include "bpe.h"
#include "bpe_tokenizer.h"
#include "model.h"
#include "strmap.h"

#include <sys/stat.h>

#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "common/jsonapi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#define VOCAB_HINT "vocab.json must be one JSON object mapping each token to a distinct id."
#define MERGES_HINT "merges.txt starts with a \"#version\" line, then one merge per line: two tokens separated by one space."

/* ---- reading the bytes ------------------------------------------------------------------------- */

static int
line_of(const char *start, const char *at)
{
	int			line = 1;

	for (const char *p = start; p < at; p++)
		line += (*p == '\n');
	return line;
}

/* ERROR unless data is UTF-8 without NUL bytes. */
static void
check_utf8(const char *data, size_t len, const char *what, const char *file)
{
	int			valid = pg_encoding_verifymbstr(PG_UTF8, data, (int) len);

	if ((size_t) valid != len)
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("%s file \"%s\", line %d: not valid UTF-8 (or a NUL byte)",
						what, file, line_of(data, data + valid)),
				 errdetail("Nothing was loaded.")));
}

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

/* A whole server file, NUL-terminated. */
static char *
read_server_file(const char *path, const char *what, size_t *len_out)
{
	FILE	   *f = AllocateFile(path, PG_BINARY_R);
	struct stat st;
	char	   *buf;
	size_t		len;

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
	*len_out = len;
	return buf;
}

/* A bytea's bytes, NUL-terminated (a copy: the parsers want a terminated, writable buffer). */
static char *
bytea_text(bytea *b, size_t *len_out)
{
	size_t		len = VARSIZE_ANY_EXHDR(b);
	char	   *buf = palloc(len + 1);

	memcpy(buf, VARDATA_ANY(b), len);
	buf[len] = '\0';
	*len_out = len;
	return buf;
}

/* ---- vocab.json -------------------------------------------------------------------------------- */

static void
vocab_error(const char *file, int line, const char *detail, const char *fmt,...) pg_attribute_printf(4, 5);

static void
vocab_error(const char *file, int line, const char *detail, const char *fmt,...)
{
	char		msg[1024];
	va_list		args;

	va_start(args, fmt);
	vsnprintf(msg, sizeof(msg), fmt, args);
	va_end(args);
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("vocabulary file \"%s\", line %d: %s", file, line, msg),
			 detail ? errdetail("%s Nothing was loaded.", detail) : errdetail("Nothing was loaded."),
			 errhint(VOCAB_HINT)));
}

/* The entries of vocab.json, in file order. */
typedef struct Vocab
{
	int			n,
				cap;
	char	  **tokens;			/* UTF-8, not NUL-free-checked: the parser refuses \u0000 */
	int		   *lens;
	int32	   *ids;
	int		   *lines;
} Vocab;

/* The parser's state: the entry being read (its token comes before its id). */
typedef struct VocabParse
{
	JsonLexContext *lex;
	const char *file;
	Vocab	   *vocab;
	char	   *token;			/* of the current entry */
	int			line;			/* of the current entry */
} VocabParse;

static void
bad_id(const VocabParse *p)
{
	vocab_error(p->file, p->line, NULL, "token \"%s\" needs a non-negative integer id", p->token);
}

/* An object or array where an id belongs (the document itself is an object: checked before). */
static LLM_JSON_ACTION
vocab_nested(void *state)
{
	bad_id((VocabParse *) state);
	LLM_JSON_ACTION_DONE;
}

static LLM_JSON_ACTION
vocab_object_start(void *state)
{
	VocabParse *p = state;

	if (p->lex->lex_level > 0)
		bad_id(p);
	LLM_JSON_ACTION_DONE;
}

/* A token: the lexer has read its value's first token, so lex->line_number is the entry's line. */
static LLM_JSON_ACTION
vocab_field_start(void *state, char *fname, bool isnull)
{
	VocabParse *p = state;

	p->token = fname;
	p->line = p->lex->line_number;
	if (fname[0] == '\0')
		vocab_error(p->file, p->line, NULL, "empty token");
	LLM_JSON_ACTION_DONE;
}

/* An id: a JSON number without sign, fraction or exponent, at most LLM_TOKEN_ID_MAX. */
static LLM_JSON_ACTION
vocab_scalar(void *state, char *token, JsonTokenType type)
{
	VocabParse *p = state;
	Vocab	   *v = p->vocab;
	int64		id = 0;

	if (type == JSON_TOKEN_NUMBER && token[0] == '-')
		vocab_error(p->file, p->line, NULL, "token \"%s\" has a negative id", p->token);
	if (type != JSON_TOKEN_NUMBER || strpbrk(token, ".eE") != NULL)
		bad_id(p);
	for (const char *c = token; *c; c++)
	{
		id = id * 10 + (*c - '0');
		if (id > LLM_TOKEN_ID_MAX)
			vocab_error(p->file, p->line, NULL, "token \"%s\" has id past %d", p->token, LLM_TOKEN_ID_MAX);
	}
	if (v->n == v->cap)
	{
		v->cap *= 2;
		v->tokens = repalloc_array(v->tokens, char *, v->cap);
		v->lens = repalloc_array(v->lens, int, v->cap);
		v->ids = repalloc_array(v->ids, int32, v->cap);
		v->lines = repalloc_array(v->lines, int, v->cap);
	}
	v->tokens[v->n] = p->token;
	v->lens[v->n] = strlen(p->token);
	v->ids[v->n] = (int32) id;
	v->lines[v->n] = p->line;
	v->n++;
	if ((v->n & 4095) == 0)
		CHECK_FOR_INTERRUPTS();
	LLM_JSON_ACTION_DONE;
}

/*
 * A parser error as a message: the syntax errors worded as Python's json module words them (what
 * pgllm tokenizer printed when it parsed the file itself), with the token found there.
 */
static char *
json_error_message(JsonParseErrorType error, JsonLexContext *lex)
{
	char	   *found = "";

	if (lex->token_start != NULL && lex->token_terminator > lex->token_start)
	{
		int			len = lex->token_terminator - lex->token_start;

		len = pg_encoding_mbcliplen(PG_UTF8, lex->token_start, len, 40);
		found = pnstrdup(lex->token_start, len);
	}
	switch (error)
	{
		case JSON_EXPECTED_COLON:
			return psprintf("Expecting ':' delimiter, found \"%s\"", found);
		case JSON_EXPECTED_OBJECT_NEXT:
			return psprintf("Expecting ',' delimiter or '}', found \"%s\"", found);
		case JSON_EXPECTED_ARRAY_NEXT:
			return psprintf("Expecting ',' delimiter or ']', found \"%s\"", found);
		case JSON_EXPECTED_STRING:
		case JSON_EXPECTED_OBJECT_FIRST:
			return psprintf("Expecting a token in double quotes, found \"%s\"", found);
		case JSON_EXPECTED_JSON:
		case JSON_EXPECTED_ARRAY_FIRST:
			return psprintf("Expecting value, found \"%s\"", found);
		case JSON_EXPECTED_END:
			return psprintf("unexpected text after the JSON object, \"%s\"", found);
		case JSON_EXPECTED_MORE:
			return "the file ends inside the JSON object";
		case JSON_INVALID_TOKEN:
			return psprintf("invalid token \"%s\"", found);
		case JSON_ESCAPING_INVALID:
			return psprintf("bad escape \\%s", found);
		case JSON_ESCAPING_REQUIRED:
			return "control character in a string";
		case JSON_UNICODE_ESCAPE_FORMAT:
			return "bad \\u escape";
		case JSON_UNICODE_CODE_POINT_ZERO:
			return "a token contains \\u0000, which text cannot hold";
		case JSON_UNICODE_HIGH_SURROGATE:
		case JSON_UNICODE_LOW_SURROGATE:
			return "unpaired surrogate in a \\u escape";
		default:
			return "not valid JSON";
	}
}

static int
hex4(const char *s, size_t n)
{
	int			v = 0;

	if (n < 4)
		return -1;
	for (int i = 0; i < 4; i++)
	{
		char		h = s[i];

		v <<= 4;
		if (h >= '0' && h <= '9')
			v |= h - '0';
		else if (h >= 'a' && h <= 'f')
			v |= h - 'a' + 10;
		else if (h >= 'A' && h <= 'F')
			v |= h - 'A' + 10;
		else
			return -1;
	}
	return v;
}

/*
 * In a database whose encoding is not UTF8, PostgreSQL's JSON parser converts \u escapes to that
 * encoding (and refuses those above U+007F in SQL_ASCII), while the file's own characters stay
 * UTF-8. Tokens are UTF-8 here until they are stored, so there escapes of non-ASCII characters are
 * first written out as their UTF-8 bytes. Everything else, malformed escapes included, is left to
 * the parser; no newline is added or removed, so lines still count.
 */
static char *
escapes_to_utf8(const char *data, size_t len, size_t *len_out)
{
	StringInfoData out;
	bool		in_string = false;

	initStringInfo(&out);
	for (size_t i = 0; i < len; i++)
	{
		char		c = data[i];
		int			cp,
					lo;
		unsigned char utf8[4];

		if (c == '"')
			in_string = !in_string;
		if (!in_string || c != '\\' || i + 1 >= len)
		{
			appendStringInfoChar(&out, c);
			continue;
		}
		if (data[i + 1] != 'u' || (cp = hex4(data + i + 2, len - i - 2)) < 0x80 ||
			(cp >= 0xDC00 && cp <= 0xDFFF))
		{
			appendBinaryStringInfo(&out, data + i, 2);	/* an escape the parser handles */
			i++;
			continue;
		}
		if (cp >= 0xD800 && cp <= 0xDBFF)
		{
			if (len - i < 12 || data[i + 6] != '\\' || data[i + 7] != 'u' ||
				(lo = hex4(data + i + 8, len - i - 8)) < 0xDC00 || lo > 0xDFFF)
			{
				appendBinaryStringInfo(&out, data + i, 2);	/* unpaired: the parser says so */
				i++;
				continue;
			}
			cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
			i += 6;
		}
		unicode_to_utf8(cp, utf8);
		appendBinaryStringInfo(&out, (char *) utf8, pg_utf_mblen(utf8));
		i += 5;
	}
	*len_out = out.len;
	return out.data;
}

/* vocab.json (UTF-8, NUL-terminated) into entries, every rule checked. */
static void
parse_vocab(const char *file, char *data, size_t len, Vocab *v)
{
	JsonSemAction sem = {0};
	VocabParse	p = {0};
	JsonParseErrorType error;
	StrMap		seen;
	int32		max_id = -1;
	int32	   *line_of_id;
	const char *c = data;

	while (c < data + len && (*c == ' ' || *c == '\t' || *c == '\n' || *c == '\r'))
		c++;
	if (c == data + len || *c != '{')
		vocab_error(file, line_of(data, c), NULL, "expected a JSON object ({)");
	if (GetDatabaseEncoding() != PG_UTF8)
		data = escapes_to_utf8(data, len, &len);

	v->n = 0;
	v->cap = 1024;
	v->tokens = palloc_array(char *, v->cap);
	v->lens = palloc_array(int, v->cap);
	v->ids = palloc_array(int32, v->cap);
	v->lines = palloc_array(int, v->cap);
	p.lex = llm_json_lexer(data, (int) len);
	p.file = file;
	p.vocab = v;
	sem.semstate = &p;
	sem.object_start = vocab_object_start;
	sem.array_start = vocab_nested;
	sem.object_field_start = vocab_field_start;
	sem.scalar = vocab_scalar;
	error = pg_parse_json(p.lex, &sem);
	if (error != JSON_SUCCESS)
		vocab_error(file, p.lex->line_number, json_errdetail(error, p.lex), "%s", json_error_message(error, p.lex));
	if (v->n == 0)
		vocab_error(file, 1, NULL, "the vocabulary is empty");

	/* Distinct tokens, distinct ids. */
	strmap_init(&seen, v->n);
	for (int i = 0; i < v->n; i++)
		max_id = Max(max_id, v->ids[i]);
	line_of_id = palloc0_array(int32, max_id + 1);
	for (int i = 0; i < v->n; i++)
	{
		int32		first = strmap_lookup(&seen, v->tokens[i], v->lens[i], i);

		if (first >= 0)
			vocab_error(file, v->lines[i], NULL, "token \"%s\" appears twice (first on line %d)",
						v->tokens[i], v->lines[first]);
		if (line_of_id[v->ids[i]] != 0)
			vocab_error(file, v->lines[i], NULL, "id %d is given to two tokens (the other on line %d)",
						v->ids[i], line_of_id[v->ids[i]]);
		line_of_id[v->ids[i]] = v->lines[i];
	}
	pfree(line_of_id);
}

/* ---- merges.txt -------------------------------------------------------------------------------- */

static void
merges_error(const char *file, int line, const char *msg, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
			 errmsg("merges file \"%s\", line %d: %s", file, line, msg),
			 detail ? errdetail("%s Nothing was loaded.", detail) : errdetail("Nothing was loaded."),
			 errhint(MERGES_HINT)));
}

/* The merges of merges.txt, in rank order: pointers into the file's text. */
typedef struct Merges
{
	int			n;
	char	  **lefts,
			  **rights;
	int		   *llens,
			   *rlens;
	int		   *lines;
} Merges;

/* The header, then "left right" per line; a final newline ends the last line. */
static void
parse_merges(const char *file, char *data, size_t len, Merges *m)
{
	char	   *end = data + len;
	char	   *p = memchr(data, '\n', len);
	int			line = 1;
	int			cap = 1024;

	if (strncmp(data, "#version", 8) != 0)
		merges_error(file, 1, "expected a \"#version\" header line", NULL);
	p = p ? p + 1 : end;
	m->n = 0;
	m->lefts = palloc_array(char *, cap);
	m->rights = palloc_array(char *, cap);
	m->llens = palloc_array(int, cap);
	m->rlens = palloc_array(int, cap);
	m->lines = palloc_array(int, cap);
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
			merges_error(file, line, "expected two tokens separated by one space", NULL);
		if (m->n == cap)
		{
			cap *= 2;
			m->lefts = repalloc_array(m->lefts, char *, cap);
			m->rights = repalloc_array(m->rights, char *, cap);
			m->llens = repalloc_array(m->llens, int, cap);
			m->rlens = repalloc_array(m->rlens, int, cap);
			m->lines = repalloc_array(m->lines, int, cap);
		}
		m->lefts[m->n] = p;
		m->llens[m->n] = space - p;
		m->rights[m->n] = space + 1;
		m->rlens[m->n] = stop - space - 1;
		m->lines[m->n] = line;
		m->n++;
		p = eol ? eol + 1 : end;
	}
}

/*
 * Every merge joins two tokens of the model's vocabulary (as llm_bpe_vocab holds it) into a
 * third, once. Inside SPI.
 */
static void
check_merges(const char *file, const char *model, const Merges *m)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(model)};
	uint64		n_tokens;
	StrMap		vocab;
	BpeMerges	pairs;

	n_tokens = llm_spi_run("reading llm_bpe_vocab",
						   psprintf("SELECT token_id, token FROM %s WHERE model = $1", llm_table("llm_bpe_vocab")),
						   1, types, values, false, 0, SPI_OK_SELECT);
	if (n_tokens == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" has no vocabulary to check the merges against", model),
				 errhint("Load vocab.json first with pg_llm_load_bpe_vocab, or use pgllm tokenizer.")));
	strmap_init(&vocab, (int) n_tokens);
	for (uint64 r = 0; r < n_tokens; r++)
	{
		bool		isnull;
		int32		id = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));
		int			tlen;
		char	   *tok = bpe_datum_to_utf8(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &isnull), &tlen);

		strmap_lookup(&vocab, tok, tlen, id);
	}
	bpe_merges_init(&pairs, CurrentMemoryContext, m->n);
	for (int i = 0; i < m->n; i++)
	{
		int32		a = strmap_lookup(&vocab, m->lefts[i], m->llens[i], -1);
		int32		b = strmap_lookup(&vocab, m->rights[i], m->rlens[i], -1);
		char	   *both = palloc(m->llens[i] + m->rlens[i] + 1);
		int32		rank,
					c;

		memcpy(both, m->lefts[i], m->llens[i]);
		memcpy(both + m->llens[i], m->rights[i], m->rlens[i]);
		both[m->llens[i] + m->rlens[i]] = '\0';
		if (a < 0 || b < 0 || strmap_lookup(&vocab, both, m->llens[i] + m->rlens[i], -1) < 0)
		{
			const char *missing = a < 0 ? pnstrdup(m->lefts[i], m->llens[i]) :
				b < 0 ? pnstrdup(m->rights[i], m->rlens[i]) : both;

			merges_error(file, m->lines[i],
						 psprintf("token \"%s\" is not in the vocabulary of model \"%s\"", missing, model),
						 "Each merge joins two tokens of vocab.json into a third one of vocab.json.");
		}
		if (bpe_merges_find(&pairs, a, b, &rank, &c))
			merges_error(file, m->lines[i],
						 psprintf("the merge \"%s %s\" repeats line %d", pnstrdup(m->lefts[i], m->llens[i]),
								  pnstrdup(m->rights[i], m->rlens[i]), m->lines[rank]),
						 NULL);
		bpe_merges_put(&pairs, a, b, i, 0);
		pfree(both);
		if ((i & 4095) == 0)
			CHECK_FOR_INTERRUPTS();
	}
}

/* ---- writing the tables ------------------------------------------------------------------------ */

/* UTF-8 strings as a text[] in the database's encoding. */
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
 * Loads of one model's tokenizer queue behind each other, so that two of them cannot interleave
 * their deletes and inserts; then, without replace, a model that has a tokenizer (tokens, or
 * merges when only the merges are loaded) is refused. Inside SPI.
 */
static void
lock_and_check(const char *model, bool replace, bool merges_only)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1] = {CStringGetTextDatum(model)};
	bool		isnull;
	int64		n_tokens,
				n_merges;

	llm_spi_run("locking the model's tokenizer",
				"SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('pg_llm tokenizer'), pg_catalog.hashtext($1))",
				1, types, values, false, 0, SPI_OK_SELECT);
	if (replace)
		return;
	llm_spi_run("counting the model's tokenizer",
				psprintf("SELECT (SELECT count(*) FROM %s WHERE model = $1), (SELECT count(*) FROM %s WHERE model = $1)",
						 llm_table("llm_bpe_vocab"), llm_table("llm_bpe_merges")),
				1, types, values, true, 1, SPI_OK_SELECT);
	n_tokens = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	n_merges = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	if (n_merges > 0 || (!merges_only && n_tokens > 0))
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("model \"%s\" already has a tokenizer (" INT64_FORMAT " token%s, " INT64_FORMAT " merge%s)",
						model, n_tokens, n_tokens == 1 ? "" : "s", n_merges, n_merges == 1 ? "" : "s"),
				 errhint("Pass replace => true to replace it, or use pgllm tokenizer --truncate.")));
}

int64
llm_bpe_load_vocab(const char *file, char *data, size_t len, const char *model, bool replace)
{
	Vocab		v;
	Oid			types[3] = {TEXTOID, INT4ARRAYOID, TEXTARRAYOID};
	Datum		values[3];
	Datum	   *ids;

	check_utf8(data, len, "vocabulary", file);
	parse_vocab(file, data, len, &v);

	values[0] = CStringGetTextDatum(model);
	ids = palloc_array(Datum, v.n);
	for (int i = 0; i < v.n; i++)
		ids[i] = Int32GetDatum(v.ids[i]);
	values[1] = PointerGetDatum(construct_array(ids, v.n, INT4OID, sizeof(int32), true, TYPALIGN_INT));
	values[2] = PointerGetDatum(text_array(v.tokens, v.lens, v.n));
	SPI_connect();
	lock_and_check(model, replace, false);
	/* A new vocabulary replaces the model's tokenizer: merges refer to the old one's tokens. */
	llm_spi_run("deleting the model's merges", psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_bpe_merges")),
				1, types, values, false, 0, SPI_OK_DELETE);
	llm_spi_run("deleting the model's vocabulary", psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_bpe_vocab")),
				1, types, values, false, 0, SPI_OK_DELETE);
	llm_spi_run("writing llm_bpe_vocab",
				psprintf("INSERT INTO %s (model, token_id, token) SELECT $1, i, t FROM unnest($2, $3) AS u(i, t)",
						 llm_table("llm_bpe_vocab")), 3, types, values, false, 0, SPI_OK_INSERT);
	SPI_finish();
	return v.n;
}

int64
llm_bpe_load_merges(const char *file, char *data, size_t len, const char *model, bool replace)
{
	Merges		m;
	Oid			types[3] = {TEXTOID, TEXTARRAYOID, TEXTARRAYOID};
	Datum		values[3];

	check_utf8(data, len, "merges", file);
	parse_merges(file, data, len, &m);

	values[0] = CStringGetTextDatum(model);
	SPI_connect();
	lock_and_check(model, replace, true);
	check_merges(file, model, &m);
	values[1] = PointerGetDatum(text_array(m.lefts, m.llens, m.n));
	values[2] = PointerGetDatum(text_array(m.rights, m.rlens, m.n));
	llm_spi_run("deleting the model's merges", psprintf("DELETE FROM %s WHERE model = $1", llm_table("llm_bpe_merges")),
				1, types, values, false, 0, SPI_OK_DELETE);
	if (m.n > 0)
		llm_spi_run("writing llm_bpe_merges",
					psprintf("INSERT INTO %s (model, rank, \"left\", \"right\") "
							 "SELECT $1, r - 1, l, rt FROM unnest($2, $3) WITH ORDINALITY AS u(l, rt, r)",
							 llm_table("llm_bpe_merges")), 3, types, values, false, 0, SPI_OK_INSERT);
	SPI_finish();
	return m.n;
}

/* ---- SQL --------------------------------------------------------------------------------------- */

typedef int64 (*LoadFn) (const char *file, char *data, size_t len, const char *model, bool replace);

/*
 * The four functions: (path text, model, replace) read a server file (superusers and
 * pg_read_server_files only); (data bytea, model, replace, file) take the bytes, named file.
 * They return the rows loaded.
 */
static Datum
load_sql(FunctionCallInfo fcinfo, LoadFn load, const char *what, bool server_file)
{
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	char	   *file;
	char	   *data;
	size_t		len;

	if (server_file)
		check_file_privilege();
	llm_check_model_name(model);
	if (server_file)
	{
		file = text_to_cstring(PG_GETARG_TEXT_PP(0));
		data = read_server_file(file, what, &len);
	}
	else
	{
		file = text_to_cstring(PG_GETARG_TEXT_PP(3));
		data = bytea_text(PG_GETARG_BYTEA_PP(0), &len);
	}
	PG_RETURN_INT64(load(file, data, len, model, PG_GETARG_BOOL(2)));
}

PG_FUNCTION_INFO_V1(pg_llm_load_bpe_vocab);
Datum
pg_llm_load_bpe_vocab(PG_FUNCTION_ARGS)
{
	return load_sql(fcinfo, llm_bpe_load_vocab, "vocabulary", true);
}

PG_FUNCTION_INFO_V1(pg_llm_load_bpe_merges);
Datum
pg_llm_load_bpe_merges(PG_FUNCTION_ARGS)
{
	return load_sql(fcinfo, llm_bpe_load_merges, "merges", true);
}

PG_FUNCTION_INFO_V1(pg_llm_load_bpe_vocab_bytes);
Datum
pg_llm_load_bpe_vocab_bytes(PG_FUNCTION_ARGS)
{
	return load_sql(fcinfo, llm_bpe_load_vocab, "vocabulary", false);
}

PG_FUNCTION_INFO_V1(pg_llm_load_bpe_merges_bytes);
Datum
pg_llm_load_bpe_merges_bytes(PG_FUNCTION_ARGS)
{
	return load_sql(fcinfo, llm_bpe_load_merges, "merges", false);
}
