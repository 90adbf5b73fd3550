/*
 * served.c: the copies of a model's weights that inference reads (see served.h), one format of
 * the weight cache per precision.
 *
 * A served copy has six sections: the float32 vectors (wpe, LayerNorm weights, biases: model.h's
 * kinds in block order, without the matrices), then the packed head (wte^T) and, for every layer
 * in order, the packed c_attn, attn.c_proj, c_fc and mlp.c_proj weights. Decode streams the packed
 * sections front to back; the tied embedding reads its rows back from the packed head
 * (llm_weights_column), so there is no second copy of wte.
 *
 * Why packed for the prompt too: the packed kernels run T rows in blocks of 96 as fast as or
 * faster than sgemm on the float32 block (bench.kernels at T = 128; docs/notes/decode.md), so one
 * copy serves both passes and a reduced precision needs no float32 copy beside it.
 */
#include "pg_llm.h"
#include "served.h"

#include "miscadmin.h"
#include "utils/guc.h"
#include "utils/memutils.h"

int			llm_inference_precision = LLM_PRECISION_FLOAT32;

static const struct config_enum_entry precision_options[] = {
	{"float32", LLM_PRECISION_FLOAT32, false},
	{"bfloat16", LLM_PRECISION_BFLOAT16, false},
	{"int8", LLM_PRECISION_INT8, false},
	{"fp32", LLM_PRECISION_FLOAT32, true},
	{"bf16", LLM_PRECISION_BFLOAT16, true},
	{NULL, 0, false}
};

/* The packed kinds, in section order (sections 1, 2, ...). */
static const LlmParamKind packed_kinds[] = {LLM_WTE, LLM_QKVW, LLM_ATTPROJW, LLM_FCW, LLM_FCPROJW};

#define N_PACKED lengthof(packed_kinds)

/* Head columns packed at a time: bounds the buffer (6 MB at C = 768 in float32). */
#define HEAD_CHUNK (64 * LLM_WEIGHTS_PANEL)

