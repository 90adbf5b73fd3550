/*
 * gemv_avx512.c: the AVX-512 kernels (gemv_kernels.h), for the levels LLM_SIMD_AVX512 (F, BW,
 * VL, DQ: bfloat16 and int8 weights converted to float32 in registers, activations float32) and
 * LLM_SIMD_AVX512_DOT (vdpbf16ps on bf16 pairs where the CPU has AVX512_BF16, vpdpbusd on int8
 * blocks where it has AVX512_VNNI). int4 runs gemv_avx2.c's kernel at both levels.
 *
 * A panel row is 2 vectors of 16 columns; a kernel takes up to 8 rows (6 for vpdpbusd) at once,
 * with the row count a compile-time constant, and loops over groups of them. Compiled with
 * target attributes, so the file builds for any x86-64; gemv.c calls it only where the CPU has
 * AVX-512.
 */
#include "compute/gemv_kernels.h"

#ifdef LLM_GEMV_X86

#include <immintrin.h>

#define T_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define T_BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define T_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define INLINE static inline __attribute__((always_inline))

#define MR_MAX 8				/* most rows a kernel takes at once */

/*
 * With several rows, a panel's multiply-adds take as long as its reads, and the hardware's
 * prefetch alone let the reads stall meanwhile: the kernels then prefetch this far ahead in the
 * weights. Products of GPT-2 small, 2 threads, best of 6 interleaved runs: float32 8 rows
 * 8.2 -> 6.4 ms, 16 rows 12.1 -> 10.2; bfloat16 (dot) 8 rows 4.9 -> 3.4, 16 rows 6.9 -> 5.7;
 * int8 (dot) 8 rows 4.2 -> 2.9, 16 rows 6.3 -> 5.2 (bench/kernels.c). One row keeps the plain loop.
 */
#define PREFETCH_BYTES 8192

/* Runs body(g, panel, r, acc + i, N) over the nr rows in groups of 6 or 8, N a compile-time constant. */
#define ROWS_6(body) \
	for (int i = 0; i < nr; i += 6) { size_t r = r0 + i; float (*a)[NR] = acc + i; \
	switch (Min(nr - i, 6)) { case 1: body(g, panel, r, a, 1); break; case 2: body(g, panel, r, a, 2); break; \
		case 3: body(g, panel, r, a, 3); break; case 4: body(g, panel, r, a, 4); break; \
		case 5: body(g, panel, r, a, 5); break; default: body(g, panel, r, a, 6); break; } }
#define ROWS_8(body) \
	for (int i = 0; i < nr; i += 8) { size_t r = r0 + i; float (*a)[NR] = acc + i; \
	switch (Min(nr - i, 8)) { case 1: body(g, panel, r, a, 1); break; case 2: body(g, panel, r, a, 2); break; \
		case 3: body(g, panel, r, a, 3); break; case 4: body(g, panel, r, a, 4); break; \
		case 5: body(g, panel, r, a, 5); break; case 6: body(g, panel, r, a, 6); break; \
		case 7: body(g, panel, r, a, 7); break; default: body(g, panel, r, a, 8); break; } }

/* -- weights converted to float32: row r's accumulators are a0[r], a1[r] -- */

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
	for (size_t b = 0; b < gemv_blocks(IC); b++)
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
	size_t		IC2 = gemv_even(g->IC);
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
bf16_dot_kernel(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	ROWS_8(bf16_dot_rows);
}

INLINE T_VNNI void
q8_dot_rows(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], const int nr)
{
	size_t		nb = gemv_blocks(g->IC);
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
			s0[r] = s1[r] = _mm512_set1_epi32(-128 * act->sum[(r0 + r) * nb + b]);
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


static T_AVX512 void
quantise_avx512(void *scratch, const float *inp, size_t R, size_t IC)
{
	gemv_quantise_q8(scratch, inp, R, IC);
}

static T_AVX512 void
round_bf16_avx512(void *scratch, const float *inp, size_t R, size_t IC)
{
	gemv_round_bf16_pairs(scratch, inp, R, IC);
}

void
llm_gemv_kernels_avx512(Kernel *k, bool bf16_dot, bool int8_dot)
{
	k[LLM_WEIGHTS_F32] = (Kernel) {f32_avx512, LLM_GEMV_INPUT_F32, NULL};
	k[LLM_WEIGHTS_BF16] = bf16_dot ? (Kernel) {bf16_dot_kernel, LLM_GEMV_INPUT_BF16, round_bf16_avx512} : (Kernel) {bf16_avx512, LLM_GEMV_INPUT_F32, NULL};
	k[LLM_WEIGHTS_Q8] = int8_dot ? (Kernel) {q8_dot, LLM_GEMV_INPUT_Q8, quantise_avx512} : (Kernel) {q8_avx512, LLM_GEMV_INPUT_F32, NULL};
}

#endif							/* LLM_GEMV_X86 */
