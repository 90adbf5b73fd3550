/*
 * npz.c: the checkpoint file format (see npz.h), imported into llm_param and exported from it.
 *
 * Import streams: the input (a server file, a bytea, or a file staged over the connection) is
 * inflated piece by piece and each tensor is read straight into the bytea that is inserted, so
 * memory stays at one tensor however large the file is. Every length, header and shape is checked
 * against the architecture before anything is allocated, and everything is written in the
 * caller's transaction, so any ERROR leaves no trace.
 *
 * Export writes the same format, the format and configuration records first, as gzip members of
 * stored blocks made in parallel (float32 weights barely compress, and stored blocks import fastest).
 */
#include "pg_llm.h"
#include "bpe.h"
#include "model.h"
#include "checkpoint.h"
#include "npz.h"

#include <math.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/wait_event.h"

#define NPZ_FILE_BUFFER (1 << 20)

/* ---- privileges ------------------------------------------------------------------------------- */

static void
check_server_file_privilege(bool write)
{
	if (superuser() || has_privs_of_role(GetUserId(), write ? ROLE_PG_WRITE_SERVER_FILES : ROLE_PG_READ_SERVER_FILES))
		return;
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied to %s files on the server", write ? "write" : "read"),
			 errdetail("Only superusers and members of %s may.", write ? "pg_write_server_files" : "pg_read_server_files"),
			 write ? errhint("Use pgllm export, which writes the file on the client.")
			 : errhint("Use pgllm import, which sends the file over the connection, or pg_llm_import_npz_bytes.")));
}

/* ---- compressed input: a server file, one bytea, or the staged temporary file ---------------- */

typedef struct NpzInput NpzInput;
struct NpzInput
{
	/* The next piece of compressed input, valid until the next call; false at the end. */
	bool		(*next) (NpzInput *in, const uint8 **data, size_t *len);
	const char *label;			/* for messages */
	FILE	   *file;
	uint8	   *buffer;
	bytea	   *bytes;
	File		staged;
	off_t		offset;
};

static bool
file_next(NpzInput *in, const uint8 **data, size_t *len)
{
	size_t		n = fread(in->buffer, 1, NPZ_FILE_BUFFER, in->file);

	if (n == 0 && ferror(in->file))
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read file \"%s\": %m", in->label)));
	*data = in->buffer;
	*len = n;
	return n > 0;
}

static bool
bytes_next(NpzInput *in, const uint8 **data, size_t *len)
{
	if (in->bytes == NULL)
		return false;
	*data = (const uint8 *) VARDATA_ANY(in->bytes);
	*len = VARSIZE_ANY_EXHDR(in->bytes);
	in->bytes = NULL;
	return true;
}

/* The staged temporary file (see pg_llm_import_npz_stage), read from the start. */
static bool
staged_next(NpzInput *in, const uint8 **data, size_t *len)
{
	int			n = FileRead(in->staged, (char *) in->buffer, NPZ_FILE_BUFFER, in->offset, WAIT_EVENT_BUFFILE_READ);

	if (n < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read the staged checkpoint file: %m")));
	in->offset += n;
	*data = in->buffer;
	*len = n;
	return n > 0;
}

/* ---- the decompressed stream -------------------------------------------------------------------- */

typedef struct NpzReader
{
	z_stream	zs;
	NpzInput   *in;
	bool		in_done;		/* no more compressed input */
	bool		member_end;		/* the current gzip member is complete (and its CRC checked) */
	uint64		compressed;		/* compressed bytes received */
	uint64		offset;			/* decompressed bytes consumed */
	const char *record;			/* the record being read, for messages; NULL between records */
} NpzReader;

/* zlib allocates through palloc, so that an ERROR frees its state with the memory context. */
static voidpf
npz_zalloc(voidpf opaque, uInt items, uInt size)
{
	return palloc_extended((Size) items * size, MCXT_ALLOC_NO_OOM);
}

static void
npz_zfree(voidpf opaque, voidpf address)
{
	pfree(address);
}

static char *
where(NpzReader *r)
{
	return r->record ? psprintf("in record \"%s\"", r->record)
		: psprintf("at byte %llu of the decompressed data", (unsigned long long) r->offset);
}

/*
 * The first bytes of the input say what it is: a gzip stream, or something else that a user may
 * well take for a checkpoint (NumPy's .npz files are zip archives).
 */
static void
check_magic(const char *label, const uint8 *data, size_t len)
{
	if (len >= 4 && memcmp(data, "PK\003\004", 4) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("%s is a NumPy .npz archive (a zip file), not a pg_llm checkpoint file", label),
				 errdetail("pg_llm reads a gzip stream of named .npy records, as pgllm convert and pgllm export write it."),
				 errhint("Convert it on the client: pgllm convert FILE.npz --output OTHER.npz (it reads NumPy archives of a GPT-2 state dict), then import OTHER.npz.")));
	if (len >= 2 && (data[0] != 0x1f || data[1] != 0x8b))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("%s is not a pg_llm checkpoint file", label),
				 errdetail("A checkpoint file is a gzip stream; this one starts with the bytes %02x %02x, not 1f 8b.", data[0], data[1]),
				 errhint("pgllm convert writes checkpoint files from Hugging Face checkpoints.")));
}

