/*
 * gemv.c: matrix-vector products over packed weights (see gemv.h), float32, bfloat16 and int8.
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
 *         q in [-127, 127], as llama.cpp's Q8_0 (blocks of 32 inputs, fp16 scale).
 * Each panel is 64-byte aligned when the packed matrix is. A change to any of this must bump
 * LLM_WEIGHTS_LAYOUT (gemv.h): packed copies may outlive the code that wrote them.
 *
 * Kernels. A kernel computes a panel's 32 outputs for up to `mr` rows at once: per input, the
 * panel's weights are loaded once and multiplied into every row's accumulators (registers), so
 * the weights are read from memory once per call and from L1/L2 for further groups of rows.
 * Per format there are four levels (gemv.h): plain C, AVX2, AVX-512 converting weights to float32
 * in registers, and AVX-512 with the dot-product instructions, where bf16 rounds the activations
 * to bf16 pairs (vdpbf16ps) and int8 quantises them per block of 32 (vpdpbusd, unsigned weights
 * times signed activations, corrected by -128 * sum(activations) per block). The level is picked
 * from the CPU at run time (GCC target attributes + __builtin_cpu_supports), never from the build
 * machine; PG_LLM_SIMD or llm_simd_set_level lowers it.
 *
 * Each row's arithmetic is the same whatever R and the other rows are (rows never mix), so a
 * batch gives each sequence the result it would get alone.
 */
#include "compute/gemv.h"
#include "compute/kernels.h"
#include "compute/pool.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define Min(x, y) ((x) < (y) ? (x) : (y))


#if defined(__x86_64__) && defined(__GNUC__)
#define LLM_GEMV_X86 1
#include <immintrin.h>
#endif

#define NR LLM_WEIGHTS_PANEL		/* output columns per panel */
#define QK 32					/* inputs per int8 block */
#define Q8_BLOCK (NR * 2 + NR * QK) /* bytes of a block: 32 fp16 scales, 32x32 weights */
#define MR_MAX 12				/* most rows any kernel takes at once */
/*
 * With several rows, a panel's multiply-adds take as long as its reads, and the hardware's
 * prefetch alone let the reads stall meanwhile: the AVX-512 kernels then prefetch this far ahead
 * in the weights. Products of GPT-2 small, 2 threads, best of 6 interleaved runs: float32 8 rows
 * 8.2 -> 6.4 ms, 16 rows 12.1 -> 10.2; bfloat16 (dot) 8 rows 4.9 -> 3.4, 16 rows 6.9 -> 5.7;
 * int8 (dot) 8 rows 4.2 -> 2.9, 16 rows 6.3 -> 5.2 (bench/kernels.c). One row keeps the plain loop.
 */
#define PREFETCH_BYTES 8192
#define ROW_BLOCK 96			/* rows per pass over the weights: 96 x 3072 float32 inputs fit L2 */

/* ---- scalar conversions ----------------------------------------------------------------------- */

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

static inline float
bf16_float(uint16_t h)
{
	return bits_float((uint32_t) h << 16);
}

static float
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

/* ---- layout ----------------------------------------------------------------------------------- */

static inline size_t
n_panels(size_t OC)
{
	return (OC + NR - 1) / NR;
}

static inline size_t
n_blocks(size_t IC)
{
	return (IC + QK - 1) / QK;
}

static inline size_t
even(size_t n)
{
	return (n + 1) & ~(size_t) 1;
}

static size_t
panel_bytes(LlmWeightFormat fmt, size_t IC)
{
	switch (fmt)
	{
		case LLM_WEIGHTS_F32:
			return IC * NR * sizeof(float);
		case LLM_WEIGHTS_BF16:
			return even(IC) * NR * sizeof(uint16_t);
		case LLM_WEIGHTS_Q8:
			return n_blocks(IC) * Q8_BLOCK;
	}
	return 0;
}

size_t
llm_weights_packed_size(LlmWeightFormat fmt, size_t IC, size_t OC)
{
	return n_panels(OC) * panel_bytes(fmt, IC);
}

