/*
 * gemv_kernels.h: what gemv.c (layout, packing, dispatch, the product) shares with its kernels,
 * which live one file per instruction set: gemv_portable.c (plain C, any CPU), gemv_avx2.c
 * (AVX2 + FMA + F16C) and gemv_avx512.c (AVX-512, with and without its dot products). Each file
 * fills the kernel table of its level; gemv.c picks the level from the CPU and pg_llm.simd.
 *
 * A kernel computes one panel's NR output columns for rows [r0, r0 + nr) of the product (nr up
 * to ROW_BLOCK): acc[r][c] <- the sum over the inputs of row r0 + r times column c. Within a row
 * the arithmetic is fixed by the format and the activations' form, never by nr or by the other
 * rows: each column is one float32 accumulator that takes the inputs in order (float32, bfloat16:
 * one fused multiply-add per input; int8, int4: one per block of 32 inputs, over the block's exact
 * integer sum), so kernels of different row counts, and every level that takes the activations
 * in the same form, give bitwise the same results.
 */
#ifndef LLM_GEMV_KERNELS_H
#define LLM_GEMV_KERNELS_H

#include "compute/gemv.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

#ifndef Min
#define Min(x, y) ((x) < (y) ? (x) : (y))
#endif

#define NR LLM_WEIGHTS_PANEL	/* output columns per panel */
#define QK 32					/* inputs per int8 / int4 block */
#define Q8_BLOCK (NR * 2 + NR * QK) /* bytes of a Q8 block: 32 fp16 scales, 32x32 weights */
#define Q4_BLOCK (NR * 2 + NR * QK / 2) /* bytes of a Q4 block: 32 fp16 scales, 32x32 nibbles */
#define Q6_BLOCK (NR * 2 + NR * QK * 3 / 4) /* bytes of a Q6 block: 32 fp16 scales, 32x32 6-bit codes */
#define ROW_BLOCK 96			/* rows per pass over the weights: 96 x 3072 float32 inputs fit L2 */

typedef struct Gemv Gemv;

/* acc[r][c] <- sum over inputs of row r0+r times the panel's column c, for nr <= ROW_BLOCK rows */
typedef void (*panel_fn) (const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR]);

/*
 * Activations quantised per row and block of 32 inputs (int8 and int4 kernels): q = round(x / d)
 * with d = max|x| / 127 (int8, zero past IC), d as float32, and sum = the sum of the block's q,
 * which turns a sum over unsigned weights u = q_w + offset back into the sum over q_w
 * (sum u q = sum q_w q + offset * sum q).
 */
typedef struct Q8Act
{
	int8_t	   *q;				/* (R, nb * 32) */
	float	   *d;				/* (R, nb) */
	int32_t    *sum;			/* (R, nb) */
} Q8Act;

/* scratch <- the R rows of inp (R, IC) in a kernel's form (llm_gemv_scratch_size bytes) */
typedef void (*prepare_fn) (void *scratch, const float *inp, size_t R, size_t IC);

typedef struct Kernel
{
	panel_fn	fn;
	LlmGemvInput input;			/* the activations' form the kernel takes */
	prepare_fn	prepare;		/* what puts them in that form; NULL for float32 */
} Kernel;

struct Gemv
{
	float	   *out;			/* (R, OC) */
	const float *inp;			/* (R, IC) */
	const uint8_t *w;
	const float *bias;			/* (OC) or NULL */
	const void *act;			/* activations in the kernel's form (uint16_t bf16 pairs, Q8Act), or NULL */
	size_t		R,
				IC,
				OC,
				panel;			/* bytes per panel */
	bool		accumulate;
	Kernel		k;
};

static inline size_t
gemv_blocks(size_t IC)
{
	return (IC + QK - 1) / QK;
}

static inline size_t
gemv_even(size_t n)
{
	return (n + 1) & ~(size_t) 1;
}

/* byte offset, within a Q8 block, of input k (0..31) of column c: [8 groups of 4][32 columns][4] */
static inline size_t
q8_index(size_t k, size_t c)
{
	return NR * 2 + (k / 4) * NR * 4 + c * 4 + k % 4;
}

/*
 * byte offset, within a Q4 block, of the byte that holds input k (0..31) of column c, in its low
 * nibble for k < 16, its high one for k >= 16: the 512 bytes are the Q8 operand layout of inputs
 * 0..15 (4 groups of 4 inputs x 32 columns x 4 bytes), inputs 16..31 in the high nibbles.
 */
static inline size_t
q4_index(size_t k, size_t c)
{
	return NR * 2 + ((k % 16) / 4) * NR * 4 + c * 4 + k % 4;
}

/*
 * A Q6 block (after its 64 bytes of scales): for g = 0, 1 and each vector v = 0..3 of 8 columns, 96
 * bytes that the AVX2 kernel reads in order: 32 bytes of low nibbles in Q8's operand layout
 * (column 8 v + i, input 4 g + j at i * 4 + j) holding the low 4 bits of the codes u = q + 32 of
 * inputs 4 g + j (low nibble) and 16 + 4 g + j (high); 32 bytes the same for inputs 8 + 4 g + j
 * and 24 + 4 g + j; then 32 bytes of the four codes' top 2 bits (bits 0-1, 2-3, 4-5, 6-7 in that
 * order). Returns the offset of input k's low bits of column c; *top the offset of its top
 * bits, *shift their place there (the low bits' place is 0 for k < 16, 4 for k >= 16).
 */