static void
npz_truncated(NpzReader *r)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATA_CORRUPTED),
			 errmsg("%s is truncated", r->in->label),
			 r->compressed == 0 ? errdetail("It is empty.")
			 : errdetail("The data ends %s, after %llu compressed bytes.", where(r), (unsigned long long) r->compressed)));
}

/*
 * Read n decompressed bytes into dst; returns fewer only at the clean end of the stream (every
 * gzip member complete and checked, no input left).
 */
static size_t
npz_read(NpzReader *r, void *dst, size_t n)
{
	r->zs.next_out = dst;
	r->zs.avail_out = n;		/* n < 1 GB: fits uInt */
	while (r->zs.avail_out > 0)
	{
		int			ret;

		if (r->zs.avail_in == 0 && !r->in_done)
		{
			const uint8 *data;
			size_t		len;

			if (r->in->next(r->in, &data, &len))
			{
				if (r->compressed == 0)
					check_magic(r->in->label, data, len);
				r->zs.next_in = (Bytef *) data;
				r->zs.avail_in = len;
				r->compressed += len;
			}
			else
				r->in_done = true;
			continue;
		}
		if (r->member_end)
		{
			if (r->zs.avail_in == 0)
				break;			/* the clean end */
			if (inflateReset(&r->zs) != Z_OK)
				elog(ERROR, "inflateReset failed");
			r->member_end = false;
		}
		if (r->zs.avail_in == 0)
			npz_truncated(r);
		ret = inflate(&r->zs, Z_NO_FLUSH);
		if (ret == Z_STREAM_END)
			r->member_end = true;
		else if (ret == Z_MEM_ERROR)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		else if (ret != Z_OK && ret != Z_BUF_ERROR)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("%s is not valid gzip data: %s", r->in->label, r->zs.msg ? r->zs.msg : "corrupt stream"),
					 errdetail("The error is %s, at compressed byte %llu.", where(r),
							   (unsigned long long) (r->compressed - r->zs.avail_in))));
		CHECK_FOR_INTERRUPTS();
	}
	r->offset += n - r->zs.avail_out;
	return n - r->zs.avail_out;
}

static void
npz_read_exact(NpzReader *r, void *dst, size_t n)
{
	if (npz_read(r, dst, n) != n)
		npz_truncated(r);
}

/* ---- .npy headers -------------------------------------------------------------------------------- */

typedef struct NpyHeader
{
	char		descr[16];
	bool		fortran_order;
	int			ndim;
	int64		shape[NPZ_MAX_DIMS];
} NpyHeader;

static void
skip_space(const char **p)
{
	while (**p == ' ')
		(*p)++;
}

/* A Python string literal in single or double quotes, without escapes; NULL if malformed. */
static char *
parse_string(const char **p, char *out, size_t size)
{
	char		quote = **p;
	size_t		len = 0;

	if (quote != '\'' && quote != '"')
		return NULL;
	for ((*p)++; **p != quote; (*p)++)
	{
		if (**p == '\0' || **p == '\\' || len + 1 >= size)
			return NULL;
		out[len++] = **p;
	}
	(*p)++;
	out[len] = '\0';
	return out;
}

/*
 * The header is a Python dict literal with exactly the keys 'descr', 'fortran_order' and
 * 'shape', e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (768, 2304), }, padded with
 * spaces and ended by a newline. Returns NULL when it parses, else what is wrong.
 */