/* byte offset, within a Q8 block, of input k (0..31) of column c */
static inline size_t
q8_index(size_t k, size_t c)
{
	return NR * 2 + (k / 4) * NR * 4 + c * 4 + k % 4;
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
				for (size_t i = 0; i < even(j->IC); i++)
					for (size_t c = 0; c < NR; c++)
						((uint16_t *) dst)[(i / 2) * NR * 2 + c * 2 + i % 2] = bf16_round(source(j, i, o0 + c));
				break;
			case LLM_WEIGHTS_Q8:
				for (size_t b = 0; b < n_blocks(j->IC); b++)
					pack_q8_block(j, dst + b * Q8_BLOCK, b, o0);
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
				{
					const uint8_t *blk = panel + (i / QK) * Q8_BLOCK;
					uint16_t	h;

					memcpy(&h, blk + c * 2, sizeof(h));
					dst[i] = fp16_float(h) * (float) ((int) blk[q8_index(i % QK, c)] - 128);
				}
				break;
		}
	}
}

/* ---- activations in the kernels' forms (the AVX512_DOT level) ---------------------------------- */

/*
 * Q8 activations of R rows: per row and block of 32 inputs, q = round(x / d) with d = max|x| / 127
 * (int8, zero past IC), d as float32, and corr = -128 * sum(q), which turns the sum of
 * (q_w + 128) * q_x that vpdpbusd computes back into the sum of q_w * q_x.
 */
typedef struct Q8Act
{
	int8_t	   *q;				/* (R, nb * 32) */
	float	   *d;				/* (R, nb) */
	int32_t    *corr;			/* (R, nb) */
} Q8Act;

static Q8Act
q8_act(void *scratch, size_t R, size_t IC)
{
	size_t		nb = n_blocks(IC);
	Q8Act		a;

	a.q = scratch;
	a.d = (float *) ((char *) scratch + R * nb * QK);
	a.corr = (int32_t *) (a.d + R * nb);
	return a;
}

size_t
llm_gemv_scratch_size(LlmWeightFormat fmt, size_t R, size_t IC)
{
	switch (fmt)
	{
		case LLM_WEIGHTS_F32:
			return 0;
		case LLM_WEIGHTS_BF16:
			return R * even(IC) * sizeof(uint16_t);
		case LLM_WEIGHTS_Q8:
			return R * n_blocks(IC) * (QK + sizeof(float) + sizeof(int32_t));
	}
	return 0;
}

/* The quantisation loops vectorise (kernels.h's clones); results are the same on every clone. */
LLM_SIMD static void
quantise_q8(Q8Act a, const float *inp, size_t R, size_t IC)
{
	size_t		nb = n_blocks(IC);

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
			a.corr[r * nb + b] = -128 * sum;
		}
}

LLM_SIMD static void
round_bf16_pairs(uint16_t *dst, const float *inp, size_t R, size_t IC)
{
	size_t		IC2 = even(IC);

	for (size_t r = 0; r < R; r++)
	{
		for (size_t i = 0; i < IC; i++)
			dst[r * IC2 + i] = bf16_round(inp[r * IC + i]);
		if (IC2 > IC)
			dst[r * IC2 + IC] = 0;
	}
}

/* ---- kernels ---------------------------------------------------------------------------------- */

typedef struct Gemv Gemv;

/* acc[r][c] <- sum over inputs of row r0+r times the panel's column c, for nr <= mr rows */
typedef void (*panel_fn) (const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR]);

typedef enum Act
{
	ACT_F32,					/* the kernel reads inp as it is */
	ACT_BF16,					/* bf16 pairs in scratch */
	ACT_Q8						/* Q8Act in scratch */
} Act;

typedef struct Kernel
{
	panel_fn	fn;
	int			mr;				/* rows per call */
	Act			act;
} Kernel;

struct Gemv
{
	float	   *out;			/* (R, OC) */
	const float *inp;			/* (R, IC) */
	const uint8_t *w;
	const float *bias;			/* (OC) or NULL */
	const void *act;			/* activations in the kernel's form, or NULL */
	size_t		R,
				IC,
				OC,
				panel;			/* bytes per panel */
	bool		accumulate;
	Kernel		k;
};

