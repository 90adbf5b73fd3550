/*
 * gemv.c: matrix-vector products over packed weights (see gemv.h): the layouts, packing, the
 * activations in the kernels' forms, the choice of kernels and the product itself. The kernels
 * are one file per instruction set (gemv_kernels.h).
 *
 * Layout. A packed (IC, OC) matrix is a sequence of panels of NR = 32 output columns (the last
 * one padded with zero columns); a panel holds all IC inputs of its columns, so a thread that owns
 * a range of panels reads one contiguous stretch of memory front to back, and a panel's outputs
 * stay in registers for the whole pass over IC. Within a panel:
 *   F32   [IC][32] floats: input i's 32 weights are one contiguous 128-byte row;
 *   BF16  [IC/2][32][2]: the two inputs 2k, 2k+1 of a column share a 32-bit word (IC padded to
 *         even), the operand vdpbf16ps wants, and a float32 pair after a shift and a mask;
 *   Q8    [IC/32] blocks of 1088 bytes: 32 fp16 scales (one per column, rounded up so that no
 *         weight is clipped), then [8][32][4] bytes: input 4g+k of column c at g*128 + c*4 + k,
 *         stored as q + 128 (unsigned): the operand layout of vpdpbusd. A weight is scale * q,
 *         q in [-127, 127], as llama.cpp's Q8_0 (blocks of 32 inputs, fp16 scale);
 *   Q4    [IC/32] blocks of 576 bytes: 32 fp16 scales, then 512 bytes of 4-bit codes u = q + 8,
 *         q in [-8, 7]: inputs 0..15 in the low nibbles in Q8's operand layout ([4][32][4]), inputs
 *         16..31 in the high nibbles of the same bytes, so that a mask, or a shift and a mask,
 *         gives Q8's operand of either half. A weight is scale * q, as llama.cpp's Q4_0, but the
 *         scale of each block is the fp16 value that minimises the block's squared error among
 *         a few candidates (see quantise_block), not max|w| / 8;
 *   Q6    [IC/32] blocks of 832 bytes: 32 fp16 scales, then 768 bytes of 6-bit codes u = q + 32,
 *         q in [-32, 31], scales chosen as Q4's: per group of 4 inputs and 8 columns, 96 bytes,
 *         two 32-byte vectors of low nibbles as Q4's (two groups of inputs each) and one of the
 *         four groups' top 2 bits (gemv_kernels.h: q6_index). The head of the int4 precision is
 *         Q6 (llama.cpp's Q4_0 files keep a tied head in Q6_K): 31 MB per token of GPT-2 small,
 *         where int8's head reads 41.
 * Each panel is 64-byte aligned when the packed matrix is. A change to any of this must bump
 * LLM_WEIGHTS_LAYOUT (gemv.h): packed copies may outlive the code that wrote them.
 *
 * Products. The rows go in blocks of ROW_BLOCK; per block a thread runs each of its panels
 * through the format's kernel for all the block's rows, which reads the panel from memory once
 * and from L1/L2 for further groups of rows. Which kernel runs, and in which form it takes the
 * activations (float32, bf16 pairs, or int8 per block of 32: gemv.h's levels), is picked from the
 * CPU at run time (GCC target attributes + __builtin_cpu_supports), never from the build machine;
 * PG_LLM_SIMD or llm_simd_set_level lowers it.
 *
 * Each row's arithmetic is the same whatever R and the other rows are (rows never mix), so a
 * batch gives each sequence the result it would get alone.
 */
#include "compute/gemv_kernels.h"
#include "compute/pool.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- scalar conversions ----------------------------------------------------------------------- */

static inline float
bf16_float(uint16_t h)
{
	return bits_float((uint32_t) h << 16);
}

/* The smallest fp16 >= x, for 0 <= x (65504, the largest, for anything above it or NaN). */
static uint16_t
fp16_ceil(float x)
{
	int			e;
	float		m;
	uint32_t	q;

	if (!(x <= 65504.0f))
		return 0x7BFF;
	if (x < 0x1p-14f)			/* subnormal: multiples of 2^-24 */
		return (uint16_t) ceilf(x * 0x1p24f);
	m = frexpf(x, &e);			/* x = m 2^e, m in [0.5, 1) */
	q = (uint32_t) ceilf((m * 2.0f - 1.0f) * 1024.0f);
	e -= 1;
	if (q == 1024)
	{
		q = 0;
		e += 1;
	}
	if (e > 15)
		return 0x7BFF;
	return (uint16_t) (((uint32_t) (e + 15) << 10) | q);
}