static const char *
parse_npy_header(const char *text, NpyHeader *h)
{
	const char *p = text;
	bool		have_descr = false,
				have_order = false,
				have_shape = false;

	skip_space(&p);
	if (*p++ != '{')
		return "the header is not a dictionary";
	for (;;)
	{
		char		key[32];

		skip_space(&p);
		if (*p == '}')
			break;
		if (!parse_string(&p, key, sizeof(key)))
			return "the header has a malformed key";
		skip_space(&p);
		if (*p++ != ':')
			return "the header has a key without a value";
		skip_space(&p);
		if (strcmp(key, "descr") == 0 && !have_descr)
		{
			if (!parse_string(&p, h->descr, sizeof(h->descr)))
				return "the header's 'descr' is not a simple type string";
			have_descr = true;
		}
		else if (strcmp(key, "fortran_order") == 0 && !have_order)
		{
			if (strncmp(p, "False", 5) == 0)
				h->fortran_order = false, p += 5;
			else if (strncmp(p, "True", 4) == 0)
				h->fortran_order = true, p += 4;
			else
				return "the header's 'fortran_order' is not True or False";
			have_order = true;
		}
		else if (strcmp(key, "shape") == 0 && !have_shape)
		{
			h->ndim = 0;
			if (*p++ != '(')
				return "the header's 'shape' is not a tuple";
			for (;;)
			{
				int64		v = 0;

				skip_space(&p);
				if (*p == ')')
					break;
				if (*p < '0' || *p > '9')
					return "the header's 'shape' is not a tuple of integers";
				for (; *p >= '0' && *p <= '9'; p++)
				{
					v = v * 10 + (*p - '0');
					if (v > PG_INT32_MAX)
						return "the header's 'shape' has a dimension that is too large";
				}
				if (h->ndim == NPZ_MAX_DIMS)
					return "the header's 'shape' has too many dimensions";
				h->shape[h->ndim++] = v;
				skip_space(&p);
				if (*p == ',')
					p++;
				else if (*p != ')')
					return "the header's 'shape' is not a tuple of integers";
			}
			p++;
			have_shape = true;
		}
		else
			return "the header has an unknown or repeated key";
		skip_space(&p);
		if (*p == ',')
			p++;
		else if (*p != '}')
			return "the header's entries are not separated by commas";
	}
	p++;
	skip_space(&p);
	if (*p == '\n')
		p++;
	if (*p != '\0')
		return "the header has text after its dictionary";
	if (!have_descr || !have_order || !have_shape)
		return "the header lacks one of 'descr', 'fortran_order' and 'shape'";
	return NULL;
}

static char *
shape_string(const int64 *shape, int ndim)
{
	StringInfoData s;

	initStringInfo(&s);
	appendStringInfoChar(&s, '(');
	for (int i = 0; i < ndim; i++)
		appendStringInfo(&s, i ? ", %lld" : "%lld", (long long) shape[i]);
	appendStringInfoString(&s, ndim == 1 ? ",)" : ")");
	return s.data;
}

/*
 * The next record's name and array header; false at the clean end of the stream. On return
 * r->record names the record, and the reader is at the start of its array data.
 */
static bool
read_record_header(NpzReader *r, NpyHeader *h)
{
	uint8		prefix[10];
	uint32		len;
	char	   *name;
	char	   *header;
	const char *bad;
	size_t		got;

	r->record = NULL;
	got = npz_read(r, prefix, 2);
	if (got == 0)
		return false;
	if (got < 2)
		npz_truncated(r);
	len = prefix[0] | (prefix[1] << 8);
	if (len == 0 || len > NPZ_NAME_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("%s has a record name of %u bytes", r->in->label, len),
				 errdetail("The record starts at byte %llu of the decompressed data; names have 1 to %d bytes.",
						   (unsigned long long) (r->offset - 2), NPZ_NAME_MAX)));
	name = palloc(len + 1);
	npz_read_exact(r, name, len);
	name[len] = '\0';
	if (strlen(name) != len || !pg_verify_mbstr(PG_UTF8, name, len, true))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("%s has a record name that is not valid UTF-8", r->in->label),
				 errdetail("The record starts at byte %llu of the decompressed data.",
						   (unsigned long long) (r->offset - 2 - len))));
	r->record = name;

	npz_read_exact(r, prefix, 10);
	if (memcmp(prefix, "\x93NUMPY", 6) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("record \"%s\" is not a .npy array", name),
				 errdetail("It does not start with the .npy magic string.")));
	if ((prefix[6] != 1 && prefix[6] != 2) || prefix[7] != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("record \"%s\" has .npy format version %d.%d", name, prefix[6], prefix[7]),
				 errhint("Versions 1.0 and 2.0 are supported.")));
	len = prefix[8] | (prefix[9] << 8);
	if (prefix[6] == 2)
	{
		uint8		more[2];

		npz_read_exact(r, more, 2);
		len |= ((uint32) more[0] << 16) | ((uint32) more[1] << 24);
	}
	if (len > NPZ_HEADER_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("record \"%s\" has a .npy header of %u bytes", name, len),
				 errdetail("At most %d bytes are accepted.", NPZ_HEADER_MAX)));
	header = palloc(len + 1);
	npz_read_exact(r, header, len);
	header[len] = '\0';
	if (strlen(header) != len)
		bad = "the header contains a NUL byte";
	else
		bad = parse_npy_header(header, h);
	if (bad)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("record \"%s\" has an invalid .npy header: %s", name, bad)));
	pfree(header);
	return true;
}