/* Plain C, any CPU: loops over 32 columns that the compiler vectorises with the base ISA. */

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

static void
q8_portable(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	for (int r = 0; r < nr; r++)
	{
		const float *x = g->inp + (r0 + r) * g->IC;
		float		s[NR] = {0};

		for (size_t b = 0; b < n_blocks(g->IC); b++)
		{
			const uint8_t *blk = panel + b * Q8_BLOCK;
			size_t		n = Min(QK, g->IC - b * QK);
			float		d[NR];

			for (int c = 0; c < NR; c++)
			{
				uint16_t	h;

				memcpy(&h, blk + c * 2, sizeof(h));
				d[c] = fp16_float(h);
			}
			for (size_t k = 0; k < n; k++)
				for (int c = 0; c < NR; c++)
					s[c] += x[b * QK + k] * (d[c] * (float) ((int) blk[q8_index(k, c)] - 128));
		}
		memcpy(acc[r], s, sizeof(s));
	}
}

#ifdef LLM_GEMV_X86

#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define T_BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define T_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))

/* Calls body(g, panel, r0, acc, NR_ROWS) with the row count a compile-time constant. */
#define ROWS_2(body) \
	switch (nr) { case 1: body(g, panel, r0, acc, 1); break; default: body(g, panel, r0, acc, 2); break; }
#define ROWS_6(body) \
	switch (nr) { case 1: body(g, panel, r0, acc, 1); break; case 2: body(g, panel, r0, acc, 2); break; \
		case 3: body(g, panel, r0, acc, 3); break; case 4: body(g, panel, r0, acc, 4); break; \
		case 5: body(g, panel, r0, acc, 5); break; default: body(g, panel, r0, acc, 6); break; }
#define ROWS_8(body) \
	switch (nr) { case 1: body(g, panel, r0, acc, 1); break; case 2: body(g, panel, r0, acc, 2); break; \
		case 3: body(g, panel, r0, acc, 3); break; case 4: body(g, panel, r0, acc, 4); break; \
		case 5: body(g, panel, r0, acc, 5); break; case 6: body(g, panel, r0, acc, 6); break; \
		case 7: body(g, panel, r0, acc, 7); break; default: body(g, panel, r0, acc, 8); break; }

/* -- AVX2: a panel row is 4 vectors of 8, row r's accumulators a[r][0..3]; two rows at a time -- */

INLINE T_AVX2 void
acc2_zero(__m256 (*a)[4], const int nr)
{
	for (int r = 0; r < nr; r++)
		for (int v = 0; v < 4; v++)
			a[r][v] = _mm256_setzero_ps();
}

INLINE T_AVX2 void
acc2_store(float (*acc)[NR], __m256 (*a)[4], const int nr)
{
	for (int r = 0; r < nr; r++)
		for (int v = 0; v < 4; v++)
			_mm256_store_ps(acc[r] + 8 * v, a[r][v]);
}

INLINE T_AVX2 void
f32_avx2_rows(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], const int nr)
{
	const float *w = (const float *) panel;
	const float *x = g->inp + r0 * g->IC;
	size_t		IC = g->IC;
	__m256		a[2][4];

	acc2_zero(a, nr);
	for (size_t i = 0; i < IC; i++)
	{
		__m256		wv[4];

		for (int v = 0; v < 4; v++)
			wv[v] = _mm256_load_ps(w + i * NR + 8 * v);
		for (int r = 0; r < nr; r++)
		{
			__m256		xb = _mm256_broadcast_ss(x + r * IC + i);

			for (int v = 0; v < 4; v++)
				a[r][v] = _mm256_fmadd_ps(wv[v], xb, a[r][v]);
		}
	}
	acc2_store(acc, a, nr);
}

static T_AVX2 void
f32_avx2(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	ROWS_2(f32_avx2_rows);
}