void
llm_served_init(void)
{
	DefineCustomEnumVariable("pg_llm.inference_precision",
							 "Precision of the weights inference computes with: float32, bfloat16 or int8.",
							 "Each precision is a copy derived from the float32 weights in llm_param, "
							 "shared by the server's backends. Training always uses float32.",
							 &llm_inference_precision, LLM_PRECISION_FLOAT32, precision_options,
							 PGC_USERSET, 0, NULL, NULL, NULL);
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
llm_precision_format(LlmPrecision prec)
{
	switch (prec)
	{
		case LLM_PRECISION_FLOAT32:
			return LLM_WEIGHTS_F32;
		case LLM_PRECISION_BFLOAT16:
			return LLM_WEIGHTS_BF16;
		case LLM_PRECISION_INT8:
			return LLM_WEIGHTS_Q8;
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
			 errhint("Use float32, bfloat16 or int8.")));
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

/* Where each vector kind starts in section 0 (in floats), and the floats of all of them. */
static size_t
vector_offsets(const LlmLayout *lay, const LlmConfig *cfg, size_t *offset)
{
	size_t		n = 0;

	for (int k = 0; k < LLM_NUM_KINDS; k++)
	{
		offset[k] = n;
		if (!is_packed((LlmParamKind) k))
			n += lay->size[k] * llm_kind_tensors(cfg, (LlmParamKind) k);
	}
	return n;
}

typedef struct ServedFill
{
	LlmPrecision prec;
	const float *source;
} ServedFill;

/* Packs one matrix (or a piece of the head) into buf and writes it at offset of a section. */
static void
write_packed(LlmWcWriter *w, int section, size_t offset, LlmWeightFormat fmt, LlmParamKind kind,
			 const float *src, size_t IC, size_t OC, void *buf)
{
	size_t		bytes = llm_weights_packed_size(fmt, IC, OC);

	if (kind == LLM_WTE)
		llm_weights_pack_head(fmt, buf, src, OC, IC);
	else
		llm_weights_pack(fmt, buf, src, IC, OC);
	llm_wc_write(w, section, offset, buf, bytes);
	CHECK_FOR_INTERRUPTS();
}

static void
fill_served(const LlmConfig *cfg, LlmWcWriter *w, void *arg)
{
	const ServedFill *f = arg;
	LlmWeightFormat fmt = llm_precision_format(f->prec);
	LlmLayout	lay;
	size_t		offset[LLM_NUM_KINDS];
	const float *block = f->source;
	LlmWcCopy  *own = NULL;
	size_t		buf_bytes = 0;
	void	   *buf;

	llm_layout_init(cfg, &lay);
	(void) vector_offsets(&lay, cfg, offset);
	for (size_t i = 0; i < N_PACKED; i++)
	{
		size_t		IC,
					OC;

		packed_shape(cfg, packed_kinds[i], &IC, &OC);
		buf_bytes = Max(buf_bytes, llm_weights_packed_size(fmt, IC, packed_kinds[i] == LLM_WTE ? Min(OC, HEAD_CHUNK) : OC));
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
		for (int k = 0; k < LLM_NUM_KINDS; k++)
			if (!is_packed((LlmParamKind) k))
				llm_wc_write(w, 0, offset[k] * sizeof(float), block + lay.offset[k],
							 lay.size[k] * llm_kind_tensors(cfg, (LlmParamKind) k) * sizeof(float));
		for (size_t i = 0; i < N_PACKED; i++)
		{
			LlmParamKind kind = packed_kinds[i];
			size_t		IC,
						OC;

			packed_shape(cfg, kind, &IC, &OC);
			if (kind == LLM_WTE)
			{
				/* in pieces of HEAD_CHUNK vocabulary rows: panels are independent */
				for (size_t v0 = 0; v0 < OC; v0 += HEAD_CHUNK)
					write_packed(w, 1 + i, llm_weights_packed_size(fmt, IC, v0), fmt, kind,
								 block + lay.offset[kind] + v0 * IC, IC, Min(HEAD_CHUNK, OC - v0), buf);
			}
			else
			{
				size_t		bytes = llm_weights_packed_size(fmt, IC, OC);

				for (size_t l = 0; l < llm_kind_tensors(cfg, kind); l++)
					write_packed(w, 1 + i, l * bytes, fmt, kind, block + lay.offset[kind] + l * lay.size[kind],
								 IC, OC, buf);
			}
		}
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
	LlmWeightFormat wf = llm_precision_format(prec);
	LlmLayout	lay;
	size_t		offset[LLM_NUM_KINDS];
	ServedFill *f = palloc(sizeof(ServedFill));

	llm_layout_init(cfg, &lay);
	memset(fmt, 0, sizeof(*fmt));
	fmt->name = llm_precision_name(prec);
	fmt->layout = LLM_WC_LAYOUT_PACKED + LLM_WEIGHTS_LAYOUT;
	fmt->precision = prec == LLM_PRECISION_FLOAT32 ? LLM_WC_FLOAT32 :
		prec == LLM_PRECISION_BFLOAT16 ? LLM_WC_BFLOAT16 : LLM_WC_INT8;
	fmt->n_sections = 1 + N_PACKED;
	fmt->section_id[0] = LLM_WC_SECTION_VECTORS;
	fmt->section_bytes[0] = vector_offsets(&lay, cfg, offset) * sizeof(float);
	for (size_t i = 0; i < N_PACKED; i++)
	{
		size_t		IC,
					OC;

		packed_shape(cfg, packed_kinds[i], &IC, &OC);
		fmt->section_id[1 + i] = LLM_WC_SECTION_PACKED + packed_kinds[i];
		fmt->section_bytes[1 + i] = llm_kind_tensors(cfg, packed_kinds[i]) * llm_weights_packed_size(wf, IC, OC);
	}
	f->prec = prec;
	f->source = source;
	fmt->fill = fill_served;
	fmt->arg = f;
}

void
llm_served_point(LlmModel *m, const LlmWcCopy *copy, LlmPrecision prec)
{
	LlmLayout	vectors = m->layout;
	LlmWeightFormat fmt = llm_precision_format(prec);

	(void) vector_offsets(&m->layout, &m->cfg, vectors.offset);
	m->memory = copy->section[0];
	llm_params_point(m->memory, &vectors, &m->p);
	m->p.wte = m->p.qkvw = m->p.attprojw = m->p.fcw = m->p.fcprojw = NULL;
	m->served = true;
	m->precision = prec;
	memset(&m->packed, 0, sizeof(m->packed));
	m->packed.fmt = fmt;
	for (size_t i = 0; i < N_PACKED; i++)
	{
		size_t		IC,
					OC;

		packed_shape(&m->cfg, packed_kinds[i], &IC, &OC);
		m->packed.w[packed_kinds[i]] = copy->section[1 + i];
		m->packed.stride[packed_kinds[i]] = llm_weights_packed_size(fmt, IC, OC);
	}
}