/* The format record: one int64, a version this reader knows. */
static void
read_format_record(NpzReader *r, const NpyHeader *h)
{
	int64		version;

	if (strcmp(h->descr, "<i8") != 0 || h->fortran_order || h->ndim != 1 || h->shape[0] != 1)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("the format record \"%s\" must be one integer ('<i8')", NPZ_FORMAT_NAME),
				 errdetail("It has dtype '%s' and shape %s.", h->descr, shape_string(h->shape, h->ndim))));
	npz_read_exact(r, &version, sizeof(version));
	if (version > NPZ_FORMAT_VERSION)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s is a checkpoint file of format %lld, newer than this pg_llm reads", r->in->label, (long long) version),
				 errdetail("pg_llm %s reads formats up to %d.", PG_LLM_VERSION, NPZ_FORMAT_VERSION),
				 errhint("Install a newer pg_llm (pgllm install from a newer pgllm).")));
	if (version < 2)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("%s has an invalid format version %lld", r->in->label, (long long) version),
				 errdetail("Files with a format record are of format 2 or later.")));
}

/* The configuration record: 5 integers, int64 or int32 little-endian. */
static void
read_config_record(NpzReader *r, const NpyHeader *h, const char *model, LlmConfig *cfg)
{
	int64		v[5];
	bool		is64 = strcmp(h->descr, "<i8") == 0;

	if ((!is64 && strcmp(h->descr, "<i4") != 0) || h->fortran_order || h->ndim != 1 || h->shape[0] != 5)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("the configuration record \"%s\" must be 5 integers ('<i8' or '<i4')", NPZ_CONFIG_NAME),
				 errdetail("It has dtype '%s' and shape %s.", h->descr, shape_string(h->shape, h->ndim))));
	if (is64)
		npz_read_exact(r, v, sizeof(v));
	else
	{
		int32		v32[5];

		npz_read_exact(r, v32, sizeof(v32));
		for (int i = 0; i < 5; i++)
			v[i] = v32[i];
	}
	memset(cfg, 0, sizeof(*cfg));
	strlcpy(cfg->model, model, sizeof(cfg->model));
	for (int i = 0; i < 5; i++)
		if (v[i] < 1 || v[i] > PG_INT32_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("the configuration record has an invalid value %lld", (long long) v[i]),
					 errdetail("It holds [n_layer, n_head, d_model, n_positions, vocab].")));
	cfg->n_layer = (int) v[0];
	cfg->n_head = (int) v[1];
	cfg->d_model = (int) v[2];
	cfg->n_positions = (int) v[3];
	cfg->vocab = (int) v[4];
}

/* Index of the first value that is NaN or infinite (all exponent bits set), or n. */
LLM_SIMD
static size_t
first_nonfinite(const float *x, size_t n)
{
	const uint32 *u = (const uint32 *) x;

	for (size_t start = 0; start < n; start += 4096)
	{
		size_t		end = Min(start + 4096, n);
		uint32		bad = 0;

		for (size_t i = start; i < end; i++)
			bad |= ((u[i] & 0x7f800000u) == 0x7f800000u);
		if (bad)
			for (size_t i = start; i < end; i++)
				if ((u[i] & 0x7f800000u) == 0x7f800000u)
					return i;
	}
	return n;
}

/* ---- import ------------------------------------------------------------------------------------ */

