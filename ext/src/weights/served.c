/*
 * served.c: the copies of a model's weights that inference reads (see served.h), one format of
 * the weight cache per precision.
 *
 * A served copy is one section: the packed head (wte^T), then each layer's packed c_attn weights,
 * all layers' attn.c_proj, c_fc and mlp.c_proj, then the float32 vectors (wpe, LayerNorm
 * weights, biases: model.h's kinds in block order, without the matrices). The tied embedding reads
 * its rows back from the packed head (llm_weights_column), so there is no second copy of wte.
 *
 * Why packed for the prompt too: the packed kernels run T rows in blocks of 96 as fast as or
 * faster than sgemm on the float32 block (bench.kernels at T = 128; docs/notes/decode.md), so one
 * copy serves both passes and a reduced precision needs no float32 copy beside it.
 *
 * int4 packs the linear layers in 4 bits (Q4) but the head in 6 bits (Q6): the tied head is also
 * the embedding, a third of GPT-2 small's weights, and the one matrix whose errors reach the logits
 * directly; in 4 bits it alone took most of int4's loss of quality on the trained models of
 * bench/quality.py (docs/performance.md). llama.cpp does the same for tied embeddings (its Q4_0
 * keeps them in Q6_K). 6 bits read 31 MB per token of GPT-2 small where int8 read 41.
 */
#include "base/base.h"
#include "weights/served.h"

#include "access/detoast.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"

int			llm_inference_precision = LLM_PRECISION_FLOAT32;

static const struct config_enum_entry precision_options[] = {
	{"float32", LLM_PRECISION_FLOAT32, false},
	{"bfloat16", LLM_PRECISION_BFLOAT16, false},
	{"int8", LLM_PRECISION_INT8, false},
	{"int4", LLM_PRECISION_INT4, false},
	{"fp32", LLM_PRECISION_FLOAT32, true},
	{"bf16", LLM_PRECISION_BFLOAT16, true},
	{NULL, 0, false}
};

/* pg_llm.simd: "auto" is no cap (the best level of the CPU, capped by PG_LLM_SIMD). */
#define SIMD_AUTO (LLM_SIMD_AVX512_DOT + 1)

static int	simd_cap = SIMD_AUTO;

static const struct config_enum_entry simd_options[] = {
	{"auto", SIMD_AUTO, false},
	{"portable", LLM_SIMD_PORTABLE, false},
	{"avx2", LLM_SIMD_AVX2, false},
	{"avx512", LLM_SIMD_AVX512, false},
	{"avx512dot", LLM_SIMD_AVX512_DOT, false},
	{NULL, 0, false}
};

static void
assign_simd(int newval, void *extra)
{
	(void) llm_simd_set_level(newval == SIMD_AUTO ? LLM_SIMD_AVX512_DOT : (LlmSimdLevel) newval);
}

/* The packed kinds, in section order (sections 1, 2, ...). */
static const LlmParamKind packed_kinds[] = {LLM_WTE, LLM_QKVW, LLM_ATTPROJW, LLM_FCW, LLM_FCPROJW};

#define N_PACKED lengthof(packed_kinds)

/* Head columns packed at a time: bounds the buffer (6 MB at C = 768 in float32). */
#define HEAD_CHUNK (64 * LLM_WEIGHTS_PANEL)