/* inputs i, i+1 (none past an odd IC) of a bf16 panel into the rows' accumulators */
INLINE T_AVX2 void
bf16_avx2_pair(const __m256i *w, size_t i, const float *x, size_t IC, bool last_odd,
			   __m256 (*a)[4], const int nr)
{
	const __m256i hi_mask = _mm256_set1_epi32((int) 0xFFFF0000u);

	for (int v = 0; v < 4; v++)
	{
		__m256i		u = _mm256_load_si256(w + (i / 2) * 4 + v);
		__m256		lo = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)),
					hi = _mm256_castsi256_ps(_mm256_and_si256(u, hi_mask));

		for (int r = 0; r < nr; r++)
		{
			a[r][v] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(x + r * IC + i), a[r][v]);
			if (!last_odd)
				a[r][v] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(x + r * IC + i + 1), a[r][v]);
		}
	}
}

INLINE T_AVX2 void
bf16_avx2_rows(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], const int nr)
{
	const __m256i *w = (const __m256i *) panel;
	const float *x = g->inp + r0 * g->IC;
	size_t		IC = g->IC,
				i;
	__m256		a[2][4];

	acc2_zero(a, nr);
	for (i = 0; i + 1 < IC; i += 2)
		bf16_avx2_pair(w, i, x, IC, false, a, nr);
	if (i < IC)
		bf16_avx2_pair(w, i, x, IC, true, a, nr);
	acc2_store(acc, a, nr);
}

static T_AVX2 void
bf16_avx2(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	ROWS_2(bf16_avx2_rows);
}

/*
 * Q8 without int8 dot products: each weight becomes scale * q in float32 (the value
 * llm_weights_column returns), then as float32. q is a byte of a 32-bit lane: xor 0x80 makes
 * it signed, a left and an arithmetic right shift extend it.
 */
INLINE T_AVX2 __m256
q8_weights_avx2(__m256i u, int k, __m256 d)
{
	__m256i		q = _mm256_srai_epi32(_mm256_slli_epi32(u, 24 - 8 * k), 24);

	return _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
}

INLINE T_AVX2 void
q8_avx2_rows(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], const int nr)
{
	const float *x = g->inp + r0 * g->IC;
	size_t		IC = g->IC;
	const __m256i flip = _mm256_set1_epi8((char) 0x80);
	__m256		a[2][4];

	acc2_zero(a, nr);
	for (size_t b = 0; b < n_blocks(IC); b++)
	{
		const uint8_t *blk = panel + b * Q8_BLOCK;
		size_t		n = Min(QK, IC - b * QK);

		for (int v = 0; v < 4; v++)
		{
			__m256		d = _mm256_cvtph_ps(_mm_load_si128((const __m128i *) (blk + 16 * v)));

			for (size_t k = 0; k < n; k++)
			{
				__m256i		u = _mm256_xor_si256(_mm256_load_si256((const __m256i *) (blk + q8_index(k & ~3, 8 * v))), flip);
				__m256		wv = q8_weights_avx2(u, (int) (k & 3), d);

				for (int r = 0; r < nr; r++)
					a[r][v] = _mm256_fmadd_ps(wv, _mm256_broadcast_ss(x + r * IC + b * QK + k), a[r][v]);
			}
		}
	}
	acc2_store(acc, a, nr);
}

static T_AVX2 void
q8_avx2(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	ROWS_2(q8_avx2_rows);
}

/* -- AVX-512: a panel row is 2 vectors of 16; row r's accumulators are a0[r], a1[r] -- */

INLINE T_AVX512 void
acc_zero(__m512 *a0, __m512 *a1, const int nr)
{
	for (int r = 0; r < nr; r++)
		a0[r] = a1[r] = _mm512_setzero_ps();
}

INLINE T_AVX512 void
acc_store(float (*acc)[NR], const __m512 *a0, const __m512 *a1, const int nr)
{
	for (int r = 0; r < nr; r++)
	{
		_mm512_store_ps(acc[r], a0[r]);
		_mm512_store_ps(acc[r] + 16, a1[r]);
	}
}

