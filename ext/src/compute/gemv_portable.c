/*
 * gemv_portable.c: the kernels in plain C, for any CPU (gemv_kernels.h): loops over a panel's 32
 * columns that the compiler vectorises with the base instruction set.
 *
 * float32 and bfloat16 take the activations as float32 (plain multiplies and adds: the base
 * instruction set has no fused multiply-add); int8, int4, 6-bit quantise them per block of 32 (gemv.c)
 * and sum the integer products of a block exactly, as the SIMD levels do, then add each block into
 * float32 with fmaf: the same operations as AVX2 and the AVX-512 dot products, so the same bits.
 */
#include "compute/gemv_kernels.h"

#include <math.h>

static void
f32_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	const float *w = (const float *) panel;

	for (int r = 0; r < nr; r++)
	{
		const float *x = g->inp + (r0 + r) * g->IC;
		float		s[NR] = {0};

		for (size_t i = 0; i < g->IC; i++)
			for (int c = 0; c < NR; c++)
				s[c] += x[i] * w[i * NR + c];
		memcpy(acc[r], s, sizeof(s));
	}
}

static void
bf16_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	const uint32_t *w = (const uint32_t *) panel;

	for (int r = 0; r < nr; r++)
	{
		const float *x = g->inp + (r0 + r) * g->IC;
		float		s[NR] = {0};

		for (size_t i = 0; i < g->IC; i += 2)
		{
			float		x0 = x[i],
						x1 = i + 1 < g->IC ? x[i + 1] : 0.0f;

			for (int c = 0; c < NR; c++)
			{
				uint32_t	u = w[(i / 2) * NR + c];

				s[c] += x0 * bits_float(u << 16) + x1 * bits_float(u & 0xFFFF0000u);
			}
		}
		memcpy(acc[r], s, sizeof(s));
	}
}

/* The fp16 scales of a block's 32 columns. */
static void
block_scales(const uint8_t *blk, float *d)
{
	for (int c = 0; c < NR; c++)
	{
		uint16_t	h;

		memcpy(&h, blk + c * 2, sizeof(h));
		d[c] = fp16_float(h);
	}
}

/* s[c] += (sum over the block of q_w q_x) * (d_w[c] d_x), q_w = code - offset */
static inline void
add_block(float *s, const int32_t *isum, const float *dw, float dx)
{
	for (int c = 0; c < NR; c++)
		s[c] = fmaf((float) isum[c], dw[c] * dx, s[c]);
}

static void
q8_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	const Q8Act *a = g->act;
	size_t		nb = gemv_blocks(g->IC);

	for (int r = 0; r < nr; r++)
	{
		float		s[NR] = {0};

		for (size_t b = 0; b < nb; b++)
		{
			const uint8_t *blk = panel + b * Q8_BLOCK;
			const int8_t *xq = a->q + ((r0 + r) * nb + b) * QK;
			int32_t		isum[NR] = {0};
			float		d[NR];

			block_scales(blk, d);
			for (int k = 0; k < QK; k++)
				for (int c = 0; c < NR; c++)
					isum[c] += ((int32_t) blk[q8_index(k, c)] - 128) * xq[k];
			add_block(s, isum, d, a->d[(r0 + r) * nb + b]);
		}
		memcpy(acc[r], s, sizeof(s));
	}
}

static void
q4_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	const Q8Act *a = g->act;
	size_t		nb = gemv_blocks(g->IC);

	for (int r = 0; r < nr; r++)
	{
		float		s[NR] = {0};

		for (size_t b = 0; b < nb; b++)
		{
			const uint8_t *blk = panel + b * Q4_BLOCK;
			const int8_t *xq = a->q + ((r0 + r) * nb + b) * QK;
			int32_t		isum[NR] = {0};
			float		d[NR];

			block_scales(blk, d);
			for (int k = 0; k < QK / 2; k++)
				for (int c = 0; c < NR; c++)
				{
					uint8_t		u = blk[q4_index(k, c)];

					isum[c] += ((int32_t) (u & 0xF) - 8) * xq[k] + ((int32_t) (u >> 4) - 8) * xq[k + 16];
				}
			add_block(s, isum, d, a->d[(r0 + r) * nb + b]);
		}
		memcpy(acc[r], s, sizeof(s));
	}
}

static void
q6_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	const Q8Act *a = g->act;
	size_t		nb = gemv_blocks(g->IC);

	for (int r = 0; r < nr; r++)
	{
		float		s[NR] = {0};

		for (size_t b = 0; b < nb; b++)
		{
			const uint8_t *blk = panel + b * Q6_BLOCK;
			const int8_t *xq = a->q + ((r0 + r) * nb + b) * QK;
			int32_t		isum[NR] = {0};
			float		d[NR];

			block_scales(blk, d);
			for (int k = 0; k < QK; k++)
				for (int c = 0; c < NR; c++)
					isum[c] += (q6_code(blk, k, c) - 32) * xq[k];
			add_block(s, isum, d, a->d[(r0 + r) * nb + b]);
		}
		memcpy(acc[r], s, sizeof(s));
	}
}

static void
quantise_portable(void *scratch, const float *inp, size_t R, size_t IC)
{
	gemv_quantise_q8(scratch, inp, R, IC);
}

void
llm_gemv_kernels_portable(Kernel *k)
{
	k[LLM_WEIGHTS_F32] = (Kernel) {f32_portable, LLM_GEMV_INPUT_F32, NULL};
	k[LLM_WEIGHTS_BF16] = (Kernel) {bf16_portable, LLM_GEMV_INPUT_F32, NULL};
	k[LLM_WEIGHTS_Q8] = (Kernel) {q8_portable, LLM_GEMV_INPUT_Q8, quantise_portable};
	k[LLM_WEIGHTS_Q4] = (Kernel) {q4_portable, LLM_GEMV_INPUT_Q8, quantise_portable};
	k[LLM_WEIGHTS_Q6] = (Kernel) {q6_portable, LLM_GEMV_INPUT_Q8, quantise_portable};
}