/* Read every record from `in` into llm_param for `model`; the caller is connected to SPI. */
static int
npz_import(NpzInput *in, const char *model, bool replace)
{
	NpzReader	r;
	NpyHeader	h;
	LlmWeightWriter w;
	bool		begun = false;
	int			records = 0;
	int			ret;
	char	   *tokenizer[2] = {NULL, NULL};	/* vocab.json, merges.txt */
	size_t		tokenizer_len[2] = {0, 0};

	llm_check_model_name(model);
	memset(&r, 0, sizeof(r));
	r.in = in;
	r.zs.zalloc = npz_zalloc;
	r.zs.zfree = npz_zfree;
	/* 16 + MAX_WBITS: gzip only, with its CRC-32 and length checked at the end of each member */
	ret = inflateInit2(&r.zs, 16 + MAX_WBITS);
	if (ret != Z_OK)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("could not start decompression: %s", zError(ret))));

	while (read_record_header(&r, &h))
	{
		const char *name = r.record;
		LlmTensorInfo info;
		int			index;
		int64		want[2];
		bytea	   *data;
		size_t		bad;

		CHECK_FOR_INTERRUPTS();
		if (strcmp(name, NPZ_FORMAT_NAME) == 0)
		{
			if (records++ > 0)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("the format record \"%s\" must be the first record", NPZ_FORMAT_NAME)));
			read_format_record(&r, &h);
			continue;
		}
		records++;
		if (strcmp(name, NPZ_CONFIG_NAME) == 0)
		{
			LlmConfig	arch;

			if (begun)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("the configuration record \"%s\" must come before the tensors", NPZ_CONFIG_NAME)));
			read_config_record(&r, &h, model, &arch);
			llm_weights_begin(&w, model, &arch, replace);
			begun = true;
			continue;
		}
		if (strcmp(name, NPZ_VOCAB_NAME) == 0 || strcmp(name, NPZ_MERGES_NAME) == 0)
		{
			int			k = strcmp(name, NPZ_VOCAB_NAME) == 0 ? 0 : 1;

			if (strcmp(h.descr, "|u1") != 0 || h.ndim != 1 || h.shape[0] < 1 || h.shape[0] > MaxAllocSize - 1 ||
				tokenizer[k] != NULL)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("the tokenizer record \"%s\" must be one array of bytes ('|u1'), once", name),
						 errdetail("It has dtype '%s' and shape %s.", h.descr, shape_string(h.shape, h.ndim))));
			tokenizer_len[k] = (size_t) h.shape[0];
			tokenizer[k] = palloc(tokenizer_len[k] + 1);
			npz_read_exact(&r, tokenizer[k], tokenizer_len[k]);
			tokenizer[k][tokenizer_len[k]] = '\0';
			continue;
		}
		if (!begun)
			llm_weights_begin(&w, model, NULL, replace);
		begun = true;

		index = llm_tensor_find(&w.cfg, &w.layout, name, &info);
		if (index < 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("unknown tensor \"%s\"", name),
					 errdetail("Model \"%s\" is a GPT-2 with n_layer=%d; its tensors are named wte, wpe, h.{0..%d}.*, ln_f.*.",
							   model, w.cfg.n_layer, w.cfg.n_layer - 1)));
		if (strcmp(h.descr, "<f4") != 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("tensor \"%s\" has dtype '%s', expected '<f4' (float32, little-endian)", name, h.descr),
					 errhint("pgllm convert writes float32.")));
		if (h.fortran_order)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("tensor \"%s\" is in Fortran order, expected C order", name)));
		want[0] = info.shape[0];
		want[1] = info.ndim == 2 ? info.shape[1] : 0;
		if (h.ndim != info.ndim || h.shape[0] != want[0] || (info.ndim == 2 && h.shape[1] != want[1]))
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("tensor \"%s\" has shape %s, expected %s", name, shape_string(h.shape, h.ndim),
							shape_string(want, info.ndim)),
					 errdetail("Model \"%s\" has %s.", model, llm_describe_architecture(&w.cfg))));

		data = llm_weights_buffer(&w, index);
		npz_read_exact(&r, VARDATA(data), info.numel * sizeof(float));
		bad = first_nonfinite((const float *) VARDATA(data), info.numel);
		if (bad < info.numel)
		{
			float		v = ((const float *) VARDATA(data))[bad];

			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("tensor \"%s\" contains %s at index %zu", name, isnan(v) ? "NaN" : "an infinite value", bad)));
		}
		llm_weights_put(&w, index, data);
	}
	r.record = NULL;
	if (!begun)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("%s contains no tensors", in->label)));
	llm_weights_finish(&w);
	inflateEnd(&r.zs);
	if ((tokenizer[0] == NULL) != (tokenizer[1] == NULL))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("%s has a tokenizer record \"%s\" without \"%s\"", in->label,
						tokenizer[0] ? NPZ_VOCAB_NAME : NPZ_MERGES_NAME, tokenizer[0] ? NPZ_MERGES_NAME : NPZ_VOCAB_NAME)));
	if (tokenizer[0] != NULL)
	{
		/* the weights' own tokenizer replaces whatever the model had */
		(void) llm_bpe_load_vocab(NPZ_VOCAB_NAME, tokenizer[0], tokenizer_len[0], model, true);
		(void) llm_bpe_load_merges(NPZ_MERGES_NAME, tokenizer[1], tokenizer_len[1], model, true);
	}
	return w.n_written;
}

PG_FUNCTION_INFO_V1(pg_llm_import_npz);