/* Prefetches `lines` cache lines from p + PREFETCH_BYTES (never faults, even past the weights). */
INLINE T_AVX512 void
prefetch_ahead(const void *p, const int lines)
{
	for (int k = 0; k < lines; k++)
		_mm_prefetch((const char *) p + PREFETCH_BYTES + 64 * k, _MM_HINT_T0);
}

INLINE T_AVX512 void
f32_avx512_rows(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], const int nr)
{
	const float *w = (const float *) panel;
	const float *x = g->inp + r0 * g->IC;
	size_t		IC = g->IC;
	__m512		a0[MR_MAX],
				a1[MR_MAX];

	acc_zero(a0, a1, nr);
	for (size_t i = 0; i < IC; i++)
	{
		__m512		w0 = _mm512_load_ps(w + i * NR),
					w1 = _mm512_load_ps(w + i * NR + 16);

		if (nr > 1)
			prefetch_ahead(w + i * NR, 2);
		for (int r = 0; r < nr; r++)
		{
			__m512		xb = _mm512_set1_ps(x[r * IC + i]);

			a0[r] = _mm512_fmadd_ps(w0, xb, a0[r]);
			a1[r] = _mm512_fmadd_ps(w1, xb, a1[r]);
		}
	}
	acc_store(acc, a0, a1, nr);
}

static T_AVX512 void
f32_avx512(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	ROWS_8(f32_avx512_rows);
}

/* inputs i, i+1 (x1 = 0 past an odd IC) of a bf16 panel into rows' accumulators */
INLINE T_AVX512 void
bf16_avx512_pair(const __m512i *w, size_t i, const float *x, size_t IC, bool last_odd,
				 __m512 *a0, __m512 *a1, const int nr)
{
	const __m512i hi_mask = _mm512_set1_epi32((int) 0xFFFF0000u);
	__m512i		u0 = _mm512_load_si512(w + i),
				u1 = _mm512_load_si512(w + i + 1);
	__m512		lo0 = _mm512_castsi512_ps(_mm512_slli_epi32(u0, 16)),
				hi0 = _mm512_castsi512_ps(_mm512_and_si512(u0, hi_mask)),
				lo1 = _mm512_castsi512_ps(_mm512_slli_epi32(u1, 16)),
				hi1 = _mm512_castsi512_ps(_mm512_and_si512(u1, hi_mask));

	for (int r = 0; r < nr; r++)
	{
		__m512		x0 = _mm512_set1_ps(x[r * IC + i]);

		a0[r] = _mm512_fmadd_ps(lo0, x0, a0[r]);
		a1[r] = _mm512_fmadd_ps(lo1, x0, a1[r]);
		if (!last_odd)
		{
			__m512		x1 = _mm512_set1_ps(x[r * IC + i + 1]);

			a0[r] = _mm512_fmadd_ps(hi0, x1, a0[r]);
			a1[r] = _mm512_fmadd_ps(hi1, x1, a1[r]);
		}
	}
}

INLINE T_AVX512 void
bf16_avx512_rows(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], const int nr)
{
	const __m512i *w = (const __m512i *) panel;
	const float *x = g->inp + r0 * g->IC;
	size_t		IC = g->IC,
				i;
	__m512		a0[MR_MAX],
				a1[MR_MAX];

	acc_zero(a0, a1, nr);
	for (i = 0; i + 1 < IC; i += 2)
		bf16_avx512_pair(w, i, x, IC, false, a0, a1, nr);
	if (i < IC)
		bf16_avx512_pair(w, i, x, IC, true, a0, a1, nr);
	acc_store(acc, a0, a1, nr);
}

static T_AVX512 void
bf16_avx512(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	ROWS_8(bf16_avx512_rows);
}

INLINE T_AVX512 __m512
q8_weights_avx512(__m512i u, int k, __m512 d)
{
	__m512i		q = _mm512_srai_epi32(_mm512_slli_epi32(u, 24 - 8 * k), 24);

	return _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
}