void
llm_served_init(void)
{
	DefineCustomEnumVariable("pg_llm.inference_precision",
							 "Precision of the weights inference computes with: float32, bfloat16, int8 or int4.",
							 "Each precision is a copy derived from the float32 weights in llm_param, "
							 "shared by the server's backends. Training always uses float32.",
							 &llm_inference_precision, LLM_PRECISION_FLOAT32, precision_options,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("pg_llm.simd",
							 "Highest instruction-set level of the inference kernels.",
							 "auto: the best this CPU runs (capped by the environment variable PG_LLM_SIMD); "
							 "portable, avx2, avx512 or avx512dot cap it, for instance to compare a CPU without AVX-512.",
							 &simd_cap, SIMD_AUTO, simd_options,
							 PGC_USERSET, 0, NULL, assign_simd, NULL);
}

const char *
llm_precision_name(LlmPrecision prec)
{
	for (int i = 0; precision_options[i].name != NULL; i++)
		if (precision_options[i].val == (int) prec && !precision_options[i].hidden)
			return precision_options[i].name;
	elog(ERROR, "unknown precision %d", (int) prec);
}

LlmWeightFormat
llm_precision_format(LlmPrecision prec, LlmParamKind kind)
{
	switch (prec)
	{
		case LLM_PRECISION_FLOAT32:
			return LLM_WEIGHTS_F32;
		case LLM_PRECISION_BFLOAT16:
			return LLM_WEIGHTS_BF16;
		case LLM_PRECISION_INT8:
			return LLM_WEIGHTS_Q8;
		case LLM_PRECISION_INT4:
			return kind == LLM_WTE ? LLM_WEIGHTS_Q6 : LLM_WEIGHTS_Q4;
	}
	elog(ERROR, "unknown precision %d", (int) prec);
}

/* The id of the precision in a copy's header (weights_cache.h: never renumbered). */
static LlmWcPrecision
wc_precision(LlmPrecision prec)
{
	switch (prec)
	{
		case LLM_PRECISION_FLOAT32:
			return LLM_WC_FLOAT32;
		case LLM_PRECISION_BFLOAT16:
			return LLM_WC_BFLOAT16;
		case LLM_PRECISION_INT8:
			return LLM_WC_INT8;
		case LLM_PRECISION_INT4:
			return LLM_WC_INT4;
	}
	elog(ERROR, "unknown precision %d", (int) prec);
}

LlmPrecision
llm_precision_parse(const char *name)
{
	for (int i = 0; precision_options[i].name != NULL; i++)
		if (pg_strcasecmp(precision_options[i].name, name) == 0)
			return (LlmPrecision) precision_options[i].val;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown precision \"%s\"", name),
			 errhint("Use float32, bfloat16, int8 or int4.")));
}

/* ---- the format ---------------------------------------------------------------------------- */

static bool
is_packed(LlmParamKind kind)
{
	for (size_t i = 0; i < N_PACKED; i++)
		if (packed_kinds[i] == kind)
			return true;
	return false;
}

/* A packed kind as a product: (IC, OC), Hugging Face orientation; the head is wte^T (C, V). */
static void
packed_shape(const LlmConfig *cfg, LlmParamKind kind, size_t *IC, size_t *OC)
{
	size_t		C = cfg->d_model;

	*IC = kind == LLM_FCPROJW ? 4 * C : C;
	switch (kind)
	{
		case LLM_WTE:
			*OC = cfg->vocab;
			break;
		case LLM_QKVW:
			*OC = 3 * C;
			break;
		case LLM_FCW:
			*OC = 4 * C;
			break;
		default:
			*OC = C;
			break;
	}
}

/*
 * Where everything is in the copy's one section: the packed matrices of each packed kind
 * (packed[k], bytes; multiples of 64), then the vectors (vector[k], in floats from their start at
 * *vectors bytes). Returns the section's bytes. One section rather than one per kind: each section
 * starts on a 2 MB page, and that padding would take 10 MB of a 130 MB int8 copy of GPT-2 small.
 */
static size_t
served_layout(const LlmConfig *cfg, const LlmLayout *lay, LlmPrecision prec, size_t *packed,
			  size_t *vector, size_t *vectors)
{
	size_t		bytes = 0,
				floats = 0;

	for (int k = 0; k < LLM_NUM_KINDS; k++)
	{
		size_t		IC,
					OC;

		if (!is_packed((LlmParamKind) k))
			continue;
		packed_shape(cfg, (LlmParamKind) k, &IC, &OC);
		packed[k] = bytes;
		bytes += llm_kind_tensors(cfg, (LlmParamKind) k) *
			llm_weights_packed_size(llm_precision_format(prec, (LlmParamKind) k), IC, OC);
	}
	*vectors = bytes;
	for (int k = 0; k < LLM_NUM_KINDS; k++)
	{
		vector[k] = floats;
		if (!is_packed((LlmParamKind) k))
			floats += lay->size[k] * llm_kind_tensors(cfg, (LlmParamKind) k);
	}
	return bytes + floats * sizeof(float);
}

typedef struct ServedFill
{
	LlmPrecision prec;
	const float *source;
} ServedFill;

/* Packs one matrix (or a piece of the head) into buf and writes it at offset. */
static void
write_packed(LlmWcWriter *w, size_t offset, LlmWeightFormat fmt, LlmParamKind kind,
			 const float *src, size_t IC, size_t OC, void *buf)
{
	if (kind == LLM_WTE)
		llm_weights_pack_head(fmt, buf, src, OC, IC);
	else
		llm_weights_pack(fmt, buf, src, IC, OC);
	llm_wc_write(w, 0, offset, buf, llm_weights_packed_size(fmt, IC, OC));
	CHECK_FOR_INTERRUPTS();
}