/* pg_llm_import_npz(path, model, replace) -> tensors: a file on the server. */
Datum
pg_llm_import_npz(PG_FUNCTION_ARGS)
{
	char	   *path = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	bool		replace = PG_GETARG_BOOL(2);
	NpzInput	in = {.next = file_next, .label = path};
	struct stat st;
	int			n;

	check_server_file_privilege(false);
	llm_check_model_name(model);
	in.file = AllocateFile(path, PG_BINARY_R);
	if (in.file == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open file \"%s\" for reading: %m", path)));
	if (fstat(fileno(in.file), &st) == 0 && S_ISDIR(st.st_mode))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is a directory", path)));
	in.buffer = palloc(NPZ_FILE_BUFFER);
	SPI_connect();
	n = npz_import(&in, model, replace);
	SPI_finish();
	FreeFile(in.file);
	PG_RETURN_INT32(n);
}

PG_FUNCTION_INFO_V1(pg_llm_import_npz_bytes);

/* pg_llm_import_npz_bytes(data, model, replace) -> tensors: the file's bytes themselves. */
Datum
pg_llm_import_npz_bytes(PG_FUNCTION_ARGS)
{
	NpzInput	in = {.next = bytes_next, .label = "the checkpoint data"};
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	bool		replace = PG_GETARG_BOOL(2);
	int			n;

	in.bytes = PG_GETARG_BYTEA_PP(0);
	SPI_connect();
	n = npz_import(&in, model, replace);
	SPI_finish();
	PG_RETURN_INT32(n);
}

/*
 * Staging: a file sent over the connection in pieces, for clients whose files the server cannot
 * read. pg_llm_import_npz_stage(piece) appends to a temporary file of the transaction (no WAL,
 * no TOAST, no size limit but temp_file_limit); pg_llm_import_npz_staged(model) imports it and
 * deletes it. Whatever is left is deleted when the transaction ends.
 */
static File staged_file = -1;
static off_t staged_size = 0;

static void
staging_end(void)
{
	if (staged_file >= 0)
		FileClose(staged_file);
	staged_file = -1;
	staged_size = 0;
}

static void
staging_xact_callback(XactEvent event, void *arg)
{
	/* before commit: a temporary file still open at commit is reported as a leak */
	if (event == XACT_EVENT_PRE_COMMIT || event == XACT_EVENT_PARALLEL_PRE_COMMIT ||
		event == XACT_EVENT_PRE_PREPARE || event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		staging_end();
}

PG_FUNCTION_INFO_V1(pg_llm_import_npz_stage);

/* pg_llm_import_npz_stage(piece bytea) -> bytes staged so far in this transaction. */
Datum
pg_llm_import_npz_stage(PG_FUNCTION_ARGS)
{
	bytea	   *piece = PG_GETARG_BYTEA_PP(0);
	static bool registered = false;

	if (!registered)
	{
		RegisterXactCallback(staging_xact_callback, NULL);
		registered = true;
	}
	if (staged_file < 0)
	{
		/* owned by the top transaction, so that a subtransaction's end does not close it */
		ResourceOwner owner = CurrentResourceOwner;

		CurrentResourceOwner = TopTransactionResourceOwner;
		staged_file = OpenTemporaryFile(false);
		CurrentResourceOwner = owner;
		staged_size = 0;
	}
	if (FileWrite(staged_file, VARDATA_ANY(piece), VARSIZE_ANY_EXHDR(piece), staged_size,
				  WAIT_EVENT_BUFFILE_WRITE) != (int) VARSIZE_ANY_EXHDR(piece))
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not write the staged checkpoint file: %m")));
	staged_size += VARSIZE_ANY_EXHDR(piece);
	PG_RETURN_INT64((int64) staged_size);
}

PG_FUNCTION_INFO_V1(pg_llm_import_npz_staged);

/* pg_llm_import_npz_staged(model, replace) -> tensors: imports what was staged, then deletes it. */
Datum
pg_llm_import_npz_staged(PG_FUNCTION_ARGS)
{
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(0));
	bool		replace = PG_GETARG_BOOL(1);
	NpzInput	in = {.next = staged_next, .label = "the staged checkpoint data"};
	int			n;

	if (staged_file < 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("nothing was staged in this transaction"),
				 errhint("Send the file with pg_llm_import_npz_stage(piece) first, in the same transaction.")));
	in.staged = staged_file;
	in.buffer = palloc(NPZ_FILE_BUFFER);
	SPI_connect();
	n = npz_import(&in, model, replace);
	SPI_finish();
	staging_end();
	PG_RETURN_INT32(n);
}