INLINE T_AVX512 void
q8_avx512_rows(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], const int nr)
{
	const float *x = g->inp + r0 * g->IC;
	size_t		IC = g->IC;
	const __m512i flip = _mm512_set1_epi8((char) 0x80);
	__m512		a0[MR_MAX],
				a1[MR_MAX];

	acc_zero(a0, a1, nr);
	for (size_t b = 0; b < n_blocks(IC); b++)
	{
		const uint8_t *blk = panel + b * Q8_BLOCK;
		size_t		n = Min(QK, IC - b * QK);
		__m512		d0 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) blk)),
					d1 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) (blk + 32)));

		for (size_t k = 0; k < n; k++)
		{
			const uint8_t *grp = blk + q8_index(k & ~3, 0);
			__m512		w0 = q8_weights_avx512(_mm512_xor_si512(_mm512_load_si512(grp), flip), (int) (k & 3), d0),
						w1 = q8_weights_avx512(_mm512_xor_si512(_mm512_load_si512(grp + 64), flip), (int) (k & 3), d1);

			for (int r = 0; r < nr; r++)
			{
				__m512		xb = _mm512_set1_ps(x[r * IC + b * QK + k]);

				a0[r] = _mm512_fmadd_ps(w0, xb, a0[r]);
				a1[r] = _mm512_fmadd_ps(w1, xb, a1[r]);
			}
		}
	}
	acc_store(acc, a0, a1, nr);
}

static T_AVX512 void
q8_avx512(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	ROWS_8(q8_avx512_rows);
}

/* -- AVX-512 dot products: vdpbf16ps on bf16 pairs, vpdpbusd on Q8 blocks -- */

INLINE T_BF16 void
bf16_dot_rows(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], const int nr)
{
	const __m512i *w = (const __m512i *) panel;
	size_t		IC2 = even(g->IC);
	const uint32_t *x = (const uint32_t *) ((const uint16_t *) g->act + r0 * IC2);
	__m512		a0[MR_MAX],
				a1[MR_MAX];

	acc_zero(a0, a1, nr);
	for (size_t i = 0; i < IC2 / 2; i++)
	{
		__m512bh	w0 = (__m512bh) _mm512_load_si512(w + 2 * i),
					w1 = (__m512bh) _mm512_load_si512(w + 2 * i + 1);

		if (nr > 1)
			prefetch_ahead(w + 2 * i, 2);
		for (int r = 0; r < nr; r++)
		{
			__m512bh	xb = (__m512bh) _mm512_set1_epi32((int) x[r * IC2 / 2 + i]);

			a0[r] = _mm512_dpbf16_ps(a0[r], w0, xb);
			a1[r] = _mm512_dpbf16_ps(a1[r], w1, xb);
		}
	}
	acc_store(acc, a0, a1, nr);
}

static T_BF16 void
bf16_dot(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	ROWS_8(bf16_dot_rows);
}

INLINE T_VNNI void
q8_dot_rows(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], const int nr)
{
	size_t		nb = n_blocks(g->IC);
	const Q8Act *act = g->act;
	__m512		a0[MR_MAX],
				a1[MR_MAX];

	acc_zero(a0, a1, nr);
	for (size_t b = 0; b < nb; b++)
	{
		const uint8_t *blk = panel + b * Q8_BLOCK;
		__m512		d0 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) blk)),
					d1 = _mm512_cvtph_ps(_mm256_load_si256((const __m256i *) (blk + 32)));
		__m512i		s0[MR_MAX],
					s1[MR_MAX];

		for (int r = 0; r < nr; r++)
			s0[r] = s1[r] = _mm512_set1_epi32(act->corr[(r0 + r) * nb + b]);
		for (int k = 0; k < QK; k += 4)
		{
			__m512i		w0 = _mm512_load_si512(blk + q8_index(k, 0)),
						w1 = _mm512_load_si512(blk + q8_index(k, 16));
			/* the two lines of this k's weights, and at k = 0 the line of scales before them */
			if (nr > 1)
				prefetch_ahead(blk + q8_index(k, 0) - (k == 0 ? NR * 2 : 0), k == 0 ? 3 : 2);

			for (int r = 0; r < nr; r++)
			{
				int32_t		xq;
				__m512i		xb;

				memcpy(&xq, act->q + ((r0 + r) * nb + b) * QK + k, sizeof(xq));
				xb = _mm512_set1_epi32(xq);
				s0[r] = _mm512_dpbusd_epi32(s0[r], w0, xb);
				s1[r] = _mm512_dpbusd_epi32(s1[r], w1, xb);
			}
		}
		for (int r = 0; r < nr; r++)
		{
			__m512		dx = _mm512_set1_ps(act->d[(r0 + r) * nb + b]);

			a0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0[r]), _mm512_mul_ps(d0, dx), a0[r]);
			a1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1[r]), _mm512_mul_ps(d1, dx), a1[r]);
		}
	}
	acc_store(acc, a0, a1, nr);
}