static inline size_t
q6_index(size_t k, size_t c, size_t *top, int *shift)
{
	size_t		high = k / 16,
				second = (k % 16) / 8,	/* the second 32 bytes */
				g = (k % 8) / 4,
				base = NR * 2 + (g * 4 + c / 8) * 96,
				at = (c % 8) * 4 + k % 4;

	*top = base + 64 + at;
	*shift = (int) (second * 4 + high * 2);
	return base + second * 32 + at;
}

/* the weight q of input k (0..31) of column c in a block of each integer format (times its scale) */
static inline int
q8_weight(const uint8_t *blk, size_t k, size_t c)
{
	return (int) blk[q8_index(k, c)] - 128;
}

static inline int
q4_weight(const uint8_t *blk, size_t k, size_t c)
{
	return (int) ((blk[q4_index(k, c)] >> (k < 16 ? 0 : 4)) & 0xF) - 8;
}

static inline int
q6_weight(const uint8_t *blk, size_t k, size_t c)
{
	size_t		top;
	int			shift;
	size_t		at = q6_index(k, c, &top, &shift);

	return (((blk[at] >> (k < 16 ? 0 : 4)) & 0xF) | (((blk[top] >> shift) & 3) << 4)) - 32;
}

static inline Q8Act
q8_act(const void *scratch, size_t R, size_t IC)
{
	size_t		nb = gemv_blocks(IC);
	Q8Act		a;

	a.q = (int8_t *) scratch;
	a.d = (float *) ((char *) scratch + R * nb * QK);
	a.sum = (int32_t *) (a.d + R * nb);
	return a;
}

static inline uint32_t
float_bits(float f)
{
	uint32_t	u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

static inline float
bits_float(uint32_t u)
{
	float		f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

/* bfloat16 of f, rounded to nearest even; NaN stays NaN. */
static inline uint16_t
bf16_round(float f)
{
	uint32_t	u = float_bits(f);

	if ((u & 0x7FFFFFFF) > 0x7F800000)
		return (uint16_t) ((u >> 16) | 0x40);
	return (uint16_t) ((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/*
 * The activations' forms (llm_gemv calls the kernel's prepare). The bodies are inlined into a
 * function of each level's file, where the loops vectorise for its instruction set; every level
 * gives the same bits (an exact maximum, one rounding per value, integer sums).
 */
static inline __attribute__((always_inline)) void
gemv_quantise_q8(void *scratch, const float *inp, size_t R, size_t IC)
{
	size_t		nb = gemv_blocks(IC);
	Q8Act		a = q8_act(scratch, R, IC);

	for (size_t r = 0; r < R; r++)
		for (size_t b = 0; b < nb; b++)
		{
			const float *x = inp + r * IC + b * QK;
			size_t		n = Min(QK, IC - b * QK);
			int8_t	   *q = a.q + (r * nb + b) * QK;
			float		amax = 0.0f,
						d;
			int32_t		sum = 0;

			for (size_t k = 0; k < n; k++)
				amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
			d = amax / 127.0f;
			for (size_t k = 0; k < QK; k++)
			{
				int			v = (k < n && d > 0.0f) ? (int) nearbyintf(x[k] / d) : 0;

				q[k] = (int8_t) v;
				sum += v;
			}
			a.d[r * nb + b] = d;
			a.sum[r * nb + b] = sum;
		}
}

static inline __attribute__((always_inline)) void
gemv_round_bf16_pairs(void *scratch, const float *inp, size_t R, size_t IC)
{
	uint16_t   *dst = scratch;
	size_t		IC2 = gemv_even(IC);

	for (size_t r = 0; r < R; r++)
	{
		for (size_t i = 0; i < IC; i++)
			dst[r * IC2 + i] = bf16_round(inp[r * IC + i]);
		if (IC2 > IC)
			dst[r * IC2 + IC] = 0;
	}
}

/* fp16 -> float32 of the scales, exactly (any level: F16C and the portable code agree) */
static inline float
fp16_float(uint16_t h)
{
	uint32_t	e = (h >> 10) & 0x1F,
				m = h & 0x3FF;
	float		f;

	if (e == 0)
		f = ldexpf((float) m, -24);		/* zero or subnormal */
	else if (e == 31)
		f = m ? NAN : INFINITY;
	else
		f = bits_float(((e + 112) << 23) | (m << 13));
	return (h & 0x8000) ? -f : f;
}


/* The kernels of each level: each fills kernels[fmt] for the formats it has (gemv.c calls them
 * from the lowest level up to the one in use, so a level inherits what it does not replace). */
extern void llm_gemv_kernels_portable(Kernel *kernels);

#if defined(__x86_64__) && defined(__GNUC__)
#define LLM_GEMV_X86 1
extern void llm_gemv_kernels_avx2(Kernel *kernels);
extern void llm_gemv_kernels_avx512(Kernel *kernels, bool bf16_dot, bool int8_dot);
#endif

#endif							/* LLM_GEMV_KERNELS_H */