/* ---- export ------------------------------------------------------------------------------------- */

typedef struct GzipBlocks
{
	const uint8 *data;
	size_t		len;
	size_t		block;			/* bytes per member */
	size_t		bound;			/* capacity of each output buffer */
	uint8	  **out;			/* (n_blocks) buffers of `bound` bytes */
	size_t	   *out_len;
	int		   *status;			/* zlib status per block */
} GzipBlocks;

/*
 * Blocks [start, end) as one gzip member each. Runs on worker threads: zlib with its default
 * malloc allocator, nothing of PostgreSQL. The blocks are stored, not compressed: float32
 * weights shrink by about 7% at best, and stored blocks import about twice as fast.
 */
static void
gzip_blocks_task(void *arg, size_t start, size_t end)
{
	GzipBlocks *g = arg;

	for (size_t b = start; b < end; b++)
	{
		z_stream	zs;
		size_t		lo = b * g->block;
		size_t		n = Min(g->block, g->len - lo);

		memset(&zs, 0, sizeof(zs));
		g->status[b] = deflateInit2(&zs, 0, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
		if (g->status[b] != Z_OK)
			continue;
		zs.next_in = (Bytef *) g->data + lo;
		zs.avail_in = n;
		zs.next_out = g->out[b];
		zs.avail_out = g->bound;
		g->status[b] = deflate(&zs, Z_FINISH);
		g->out_len[b] = g->bound - zs.avail_out;
		deflateEnd(&zs);
	}
}

typedef struct NpzWriter
{
	FILE	   *file;
	const char *path;
	uint64		written;
} NpzWriter;

/* Append `len` bytes as gzip members, compressed in parallel blocks. */
static void
npz_write(NpzWriter *w, const void *data, size_t len)
{
	GzipBlocks	g;
	size_t		n_blocks;
	z_stream	probe;

	if (len == 0)
		return;
	g.data = data;
	g.len = len;
	g.block = NPZ_GZIP_BLOCK;
	n_blocks = (len + g.block - 1) / g.block;
	memset(&probe, 0, sizeof(probe));
	if (deflateInit2(&probe, 0, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("could not start compression")));
	g.bound = deflateBound(&probe, Min(len, g.block));
	deflateEnd(&probe);
	g.out = palloc(n_blocks * sizeof(uint8 *));
	for (size_t b = 0; b < n_blocks; b++)
		g.out[b] = palloc(g.bound);
	g.out_len = palloc0(n_blocks * sizeof(size_t));
	g.status = palloc0(n_blocks * sizeof(int));
	llm_parallel_for(n_blocks, gzip_blocks_task, &g);
	for (size_t b = 0; b < n_blocks; b++)
	{
		if (g.status[b] != Z_STREAM_END)
			ereport(ERROR,
					(errcode(g.status[b] == Z_MEM_ERROR ? ERRCODE_OUT_OF_MEMORY : ERRCODE_INTERNAL_ERROR),
					 errmsg("compressing for \"%s\" failed: %s", w->path, zError(g.status[b]))));
		if (fwrite(g.out[b], 1, g.out_len[b], w->file) != g.out_len[b])
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not write file \"%s\": %m", w->path)));
		w->written += g.out_len[b];
		pfree(g.out[b]);
	}
	pfree(g.out);
	pfree(g.out_len);
	pfree(g.status);
}

/* A record's name and .npy v1.0 header (padded to a multiple of 64 bytes, as numpy does). */
static void
npz_write_record_header(NpzWriter *w, const char *name, const char *descr, const int *shape, int ndim)
{
	StringInfoData s;
	StringInfoData dict;
	size_t		name_len = strlen(name);
	size_t		header_len;
	uint8		len_bytes[2];

	initStringInfo(&dict);
	appendStringInfo(&dict, "{'descr': '%s', 'fortran_order': False, 'shape': (", descr);
	for (int i = 0; i < ndim; i++)
		appendStringInfo(&dict, i ? ", %d" : "%d", shape[i]);
	appendStringInfoString(&dict, ndim == 1 ? ",), }" : "), }");
	header_len = dict.len + 1;	/* newline */
	while ((10 + header_len) % 64 != 0)
		header_len++;

	initStringInfo(&s);
	len_bytes[0] = name_len & 0xff, len_bytes[1] = name_len >> 8;
	appendBinaryStringInfo(&s, (char *) len_bytes, 2);
	appendBinaryStringInfo(&s, name, name_len);
	appendBinaryStringInfo(&s, "\x93NUMPY\x01\x00", 8);
	len_bytes[0] = header_len & 0xff, len_bytes[1] = header_len >> 8;
	appendBinaryStringInfo(&s, (char *) len_bytes, 2);
	appendBinaryStringInfo(&s, dict.data, dict.len);
	while ((size_t) s.len < 2 + name_len + 10 + header_len - 1)
		appendStringInfoChar(&s, ' ');
	appendStringInfoChar(&s, '\n');
	npz_write(w, s.data, s.len);
	pfree(s.data);
	pfree(dict.data);
}