/* The fp16 nearest to x (ties to even); +-65504 for anything beyond, 0 for NaN. */
static uint16_t
fp16_nearest(float x)
{
	uint16_t	s = signbit(x) ? 0x8000 : 0;
	float		a = fabsf(x),
				m;
	int			e;
	uint32_t	q;

	if (isnan(x))
		return 0;
	if (!(a < 65504.0f))
		return s | 0x7BFF;
	if (a < 0x1p-14f)			/* subnormal: multiples of 2^-24 (1024 of them is 2^-14, the smallest normal) */
		return s | (uint16_t) nearbyintf(a * 0x1p24f);
	m = frexpf(a, &e);			/* a = m 2^e, m in [0.5, 1) */
	q = (uint32_t) nearbyintf((m * 2.0f - 1.0f) * 1024.0f);
	e -= 1;
	if (q == 1024)
	{
		q = 0;
		e += 1;
	}
	if (e > 15)
		return s | 0x7BFF;
	return s | (uint16_t) (((uint32_t) (e + 15) << 10) | q);
}

/* ---- layout ----------------------------------------------------------------------------------- */

static inline size_t
n_panels(size_t OC)
{
	return (OC + NR - 1) / NR;
}

/* bytes of a block of 32 inputs of a panel, for the integer formats */
static size_t
block_bytes(LlmWeightFormat fmt)
{
	return fmt == LLM_WEIGHTS_Q8 ? Q8_BLOCK : fmt == LLM_WEIGHTS_Q4 ? Q4_BLOCK : Q6_BLOCK;
}

static size_t
panel_bytes(LlmWeightFormat fmt, size_t IC)
{
	switch (fmt)
	{
		case LLM_WEIGHTS_F32:
			return IC * NR * sizeof(float);
		case LLM_WEIGHTS_BF16:
			return gemv_even(IC) * NR * sizeof(uint16_t);
		case LLM_WEIGHTS_Q8:
		case LLM_WEIGHTS_Q4:
		case LLM_WEIGHTS_Q6:
			return gemv_blocks(IC) * block_bytes(fmt);
	}
	return 0;
}

size_t
llm_weights_packed_size(LlmWeightFormat fmt, size_t IC, size_t OC)
{
	return n_panels(OC) * panel_bytes(fmt, IC);
}

/* ---- packing ---------------------------------------------------------------------------------- */

/* Source element (i, o) is w[i * si + o * so]; outside IC x OC it is 0 (padding). */
typedef struct PackJob
{
	LlmWeightFormat fmt;
	uint8_t    *dst;
	const float *w;
	size_t		si,
				so,
				IC,
				OC;
} PackJob;

static inline float
source(const PackJob *j, size_t i, size_t o)
{
	return (i < j->IC && o < j->OC) ? j->w[i * j->si + o * j->so] : 0.0f;
}

static void
pack_q8_block(const PackJob *j, uint8_t *blk, size_t b, size_t o0)
{
	for (size_t c = 0; c < NR; c++)
	{
		float		amax = 0.0f,
					d;
		uint16_t	h;

		for (size_t k = 0; k < QK; k++)
		{
			float		a = fabsf(source(j, b * QK + k, o0 + c));

			amax = a > amax ? a : amax;
		}
		h = fp16_ceil(amax / 127.0f);
		d = fp16_float(h);
		memcpy(blk + c * 2, &h, sizeof(h));
		for (size_t k = 0; k < QK; k++)
		{
			float		q = d > 0.0f ? nearbyintf(source(j, b * QK + k, o0 + c) / d) : 0.0f;

			q = q < -127.0f ? -127.0f : q > 127.0f ? 127.0f : q;	/* only past fp16's range */
			blk[q8_index(k, c)] = (uint8_t) ((int) q + 128);
		}
	}
}

/* q = round(x / d) within [-half, half - 1], for the 32 weights of a block; returns sum (x - d q)^2. */
static float
block_codes(const float *x, float d, int half, int8_t *q)
{
	float		err = 0.0f,
				lo = (float) -half,
				hi = (float) (half - 1);

	for (int k = 0; k < QK; k++)
	{
		float		v = d != 0.0f ? nearbyintf(x[k] / d) : 0.0f;

		v = v < lo ? lo : v > hi ? hi : v;
		v = v == v ? v : 0.0f;	/* NaN (a NaN weight) */
		q[k] = (int8_t) v;
		err += (x[k] - d * v) * (x[k] - d * v);
	}
	return err;
}