static void
fill_served(const LlmConfig *cfg, LlmWcWriter *w, void *arg)
{
	const ServedFill *f = arg;
	LlmLayout	lay;
	size_t		packed[LLM_NUM_KINDS],
				vector[LLM_NUM_KINDS],
				vectors;
	/* volatile: read after PG_TRY's setjmp */
	const float *volatile block = f->source;
	LlmWcCopy  *volatile own = NULL;
	size_t		buf_bytes = 0;
	void	   *buf;

	llm_layout_init(cfg, &lay);
	(void) served_layout(cfg, &lay, f->prec, packed, vector, &vectors);
	for (size_t i = 0; i < N_PACKED; i++)
	{
		size_t		IC,
					OC;

		packed_shape(cfg, packed_kinds[i], &IC, &OC);
		if (packed_kinds[i] == LLM_WTE)
			OC = Min(OC, HEAD_CHUNK);
		buf_bytes = Max(buf_bytes, llm_weights_packed_size(llm_precision_format(f->prec, packed_kinds[i]), IC, OC));
	}
	buf = MemoryContextAllocHuge(CurrentMemoryContext, buf_bytes);
	if (block == NULL)
	{
		LlmWcFormat bf;

		llm_block_format(cfg, &bf);
		own = llm_wc_get(cfg, &bf, false);
		block = own->section[0];
	}
	PG_TRY();
	{
		for (size_t i = 0; i < N_PACKED; i++)
		{
			LlmParamKind kind = packed_kinds[i];
			LlmWeightFormat fmt = llm_precision_format(f->prec, kind);
			size_t		IC,
						OC,
						bytes;

			packed_shape(cfg, kind, &IC, &OC);
			bytes = llm_weights_packed_size(fmt, IC, OC);
			/* the head in pieces of HEAD_CHUNK vocabulary rows: panels are independent */
			for (size_t v0 = 0; kind == LLM_WTE && v0 < OC; v0 += HEAD_CHUNK)
				write_packed(w, packed[kind] + llm_weights_packed_size(fmt, IC, v0), fmt, kind,
							 block + lay.offset[kind] + v0 * IC, IC, Min(HEAD_CHUNK, OC - v0), buf);
			for (size_t l = 0; kind != LLM_WTE && l < llm_kind_tensors(cfg, kind); l++)
				write_packed(w, packed[kind] + l * bytes, fmt, kind, block + lay.offset[kind] + l * lay.size[kind],
							 IC, OC, buf);
		}
		for (int k = 0; k < LLM_NUM_KINDS; k++)
			if (!is_packed((LlmParamKind) k))
				llm_wc_write(w, 0, vectors + vector[k] * sizeof(float), block + lay.offset[k],
							 lay.size[k] * llm_kind_tensors(cfg, (LlmParamKind) k) * sizeof(float));
	}
	PG_FINALLY();
	{
		llm_wc_release(own);
		pfree(buf);
	}
	PG_END_TRY();
}

void
llm_served_format(const LlmConfig *cfg, LlmPrecision prec, const float *source, LlmWcFormat *fmt)
{
	LlmLayout	lay;
	size_t		packed[LLM_NUM_KINDS],
				vector[LLM_NUM_KINDS],
				vectors;
	ServedFill *f = palloc(sizeof(ServedFill));

	llm_layout_init(cfg, &lay);
	memset(fmt, 0, sizeof(*fmt));
	fmt->name = llm_precision_name(prec);
	fmt->layout = LLM_WC_LAYOUT_PACKED + LLM_WEIGHTS_LAYOUT;
	fmt->precision = wc_precision(prec);
	fmt->n_sections = 1;
	fmt->section_id[0] = LLM_WC_SECTION_SERVED;
	fmt->section_bytes[0] = served_layout(cfg, &lay, prec, packed, vector, &vectors);
	f->prec = prec;
	f->source = source;
	fmt->fill = fill_served;
	fmt->arg = f;
}

void
llm_served_point(LlmModel *m, const LlmWcCopy *copy, LlmPrecision prec)
{
	LlmLayout	vectors = m->layout;
	size_t		packed[LLM_NUM_KINDS],
				start;
	const char *base = copy->section[0];

	(void) served_layout(&m->cfg, &m->layout, prec, packed, vectors.offset, &start);
	m->memory = (float *) (base + start);
	llm_params_point(m->memory, &vectors, &m->p);
	m->p.wte = m->p.qkvw = m->p.attprojw = m->p.fcw = m->p.fcprojw = NULL;
	m->served = true;
	m->precision = prec;
	memset(&m->packed, 0, sizeof(m->packed));
	for (size_t i = 0; i < N_PACKED; i++)
	{
		LlmParamKind kind = packed_kinds[i];
		size_t		IC,
					OC;

		packed_shape(&m->cfg, kind, &IC, &OC);
		m->packed.fmt[kind] = llm_precision_format(prec, kind);
		m->packed.w[kind] = (const uint8_t *) base + packed[kind];
		m->packed.stride[kind] = llm_weights_packed_size(m->packed.fmt[kind], IC, OC);
	}
}

