/*
 * gemv_test.c: checks ext/src/compute/gemv.c against plain references, every format at every SIMD level
 * this CPU runs (run by tests/test_gemv.py, linked with the extension's own gemv*.o and
 * parallel.o). Prints one line per level and "ok"; exits 1 at the first failure, saying where.
 *
 * What is checked, on odd shapes (IC, OC not multiples of 32 nor of the vector width) and
 * R = 1, 2, 3, 8, 17, 64, 200:
 *  - the packed weights read back (llm_weights_column): float32 exactly, bfloat16 exactly the
 *    round-to-nearest-even of the weights, int8 within half a block scale of them, the scale at
 *    most 2^-10 above max|w| / 127 of its block (normal range: fp16 rounded up); int4 (6-bit) as
 *    d * q, q an integer in [-8, 7] ([-32, 31]), each block's squared error at most that of the
 *    scale fp16(m / -8) (m / -32), m the block's weight of largest magnitude (llama.cpp's Q4_0);
 *  - llm_gemv against a double-precision reference over those read-back weights, with the
 *    activations as the level's kernel takes them (llm_gemv_input: float32, bf16-rounded, or
 *    quantised per block of 32): |error| <= 1e-5 * sum |x w| (+ bias, + out);
 *  - against the exact float32 product: the reduced formats within the bound their rounding
 *    allows (bf16, unit roundoff 2^-8 per rounded operand: 2^-8 sum |x w| for the weights alone,
 *    (2^-7 + 2^-16) sum |x w| with rounded activations; int8, int4: sum of |x| ew + |w| dx/2 +
 *    ew dx/2, ew the weight's own rounding error (at most dw/2 for int8); int4 and 6-bit alike);
 *  - bias, accumulate, a head packed from wte (V, C), rows independent of R (each row alone
 *    gives bitwise the same result) and of the thread count (1, 2, 3 threads: bitwise equal);
 *  - a level that takes a format's activations in the same form as the portable level gives
 *    bitwise the portable level's results (int8, int4, 6-bit: exact integer sums per block).
 */
#include "compute/compute.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int	threads = 2;

/* the pool asks how many threads to use: the count this program sets */
static int
thread_count(void)
{
	return threads;
}

#define FAIL(...) do { fprintf(stderr, "FAIL %s %s IC=%zu OC=%zu R=%zu: ", llm_simd_name(llm_simd_level()), \
	fmt_name[fmt], IC, OC, R); fprintf(stderr, __VA_ARGS__); fprintf(stderr, "\n"); exit(1); } while (0)

static const char *const fmt_name[] = {"f32", "bf16", "q8", "q4", "q6"};

static uint64_t rng = 88172645463325252ULL;