/*
 * The scale of a block of 32 weights and their codes in [-half, half - 1] (half = 8: Q4, 32: Q6).
 * Mapping the weight of largest magnitude, m, to -half (d = m / -half, llama.cpp's Q4_0 for Q4)
 * uses the one extra negative level but spends the grid on that weight alone; a scale a little
 * smaller rounds the many small weights better at the price of clipping m. Candidates: that
 * scale, and d = m / t for t from -half - 1 to -half + 2 in steps of 1/4, each refined once to
 * the least-squares scale of its codes (sum x q / sum q^2); all rounded to fp16, the one of least
 * squared error wins (so never worse than the first).
 */
static uint16_t
quantise_block(const float *x, int half, int8_t *q)
{
	float		amax = 0.0f,
				m = 0.0f,
				best;
	uint16_t	best_h;
	int8_t		t_q[QK];

	for (int k = 0; k < QK; k++)
		if (fabsf(x[k]) > amax)
			amax = fabsf(x[k]), m = x[k];
	memset(q, 0, QK);
	if (amax == 0.0f || !isfinite(amax))
		return 0;
	best_h = fp16_nearest(m / (float) -half);
	best = block_codes(x, fp16_float(best_h), half, q);
	for (int t = 0; t <= 12; t++)
	{
		float		sxq = 0.0f,
					sqq = 0.0f,
					err;
		uint16_t	h;

		(void) block_codes(x, m / ((float) (-half - 1) + 0.25f * (float) t), half, t_q);
		for (int k = 0; k < QK; k++)
			sxq += x[k] * t_q[k], sqq += (float) (t_q[k] * t_q[k]);
		h = fp16_nearest(sxq / sqq);
		err = block_codes(x, fp16_float(h), half, t_q);
		if (err < best)
		{
			best = err;
			best_h = h;
			memcpy(q, t_q, QK);
		}
	}
	return best_h;
}

/* a Q4 block (codes in [-8, 7]) or a Q6 one ([-32, 31]): see the layout above */
static void
pack_q4_q6_block(const PackJob *j, uint8_t *blk, size_t b, size_t o0)
{
	int			half = j->fmt == LLM_WEIGHTS_Q4 ? 8 : 32;

	memset(blk + NR * 2, 0, block_bytes(j->fmt) - NR * 2);
	for (size_t c = 0; c < NR; c++)
	{
		float		x[QK];
		int8_t		q[QK];
		uint16_t	h;

		for (size_t k = 0; k < QK; k++)
			x[k] = source(j, b * QK + k, o0 + c);
		h = quantise_block(x, half, q);
		memcpy(blk + c * 2, &h, sizeof(h));
		for (size_t k = 0; k < QK; k++)
		{
			int			u = q[k] + half,
						shift;
			size_t		top;

			if (half == 8)
				blk[q4_index(k, c)] |= (uint8_t) (u << (k < 16 ? 0 : 4));
			else
			{
				blk[q6_index(k, c, &top, &shift)] |= (uint8_t) ((u & 0xF) << (k < 16 ? 0 : 4));
				blk[top] |= (uint8_t) ((u >> 4) << shift);
			}
		}
	}
}

static void
pack_task(void *arg, size_t start, size_t end)
{
	const PackJob *j = arg;
	size_t		bytes = panel_bytes(j->fmt, j->IC);

	for (size_t p = start; p < end; p++)
	{
		uint8_t    *dst = j->dst + p * bytes;
		size_t		o0 = p * NR;

		switch (j->fmt)
		{
			case LLM_WEIGHTS_F32:
				for (size_t i = 0; i < j->IC; i++)
					for (size_t c = 0; c < NR; c++)
						((float *) dst)[i * NR + c] = source(j, i, o0 + c);
				break;
			case LLM_WEIGHTS_BF16:
				for (size_t i = 0; i < gemv_even(j->IC); i++)
					for (size_t c = 0; c < NR; c++)
						((uint16_t *) dst)[(i / 2) * NR * 2 + c * 2 + i % 2] = bf16_round(source(j, i, o0 + c));
				break;
			case LLM_WEIGHTS_Q8:
				for (size_t b = 0; b < gemv_blocks(j->IC); b++)
					pack_q8_block(j, dst + b * Q8_BLOCK, b, o0);
				break;
			case LLM_WEIGHTS_Q4:
			case LLM_WEIGHTS_Q6:
				for (size_t b = 0; b < gemv_blocks(j->IC); b++)
					pack_q4_q6_block(j, dst + b * block_bytes(j->fmt), b, o0);
				break;
		}
	}
}