/* ---- the float32 block, filled from llm_param ----------------------------------------------- */

static void
check_shape(const LlmTensorInfo *info, ArrayType *shape)
{
	int			n = ARR_NDIM(shape) == 1 ? ARR_DIMS(shape)[0] : -1;
	int32	   *dims = (int32 *) ARR_DATA_PTR(shape);
	bool		ok = (n == info->ndim) && !ARR_HASNULL(shape) && ARR_ELEMTYPE(shape) == INT4OID;

	for (int i = 0; ok && i < n; i++)
		ok = dims[i] == info->shape[i];
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("tensor \"%s\" has the wrong shape in llm_param", info->name),
				 info->ndim == 2 ? errdetail("Expected {%d,%d}.", info->shape[0], info->shape[1])
				 : errdetail("Expected {%d}.", info->shape[0]),
				 errhint("Re-import the model's weights.")));
}

#define LOAD_SLICE_BYTES ((size_t) 8 << 20)

/* One row of llm_param (name, shape, data) into section 0 of the copy being written. */
static void
load_row(void *arg, HeapTuple tuple, TupleDesc desc, const char *name, int index, const LlmTensorInfo *info)
{
	LlmWcWriter *w = arg;
	bool		isnull;
	Datum		datum;
	size_t		bytes;

	if (index < 0)
		return;					/* not a parameter of this architecture: ignored */
	check_shape(info, DatumGetArrayTypeP(SPI_getbinval(tuple, desc, 2, &isnull)));
	datum = SPI_getbinval(tuple, desc, 3, &isnull);
	bytes = toast_raw_datum_size(datum) - VARHDRSZ;
	if (bytes != info->numel * sizeof(float))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("tensor \"%s\" has %zu bytes in llm_param, expected %zu",
						name, bytes, info->numel * sizeof(float)),
				 errhint("Re-import the model's weights.")));

	/*
	 * Copied in slices, each fetched from TOAST on its own: a whole tensor (wte is 150 MB in GPT-2
	 * small) is never held twice, so loading needs little more than the weights.
	 */
	for (size_t off = 0; off < bytes; off += LOAD_SLICE_BYTES)
	{
		size_t		len = Min(LOAD_SLICE_BYTES, bytes - off);
		bytea	   *slice = DatumGetByteaPSlice(datum, (int32) off, (int32) len);

		llm_wc_write(w, 0, info->offset * sizeof(float) + off, VARDATA(slice), len);
		pfree(slice);
	}
}

/* Writes every tensor of the model from llm_param into section 0 of a copy (num_params floats). */
static void
load_weights(const LlmConfig *cfg, LlmWcWriter *w)
{
	LlmTensorRows rows;
	LlmTensorInfo info;

	llm_tensor_rows_begin(&rows, cfg);
	SPI_connect();
	llm_tensor_rows_scan(&rows, psprintf("SELECT name, shape, data FROM %s WHERE model = $1", llm_table("llm_param")),
						 TEXTOID, CStringGetTextDatum(cfg->model), true, load_row, w);
	SPI_finish();
	if (llm_tensor_rows_missing(&rows, 0, &info) >= 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("model \"%s\" has no weights for tensor \"%s\"", cfg->model, info.name),
				 errhint("Load weights with pgllm import (or pg_llm_import_npz), or create them with pgllm init.")));
	pfree(rows.seen);
}

static void
fill_from_tables(const LlmConfig *cfg, LlmWcWriter *w, void *arg)
{
	load_weights(cfg, w);
}

void
llm_block_format(const LlmConfig *cfg, LlmWcFormat *fmt)
{
	LlmLayout	layout;

	llm_layout_init(cfg, &layout);
	memset(fmt, 0, sizeof(*fmt));
	fmt->name = "block";
	fmt->layout = LLM_WC_LAYOUT_BLOCK;
	fmt->precision = LLM_WC_FLOAT32;
	fmt->n_sections = 1;
	fmt->section_id[0] = LLM_WC_SECTION_PARAMS;
	fmt->section_bytes[0] = layout.num_params * sizeof(float);
	fmt->fill = fill_from_tables;
}