static T_VNNI void
q8_dot(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	ROWS_6(q8_dot_rows);
}

#endif							/* LLM_GEMV_X86 */

/* ---- dispatch --------------------------------------------------------------------------------- */

static const char *const level_names[] = {"portable", "avx2", "avx512", "avx512dot"};

static int	level = -1;			/* in use; -1 until the first call */
static Kernel kernels[3];		/* per format, for `level` */

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
	Kernel		f32 = {f32_portable, 1, ACT_F32},
				bf16 = {bf16_portable, 1, ACT_F32},
				q8 = {q8_portable, 1, ACT_F32};

#ifdef LLM_GEMV_X86
	if (l >= LLM_SIMD_AVX2)
	{
		f32 = (Kernel) {f32_avx2, 2, ACT_F32};
		bf16 = (Kernel) {bf16_avx2, 2, ACT_F32};
		q8 = (Kernel) {q8_avx2, 2, ACT_F32};
	}
	if (l >= LLM_SIMD_AVX512)
	{
		f32 = (Kernel) {f32_avx512, 8, ACT_F32};
		bf16 = (Kernel) {bf16_avx512, 8, ACT_F32};
		q8 = (Kernel) {q8_avx512, 8, ACT_F32};
	}
	if (l >= LLM_SIMD_AVX512_DOT && __builtin_cpu_supports("avx512bf16"))
		bf16 = (Kernel) {bf16_dot, 8, ACT_BF16};
	if (l >= LLM_SIMD_AVX512_DOT && __builtin_cpu_supports("avx512vnni"))
		q8 = (Kernel) {q8_dot, 6, ACT_Q8};
#endif
	kernels[LLM_WEIGHTS_F32] = f32;
	kernels[LLM_WEIGHTS_BF16] = bf16;
	kernels[LLM_WEIGHTS_Q8] = q8;
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

/* ---- the product ------------------------------------------------------------------------------ */

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
 * re-read from memory once per block); within a panel, groups of mr rows re-read it from L1/L2.
 */
static void
gemv_task(void *arg, size_t start, size_t end)
{
	const Gemv *g = arg;
	float		acc[MR_MAX][NR] __attribute__((aligned(64)));

	for (size_t b0 = 0; b0 < g->R; b0 += ROW_BLOCK)
		for (size_t p = start; p < end; p++)
			for (size_t r0 = b0; r0 < Min(b0 + ROW_BLOCK, g->R); r0 += g->k.mr)
			{
				int			nr = (int) Min((size_t) g->k.mr, Min(b0 + ROW_BLOCK, g->R) - r0);

				g->k.fn(g, g->w + p * g->panel, r0, nr, acc);
				store(g, p, r0, nr, acc);
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
	if (g.k.act == ACT_BF16)
	{
		round_bf16_pairs(scratch, inp, R, IC);
		g.act = scratch;
	}
	else if (g.k.act == ACT_Q8)
	{
		q8 = q8_act(scratch, R, IC);
		quantise_q8(q8, inp, R, IC);
		g.act = &q8;
	}
	llm_parallel_for(n_panels(OC), gemv_task, &g);
}
