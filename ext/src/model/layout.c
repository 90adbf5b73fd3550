/*
 * layout.c: GPT-2's tensors (tensors.def): their names, shapes and places in the parameter block.
 * Pure functions of the architecture; nothing here reads the database.
 */
#include "base/base.h"
#include "model/model.h"

#include <ctype.h>
#include <stdlib.h>

/* Names and scopes of the kinds (tensors.def). */
static const struct
{
	const char *name;
	bool		layered;
}			kinds[] = {
#define LLM_TENSOR(kind, name, scope, rows, cols) [LLM_##kind] = {name, LLM_SCOPE_##scope},
#define LLM_SCOPE_MODEL false
#define LLM_SCOPE_LAYER true
#include "model/tensors.def"
#undef LLM_TENSOR
};

/* GPT-2's state dict: wte, wpe, then each layer's tensors (consecutive kinds), then ln_f. */
#define FIRST_LAYER_KIND LLM_LN1W
#define LAYER_TENSORS (LLM_FCPROJB - LLM_LN1W + 1)

static bool
kind_is_layered(LlmParamKind kind)
{
	return kinds[kind].layered;
}

/* The shape of one tensor of this kind (one layer's, for layered kinds), as tensors.def says. */
int
llm_kind_shape(const LlmConfig *cfg, LlmParamKind kind, int shape[2])
{
	int			V = cfg->vocab,
				P = cfg->n_positions,
				C = cfg->d_model;

	switch (kind)
	{
#define LLM_TENSOR(kind, name, scope, rows, cols) \
		case LLM_##kind: shape[0] = (rows); shape[1] = (cols); return (cols) != 0 ? 2 : 1;
#include "model/tensors.def"
#undef LLM_TENSOR
		default:
			elog(ERROR, "unknown tensor kind %d", (int) kind);
	}
}

void
llm_layout_init(const LlmConfig *cfg, LlmLayout *layout)
{
	size_t		offset = 0;

	for (int k = 0; k < LLM_NUM_KINDS; k++)
	{
		int			shape[2];
		int			ndim = llm_kind_shape(cfg, (LlmParamKind) k, shape);
		size_t		n = (size_t) shape[0] * (ndim == 2 ? (size_t) shape[1] : 1);

		layout->offset[k] = offset;
		layout->size[k] = n;
		offset += n * (kind_is_layered((LlmParamKind) k) ? (size_t) cfg->n_layer : 1);
	}
	layout->num_params = offset;
	layout->num_tensors = 4 + LAYER_TENSORS * cfg->n_layer;
}

static void
fill_info(const LlmConfig *cfg, const LlmLayout *layout, LlmParamKind kind, int layer,
		  const char *name, LlmTensorInfo *info)
{
	strlcpy(info->name, name, sizeof(info->name));
	info->kind = kind;
	info->layer = layer;
	info->ndim = llm_kind_shape(cfg, kind, info->shape);
	info->numel = layout->size[kind];
	info->offset = layout->offset[kind] + (layer >= 0 ? (size_t) layer * layout->size[kind] : 0);
	info->decay = (info->ndim == 2);
}

/* Tensors in state-dict order: wte, wpe, h.0.*, ..., h.{L-1}.*, ln_f.weight, ln_f.bias. */
void
llm_tensor_info(const LlmConfig *cfg, const LlmLayout *layout, int index, LlmTensorInfo *info)
{
	char		name[64];
	int			n_layered = LAYER_TENSORS * cfg->n_layer;

	Assert(index >= 0 && index < layout->num_tensors);
	if (index < 2)
		fill_info(cfg, layout, (LlmParamKind) index, -1, kinds[index].name, info);
	else if (index - 2 < n_layered)
	{
		int			layer = (index - 2) / LAYER_TENSORS;
		LlmParamKind kind = FIRST_LAYER_KIND + (index - 2) % LAYER_TENSORS;

		snprintf(name, sizeof(name), "h.%d.%s", layer, kinds[kind].name);
		fill_info(cfg, layout, kind, layer, name, info);
	}
	else
	{
		LlmParamKind kind = LLM_LNFW + (index - 2 - n_layered);

		fill_info(cfg, layout, kind, -1, kinds[kind].name, info);
	}
}

/* Index of the tensor with this name, or -1. */
int
llm_tensor_find(const LlmConfig *cfg, const LlmLayout *layout, const char *name, LlmTensorInfo *info)
{
	if (strncmp(name, "h.", 2) == 0)
	{
		char	   *end;
		long		layer;

		if (!isdigit((unsigned char) name[2]))
			return -1;
		layer = strtol(name + 2, &end, 10);
		/* no leading zeros, so that each tensor has exactly one name */
		if (*end != '.' || layer < 0 || layer >= cfg->n_layer || (name[2] == '0' && end != name + 3))
			return -1;
		for (int t = 0; t < LAYER_TENSORS; t++)
		{
			if (strcmp(end + 1, kinds[FIRST_LAYER_KIND + t].name) == 0)
			{
				int			index = 2 + (int) layer * LAYER_TENSORS + t;

				llm_tensor_info(cfg, layout, index, info);
				return index;
			}
		}
		return -1;
	}
	for (int index = 0; index < layout->num_tensors; index += (index == 1 ? LAYER_TENSORS * cfg->n_layer + 1 : 1))
	{
		llm_tensor_info(cfg, layout, index, info);
		if (strcmp(info->name, name) == 0)
			return index;
	}
	return -1;
}

void
llm_params_point(float *memory, const LlmLayout *layout, LlmParams *p)
{
	float	  **slots[LLM_NUM_KINDS] = {
		&p->wte, &p->wpe, &p->ln1w, &p->ln1b, &p->qkvw, &p->qkvb, &p->attprojw, &p->attprojb,
		&p->ln2w, &p->ln2b, &p->fcw, &p->fcb, &p->fcprojw, &p->fcprojb, &p->lnfw, &p->lnfb,
	};

	for (int k = 0; k < LLM_NUM_KINDS; k++)
		*slots[k] = memory + layout->offset[k];
}

size_t
llm_kind_tensors(const LlmConfig *cfg, LlmParamKind kind)
{
	return kind_is_layered(kind) ? (size_t) cfg->n_layer : 1;
}

const char *
llm_kind_name(LlmParamKind kind)
{
	return kinds[kind].name;
}
