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

/* a block's weights q (times their scales) as int8, [input][column] */
typedef void (*unpack_fn) (const uint8_t *blk, int8_t (*q)[NR]);

#define UNPACK(name, weight) \
static void \
name(const uint8_t *blk, int8_t (*q)[NR]) \
{ \
	for (size_t k = 0; k < QK; k++) \
		for (size_t c = 0; c < NR; c++) \
			q[k][c] = (int8_t) weight(blk, k, c); \
}
UNPACK(unpack_q8, q8_weight)
UNPACK(unpack_q4, q4_weight)
#undef UNPACK

/* Q6 in the order of its bytes (q6_index): q6_weight per weight took 1.8x as long */
static void
unpack_q6(const uint8_t *blk, int8_t (*q)[NR])
{
	for (size_t g = 0; g < 2; g++)
		for (size_t v = 0; v < NR / 8; v++)
		{
			const uint8_t *at = blk + NR * 2 + (g * 4 + v) * 96;

			for (size_t i = 0; i < 32; i++)	/* column 8 v + i / 4, input 4 g + i % 4 (+ 8, 16, 24) */
			{
				size_t		c = 8 * v + i / 4,
							k = 4 * g + i % 4;
				int			u0 = at[i],
							u1 = at[32 + i],
							t = at[64 + i];

				q[k][c] = (int8_t) (((u0 & 15) | (t & 3) << 4) - 32);
				q[k + 16][c] = (int8_t) (((u0 >> 4) | (t >> 2 & 3) << 4) - 32);
				q[k + 8][c] = (int8_t) (((u1 & 15) | (t >> 4 & 3) << 4) - 32);
				q[k + 24][c] = (int8_t) (((u1 >> 4) | (t >> 6) << 4) - 32);
			}
		}
}

/*
 * The integer formats: each block unpacked once for all rows, then per row the block's sum of
 * q_w q_x exactly in int32, added into the row's float32 sums with its scales (blocks in order).
 */
static inline __attribute__((always_inline)) void
blocks_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR], size_t block_bytes,
				unpack_fn unpack)
{
	const Q8Act *a = g->act;
	size_t		nb = gemv_blocks(g->IC);
	int8_t		q[QK][NR];

	for (int r = 0; r < nr; r++)
		memset(acc[r], 0, sizeof(acc[r]));
	for (size_t b = 0; b < nb; b++)
	{
		const uint8_t *blk = panel + b * block_bytes;
		float		d[NR];

		unpack(blk, q);
		block_scales(blk, d);
		for (int r = 0; r < nr; r++)
		{
			const int8_t *xq = a->q + ((r0 + r) * nb + b) * QK;
			int32_t		isum[NR] = {0};

			for (int k = 0; k < QK; k++)
				for (int c = 0; c < NR; c++)
					isum[c] += q[k][c] * xq[k];
			add_block(acc[r], isum, d, a->d[(r0 + r) * nb + b]);
		}
	}
}

static void
q8_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	blocks_portable(g, panel, r0, nr, acc, Q8_BLOCK, unpack_q8);
}

static void
q4_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	blocks_portable(g, panel, r0, nr, acc, Q4_BLOCK, unpack_q4);
}

static void
q6_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	blocks_portable(g, panel, r0, nr, acc, Q6_BLOCK, unpack_q6);
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