static float
uniform(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (float) ((rng >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

static void *
alloc(size_t bytes)
{
	void	   *p = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);

	if (!p)
	{
		fprintf(stderr, "out of memory\n");
		exit(2);
	}
	return p;
}

/* The reference's own bf16 rounding (nearest, ties to even). */
static float
bf16(float f)
{
	uint32_t	u;

	memcpy(&u, &f, 4);
	u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
	memcpy(&f, &u, 4);
	return f;
}

/* fp16 nearest to f (the reference's; F16C's _cvtss_sh would do) in the normal range, as float. */
static float
fp16(float f)
{
	int			e;
	float		m;

	if (f == 0.0f)
		return 0.0f;
	m = frexpf(f, &e);			/* |m| in [0.5, 1): 11 significant bits */
	if (e < -13)				/* subnormal fp16: multiples of 2^-24 */
		return nearbyintf(f * 0x1p24f) * 0x1p-24f;
	return ldexpf(nearbyintf(m * 2048.0f), e - 11);
}

/* The reference's activation quantisation: per block of 32, q = round(x / d), d = max|x| / 127. */
static void
quantise(float *xq, float *dx, const float *x, size_t IC)
{
	for (size_t b = 0; b < IC; b += 32)
	{
		size_t		n = IC - b < 32 ? IC - b : 32;
		float		amax = 0.0f,
					d;

		for (size_t k = 0; k < n; k++)
			amax = fmaxf(amax, fabsf(x[b + k]));
		d = amax / 127.0f;
		for (size_t k = 0; k < n; k++)
		{
			xq[b + k] = d > 0.0f ? nearbyintf(x[b + k] / d) * d : 0.0f;
			dx[b + k] = d;
		}
	}
}

/*
 * An int4 (half = 8) or 6-bit (half = 32) column block read back (col: the column's IC values): at
 * most 2 half distinct values, and a squared error at most that of the scale fp16(m / -half), m the
 * weight of largest magnitude (q = round(w / d) within [-half, half - 1]; llama.cpp's Q4_0 for int4).
 */
static void
check_low_bits_block(LlmWeightFormat fmt, const float *w, const float *col, bool head, size_t IC, size_t OC,
					 size_t o, size_t b, size_t n, float m)
{
	size_t		R = 0;
	int			half = fmt == LLM_WEIGHTS_Q4 ? 8 : 32;
	double		err = 0.0,
				err0 = 0.0,
				values = 0.0;
	float		d0 = fp16(m / (float) -half);

	for (size_t k = 0; k < n; k++)
	{
		float		src = head ? w[o * IC + b + k] : w[(b + k) * OC + o];
		float		q0 = d0 != 0.0f ? fminf(fmaxf(nearbyintf(src / d0), (float) -half), (float) (half - 1)) : 0.0f;

		err += ((double) col[b + k] - src) * ((double) col[b + k] - src);
		err0 += ((double) d0 * q0 - src) * ((double) d0 * q0 - src);
	}
	if (!(err <= err0 * (1.0 + 1e-6) + 1e-30))
		FAIL("column %zu block %zu: squared error %g, the max's scale %g", o, b / 32, err, err0);
	for (size_t k = 0; k < n; k++)
	{
		size_t		distinct = 0;

		for (size_t j = 0; j < n; j++)
			distinct += col[b + j] == col[b + k];
		values += 1.0 / (double) distinct;	/* each value counted once in all */
	}
	if (!(values <= 2.0 * half + 1e-9))
		FAIL("column %zu block %zu: %.0f values, more than its bits hold", o, b / 32, values);
}

/*
 * One shape: w is (IC, OC) (head: wte (OC, IC) packed with llm_weights_pack_head), every R, every
 * format at the current level.
 */
static void
check_shape(size_t IC, size_t OC, bool head)
{
	static const size_t Rs[] = {1, 2, 3, 8, 17, 64, 200};	/* 200: more than a block of rows */
	size_t		Rmax = 200;
	float	   *w = alloc(IC * OC * 4),
			   *x = alloc(Rmax * IC * 4),
			   *bias = alloc(OC * 4),
			   *prev = alloc(Rmax * OC * 4),
			   *out = alloc(Rmax * OC * 4),
			   *alone = alloc(OC * 4),
			   *wr = alloc(IC * OC * 4),	/* read back, (IC, OC) */
			   *dw = alloc(IC * OC * 4),	/* half-width of the int8 rounding per weight */
			   *col = alloc(IC * 4),
			   *xa = alloc(IC * 4),
			   *dx = alloc(IC * 4);
	LlmSimdLevel level = llm_simd_level();

	for (size_t k = 0; k < IC * OC; k++)
		w[k] = uniform() * (k % 7 == 0 ? 3.0f : 0.5f);	/* a few larger weights per block */
	for (size_t k = 0; k < Rmax * IC; k++)
		x[k] = uniform() * (k % 11 == 0 ? 4.0f : 1.0f);
	for (size_t k = 0; k < OC; k++)
		bias[k] = uniform();
	for (size_t k = 0; k < Rmax * OC; k++)
		prev[k] = uniform();

	for (LlmWeightFormat fmt = LLM_WEIGHTS_F32; fmt <= LLM_WEIGHTS_Q6; fmt++)
	{
		size_t		R = 0;
		size_t		bytes = llm_weights_packed_size(fmt, IC, OC);
		void	   *packed = alloc(bytes);
		void	   *scratch = alloc(llm_gemv_scratch_size(fmt, Rmax, IC));
		LlmGemvInput input = llm_gemv_input(fmt);
		bool		round_x = input == LLM_GEMV_INPUT_BF16;
		bool		quant_x = input == LLM_GEMV_INPUT_Q8;
		bool		same_as_portable;

		llm_simd_set_level(LLM_SIMD_PORTABLE);
		same_as_portable = level != LLM_SIMD_PORTABLE && llm_gemv_input(fmt) == input &&
			(fmt == LLM_WEIGHTS_Q8 || fmt == LLM_WEIGHTS_Q4 || fmt == LLM_WEIGHTS_Q6);
		llm_simd_set_level(level);

		memset(packed, 0xA5, bytes);	/* padding must be written, not left over */
		if (head)
			llm_weights_pack_head(fmt, packed, w, OC, IC);
		else
			llm_weights_pack(fmt, packed, w, IC, OC);

		/* read back every column and judge it against the source */
		for (size_t o = 0; o < OC; o++)
		{
			llm_weights_column(fmt, col, packed, IC, OC, o);
			for (size_t b = 0; b < IC; b += 32)
			{
				size_t		n = IC - b < 32 ? IC - b : 32;
				float		amax = 0.0f,
							m = 0.0f;

				for (size_t k = 0; k < n; k++)
				{
					float		v = head ? w[o * IC + b + k] : w[(b + k) * OC + o];

					if (fabsf(v) > amax)
						amax = fabsf(v), m = v;
				}
				if (fmt == LLM_WEIGHTS_Q4 || fmt == LLM_WEIGHTS_Q6)
					check_low_bits_block(fmt, w, col, head, IC, OC, o, b, n, m);
				for (size_t k = 0; k < n; k++)
				{
					size_t		i = b + k;
					float		src = head ? w[o * IC + i] : w[i * OC + o];
					float		got = col[i];

					wr[i * OC + o] = got;
					dw[i * OC + o] = 0.0f;
					if (fmt == LLM_WEIGHTS_F32 && got != src)
						FAIL("column %zu input %zu: %g, packed %g", o, i, got, src);
					if (fmt == LLM_WEIGHTS_BF16 && got != bf16(src))
						FAIL("column %zu input %zu: %g, not bf16(%g) = %g", o, i, got, src, bf16(src));
					if (fmt == LLM_WEIGHTS_Q8)
					{
						/* scale d in [amax/127, amax/127 (1 + 2^-10)]; error at most d/2 */
						float		d = amax / 127.0f * (1.0f + 0x1p-10f);

						dw[i * OC + o] = d / 2;
						if (!(fabsf(got - src) <= d / 2 * (1.0f + 1e-6f)))
							FAIL("column %zu input %zu: %g, from %g (block max %g)", o, i, got, src, amax);
					}
					if (fmt == LLM_WEIGHTS_Q4 || fmt == LLM_WEIGHTS_Q6)
						dw[i * OC + o] = fabsf(got - src);
				}
			}
		}

		for (size_t ri = 0; ri < sizeof(Rs) / sizeof(Rs[0]); ri++)
		{
			R = Rs[ri];
			for (int mode = 0; mode < 3; mode++)	/* plain; bias; bias + accumulate */
			{
				const float *b = mode ? bias : NULL;
				bool		acc = mode == 2;

				memcpy(out, prev, R * OC * 4);
				llm_gemv(fmt, out, x, packed, b, R, IC, OC, acc, scratch);
				if (same_as_portable)
				{
					memcpy(alone, prev, OC * 4);	/* row 0 suffices: rows are independent (below) */
					llm_simd_set_level(LLM_SIMD_PORTABLE);
					llm_gemv(fmt, alone, x, packed, b, 1, IC, OC, acc, scratch);
					llm_simd_set_level(level);
					if (memcmp(alone, out, OC * 4) != 0)
						FAIL("mode %d: row 0 differs from the portable level's", mode);
				}
				for (size_t r = 0; r < R; r++)
				{
					const float *xr = x + r * IC;

					for (size_t i = 0; i < IC; i++)
						xa[i] = xr[i], dx[i] = 0.0f;
					if (round_x)
						for (size_t i = 0; i < IC; i++)
							xa[i] = bf16(xr[i]);
					if (quant_x)
						quantise(xa, dx, xr, IC);
					for (size_t o = 0; o < OC; o++)
					{
						double		ref = 0.0,
									exact = 0.0,
									scale = 0.0,
									bound = 0.0;
						double		add = (b ? b[o] : 0.0) + (acc ? prev[r * OC + o] : 0.0);
						double		got = out[r * OC + o];

						for (size_t i = 0; i < IC; i++)
						{
							double		wv = wr[i * OC + o],
										ws = head ? w[o * IC + i] : w[i * OC + o];

							ref += (double) xa[i] * wv;
							exact += (double) xr[i] * ws;
							scale += fabs((double) xr[i] * ws);
							bound += fabs(xr[i]) * dw[i * OC + o] + fabs(ws) * dx[i] / 2 + dw[i * OC + o] * dx[i] / 2;
							/* int4's (6-bit's) ew is the rounding error itself, not half a step: the
							 * read-back weight may be off by up to ew as the activation's step is */
							if (fmt == LLM_WEIGHTS_Q4 || fmt == LLM_WEIGHTS_Q6)
								bound += dw[i * OC + o] * dx[i] / 2;
						}
						ref += add;
						exact += add;
						scale += fabs(add);
						if (!(fabs(got - ref) <= 1e-5 * scale))
							FAIL("mode %d row %zu column %zu: %.9g, reference %.9g", mode, r, o, got, ref);
						if (fmt == LLM_WEIGHTS_BF16)
							bound = (round_x ? 0x1p-7 + 0x1p-16 : 0x1p-8) * scale;
						if (!(fabs(got - exact) <= bound + 1e-5 * scale))
							FAIL("mode %d row %zu column %zu: %.9g, float32 %.9g, bound %.3g", mode, r, o, got, exact, bound);
					}
				}
			}
			/* each row alone, at 1 and 3 threads: bitwise what the batch gave */
			memcpy(out, prev, R * OC * 4);
			llm_gemv(fmt, out, x, packed, bias, R, IC, OC, true, scratch);
			for (int t = 1; t <= 3; t += 2)
			{
				threads = t;
				for (size_t r = 0; r < R; r++)
				{
					memcpy(alone, prev + r * OC, OC * 4);
					llm_gemv(fmt, alone, x + r * IC, packed, bias, 1, IC, OC, true, scratch);
					if (memcmp(alone, out + r * OC, OC * 4) != 0)
						FAIL("row %zu alone at %d threads differs from the batch", r, t);
				}
			}
			threads = 2;
		}
		free(packed);
		free(scratch);
	}
	free(w), free(x), free(bias), free(prev), free(out), free(alone);
	free(wr), free(dw), free(col), free(xa), free(dx);
}

int
main(void)
{
	static const size_t shapes[][2] = {{1, 1}, {5, 3}, {45, 77}, {64, 96}, {100, 33}, {131, 250}, {37, 8}};
	LlmSimdLevel best = llm_simd_detect();

	llm_compute_set_thread_source(thread_count);

	printf("detected %s\n", llm_simd_name(best));
	for (int l = LLM_SIMD_PORTABLE; l <= (int) best; l++)
	{
		if (llm_simd_set_level((LlmSimdLevel) l) != (LlmSimdLevel) l)
		{
			fprintf(stderr, "FAIL could not set level %s\n", llm_simd_name((LlmSimdLevel) l));
			return 1;
		}
		for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
		{
			check_shape(shapes[s][0], shapes[s][1], false);
			check_shape(shapes[s][0], shapes[s][1], true);
		}
		printf("level %s ok\n", llm_simd_name((LlmSimdLevel) l));
	}
	printf("ok\n");
	return 0;
}