PG_FUNCTION_INFO_V1(pg_llm_export_npz);

/*
 * pg_llm_export_npz(path, model) -> bytes written: the format and configuration records, then every tensor
 * in state-dict order. Written to a temporary file beside `path` and renamed at the end, so
 * that `path` is either the complete file or untouched.
 */
Datum
pg_llm_export_npz(PG_FUNCTION_ARGS)
{
	char	   *path = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(1));
	char	   *tmp = psprintf("%s.tmp.%d", path, MyProcPid);
	NpzWriter	w = {.path = path};
	LlmConfig	cfg;
	LlmLayout	layout;
	SPIPlanPtr	plan;
	Oid			argtypes[2] = {TEXTOID, TEXTOID};

	check_server_file_privilege(true);
	llm_config_load(model, &cfg);
	llm_layout_init(&cfg, &layout);

	w.file = AllocateFile(tmp, PG_BINARY_W);
	if (w.file == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create file \"%s\": %m", tmp)));
	PG_TRY();
	{
		int64		format = NPZ_FORMAT_VERSION;
		int64		config[5] = {cfg.n_layer, cfg.n_head, cfg.d_model, cfg.n_positions, cfg.vocab};
		int			one = 1,
					five = 5;

		npz_write_record_header(&w, NPZ_FORMAT_NAME, "<i8", &one, 1);
		npz_write(&w, &format, sizeof(format));
		npz_write_record_header(&w, NPZ_CONFIG_NAME, "<i8", &five, 1);
		npz_write(&w, config, sizeof(config));

		SPI_connect();
		plan = SPI_prepare(psprintf("SELECT data FROM %s WHERE model = $1 AND name = $2", llm_table("llm_param")),
						   2, argtypes);
		if (plan == NULL)
			elog(ERROR, "preparing the llm_param query failed: %s", SPI_result_code_string(SPI_result));
		for (int index = 0; index < layout.num_tensors; index++)
		{
			LlmTensorInfo info;
			Datum		values[2];
			Datum		datum;
			bytea	   *data;
			bool		isnull;
			int			ret;

			CHECK_FOR_INTERRUPTS();
			llm_tensor_info(&cfg, &layout, index, &info);
			values[0] = CStringGetTextDatum(model);
			values[1] = CStringGetTextDatum(info.name);
			ret = SPI_execute_plan(plan, values, NULL, true, 1);
			if (ret != SPI_OK_SELECT)
				elog(ERROR, "reading llm_param failed: %s", SPI_result_code_string(ret));
			if (SPI_processed == 0)
				ereport(ERROR,
						(errcode(ERRCODE_NO_DATA_FOUND),
						 errmsg("model \"%s\" has no weights for tensor \"%s\"", model, info.name),
						 errhint("Load weights with pgllm import (or pg_llm_import_npz), or create them with pgllm init.")));
			datum = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
			data = DatumGetByteaPP(datum);	/* detoasted: a copy */
			if (VARSIZE_ANY_EXHDR(data) != info.numel * sizeof(float))
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("tensor \"%s\" has %zu bytes in llm_param, expected %zu", info.name,
								(size_t) VARSIZE_ANY_EXHDR(data), info.numel * sizeof(float))));
			npz_write_record_header(&w, info.name, "<f4", info.shape, info.ndim);
			npz_write(&w, VARDATA_ANY(data), info.numel * sizeof(float));
			if ((Pointer) data != DatumGetPointer(datum))
				pfree(data);
			SPI_freetuptable(SPI_tuptable);
		}
		SPI_finish();
		if (fflush(w.file) != 0 || pg_fsync(fileno(w.file)) != 0)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not write file \"%s\": %m", tmp)));
		if (FreeFile(w.file) != 0)
		{
			w.file = NULL;
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not close file \"%s\": %m", tmp)));
		}
		w.file = NULL;
		if (durable_rename(tmp, path, ERROR) != 0)
			elog(ERROR, "could not rename \"%s\" to \"%s\"", tmp, path);
	}
	PG_CATCH();
	{
		unlink(tmp);			/* the open file itself is closed by the abort */
		PG_RE_THROW();
	}
	PG_END_TRY();
	PG_RETURN_INT64((int64) w.written);
}