static void
pack(LlmWeightFormat fmt, void *dst, const float *w, size_t si, size_t so, size_t IC, size_t OC)
{
	PackJob		j = {fmt, dst, w, si, so, IC, OC};

	llm_parallel_for(n_panels(OC), pack_task, &j);
}

void
llm_weights_pack(LlmWeightFormat fmt, void *dst, const float *w, size_t IC, size_t OC)
{
	pack(fmt, dst, w, OC, 1, IC, OC);
}

void
llm_weights_pack_head(LlmWeightFormat fmt, void *dst, const float *wte, size_t V, size_t C)
{
	pack(fmt, dst, wte, 1, C, C, V);
}

void
llm_weights_column(LlmWeightFormat fmt, float *dst, const void *packed, size_t IC, size_t OC, size_t col)
{
	const uint8_t *panel = (const uint8_t *) packed + (col / NR) * panel_bytes(fmt, IC);
	size_t		c = col % NR;

	(void) OC;
	for (size_t i = 0; i < IC; i++)
	{
		switch (fmt)
		{
			case LLM_WEIGHTS_F32:
				dst[i] = ((const float *) panel)[i * NR + c];
				break;
			case LLM_WEIGHTS_BF16:
				dst[i] = bf16_float(((const uint16_t *) panel)[(i / 2) * NR * 2 + c * 2 + i % 2]);
				break;
			case LLM_WEIGHTS_Q8:
			case LLM_WEIGHTS_Q4:
			case LLM_WEIGHTS_Q6:
				{
					const uint8_t *blk = panel + (i / QK) * block_bytes(fmt);
					size_t		k = i % QK;
					int			q = fmt == LLM_WEIGHTS_Q8 ? q8_weight(blk, k, c) :
						fmt == LLM_WEIGHTS_Q4 ? q4_weight(blk, k, c) : q6_weight(blk, k, c);
					uint16_t	h;

					memcpy(&h, blk + c * 2, sizeof(h));
					dst[i] = fp16_float(h) * (float) q;
				}
				break;
		}
	}
}

/* ---- activations in the kernels' forms --------------------------------------------------------- */

size_t
llm_gemv_scratch_size(LlmWeightFormat fmt, size_t R, size_t IC)
{
	switch (fmt)
	{
		case LLM_WEIGHTS_F32:
			return 0;
		case LLM_WEIGHTS_BF16:
			return R * gemv_even(IC) * sizeof(uint16_t);
		case LLM_WEIGHTS_Q8:
		case LLM_WEIGHTS_Q4:
		case LLM_WEIGHTS_Q6:
			return R * gemv_blocks(IC) * (QK + sizeof(float) + sizeof(int32_t));
	}
	return 0;
}

/* ---- dispatch --------------------------------------------------------------------------------- */

static const char *const level_names[] = {"portable", "avx2", "avx512", "avx512dot"};

static int	level = -1;			/* in use; -1 until the first call */
static Kernel kernels[LLM_WEIGHTS_FORMATS]; /* per format, for `level` */

const char *
llm_simd_name(LlmSimdLevel l)
{
	return (l >= LLM_SIMD_PORTABLE && l <= LLM_SIMD_AVX512_DOT) ? level_names[l] : "unknown";
}

LlmSimdLevel
llm_simd_detect(void)
{
	LlmSimdLevel best = LLM_SIMD_PORTABLE;
	const char *cap = getenv("PG_LLM_SIMD");

#ifdef LLM_GEMV_X86
	__builtin_cpu_init();
	if (__builtin_cpu_supports("x86-64-v3"))
		best = LLM_SIMD_AVX2;
	if (__builtin_cpu_supports("x86-64-v4"))
		best = LLM_SIMD_AVX512;
	if (best == LLM_SIMD_AVX512 &&
		(__builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avx512bf16")))
		best = LLM_SIMD_AVX512_DOT;
#endif
	for (int l = LLM_SIMD_PORTABLE; cap && l <= LLM_SIMD_AVX512_DOT; l++)
		if (strcmp(cap, level_names[l]) == 0 && l < (int) best)
			best = (LlmSimdLevel) l;
	return best;
}

LlmSimdLevel
llm_simd_set_level(LlmSimdLevel want)
{
	LlmSimdLevel l = Min(want, llm_simd_detect());
	Kernel		k[LLM_WEIGHTS_FORMATS];

	llm_gemv_kernels_portable(k);
#ifdef LLM_GEMV_X86
	if (l >= LLM_SIMD_AVX2)
		llm_gemv_kernels_avx2(k);
	if (l >= LLM_SIMD_AVX512)
		llm_gemv_kernels_avx512(k, l >= LLM_SIMD_AVX512_DOT && __builtin_cpu_supports("avx512bf16"),
								l >= LLM_SIMD_AVX512_DOT && __builtin_cpu_supports("avx512vnni"));
#endif
	memcpy(kernels, k, sizeof(kernels));
	level = l;
	return l;
}

LlmSimdLevel
llm_simd_level(void)
{
	if (level < 0)
		llm_simd_set_level(LLM_SIMD_AVX512_DOT);
	return (LlmSimdLevel) level;
}

LlmGemvInput
llm_gemv_input(LlmWeightFormat fmt)
{
	llm_simd_level();
	return kernels[fmt].input;
}

/* ---- the product ------------------------------------------------------------------------------ */

/*
 * Shares of a product's panels per thread. One each made a thread that the OS preempted in its
 * share (a busy machine) hold up the whole step until it ran again; with four, the others take
 * the rest. Decode of GPT-2 small at load 3.7-4.4 on the 2-core Zen 3 machine, 2 threads, batch
 * runner off: int8 58 / 47 -> 82 / 75 tok/s, int4 76 / 69 -> 91 / 93 (two rounds each).
 */
#define GEMV_SHARES 4

/* out[rows r0.., panel p's columns] (+)= acc + bias; full panels in loops of fixed length (vectorised) */
static void
store(const Gemv *g, size_t p, size_t r0, int nr, float (*acc)[NR])
{
	size_t		o0 = p * NR,
				n = Min(NR, g->OC - o0);
	float		bias[NR] = {0};

	if (g->bias)
		memcpy(bias, g->bias + o0, n * sizeof(float));
	for (int r = 0; r < nr; r++)
	{
		float	   *y = g->out + (r0 + r) * g->OC + o0;

		if (n == NR && g->accumulate)
			for (size_t c = 0; c < NR; c++)
				y[c] += acc[r][c] + bias[c];
		else if (n == NR)
			for (size_t c = 0; c < NR; c++)
				y[c] = acc[r][c] + bias[c];
		else
			for (size_t c = 0; c < n; c++)
				y[c] = (g->accumulate ? y[c] : 0.0f) + (acc[r][c] + bias[c]);
	}
}

/*
 * The panels [start, end) for all rows. Rows go in blocks of ROW_BLOCK, each block over all the
 * thread's panels: a block's activations stay in L2 while the panels stream past (a panel is
 * re-read from memory once per block); within a panel, the kernel's groups of rows re-read it
 * from L1/L2.
 */
static void
gemv_task(void *arg, size_t start, size_t end)
{
	const Gemv *g = arg;
	float		acc[ROW_BLOCK][NR] __attribute__((aligned(64)));

	for (size_t b0 = 0; b0 < g->R; b0 += ROW_BLOCK)
	{
		int			nr = (int) Min((size_t) ROW_BLOCK, g->R - b0);

		for (size_t p = start; p < end; p++)
		{
			g->k.fn(g, g->w + p * g->panel, b0, nr, acc);
			store(g, p, b0, nr, acc);
		}
	}
}

void
llm_gemv(LlmWeightFormat fmt, float *out, const float *inp, const void *packed,
		 const float *bias, size_t R, size_t IC, size_t OC, bool accumulate, void *scratch)
{
	Gemv		g = {.out = out, .inp = inp, .w = packed, .bias = bias, .R = R, .IC = IC, .OC = OC,
					 .panel = panel_bytes(fmt, IC), .accumulate = accumulate};
	Q8Act		q8;

	if (R == 0 || OC == 0)
		return;
	llm_simd_level();
	g.k = kernels[fmt];
	if (g.k.input != LLM_GEMV_INPUT_F32)
	{
		g.k.prepare(scratch, inp, R, IC);
		q8 = q8_act(scratch, R, IC);
		g.act = g.k.input == LLM_GEMV_INPUT_Q8 ? (const void *) &q8 : scratch;
	}
	llm_parallel_for_shares(n_panels(OC), GEMV_SHARES, gemv_task, &g);
}
