/*
 * gemv_avx2.c: the AVX2 + FMA + F16C kernels (gemv_kernels.h), the level of every x86-64 server
 * since Haswell and Zen 1, and the int4 and 6-bit kernels of the AVX-512 levels too.
 *
 * A kernel covers a panel's rows with tiles of ROWS rows x VECS vectors of 8 columns, both
 * compile-time constants, whose accumulators stay in registers (AVX2 has 16 of them): a tile
 * loads each weight once and multiplies it into all its rows.
 *   float32, bfloat16: one float32 accumulator per (row, column) for the whole pass over IC.
 *     One to three rows take the whole panel (1, 2 or 3 x 4: each 128-byte row of weights read
 *     once, in order: what decode wants); more rows take half a panel, 6 x 2 (the 6x16 tile of
 *     BLIS's Haswell sgemm): 12 accumulators, 2 loads of weights and 6 broadcasts per 12 fused
 *     multiply-adds.
 *     bfloat16 weights become float32 by a shift or a mask of each 32-bit pair: in registers for
 *     one or two rows, into a buffer a chunk of inputs at a time for more (see bf16_avx2).
 *   int8, int4, 6-bit: the activations come quantised per block of 32 (gemv.c), the weights stay bytes:
 *     vpmaddubsw multiplies unsigned by signed bytes into pairs of int16, vpmaddwd adds the pairs
 *     into int32. int8 weights are stored q + 128 (the operand of vpdpbusd), so the product
 *     would not fit int16 (255 x 127 x 2): the xor of 0x80 gives q back, and the signs move onto
 *     the weights, |x| (unsigned) times q * sign(x) (vpsignb), at most 127 x 127 x 2 = 32258.
 *     int4 codes u = q + 8 are at most 15: u x needs no such care, and 8 of the int16 pair sums
 *     (15 x 127 x 2 each) add up in int16 before one vpmaddwd per block; sum u x - 8 sum x is
 *     the block's sum of q x. A block's exact integer sum is then added into its column's float32
 *     accumulator (in acc: a tile's integer accumulators take the registers) with one fused
 *     multiply-add by d_w d_x, the operations of the portable and VNNI kernels.
 */
#include "compute/gemv_kernels.h"

#ifdef LLM_GEMV_X86

#include <immintrin.h>

#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))

/* -- float32 and bfloat16: a tile of ROWS x VECS float32 accumulators over the inputs -- */

/* What a tile prefetches (see f32_rows): at input i, the line at + 64 (i >> shift); none if !at */
typedef struct Prefetch
{
	const char *at;
	int			shift;
} Prefetch;

/*
 * acc[0..rows) columns [8 v0, 8 (v0 + vecs)) (+)= rows r0.. of inp, inputs [i0, i0 + n), times the
 * float32 weights w (NR per input, from input i0 on); from zero when `first`, else from acc.
 */
INLINE T_AVX2 void
f32_tile(const Gemv *g, const float *w, size_t i0, size_t n, size_t r0, float (*acc)[NR], int v0,
		 bool first, Prefetch pf, const int rows, const int vecs)
{
	const float *x = g->inp + r0 * g->IC + i0;
	size_t		IC = g->IC;
	__m256		a[6][4];

	for (int r = 0; r < rows; r++)
		for (int v = 0; v < vecs; v++)
			a[r][v] = first ? _mm256_setzero_ps() : _mm256_load_ps(acc[r] + 8 * (v0 + v));
	for (size_t i = 0; i < n; i++)
	{
		__m256		wv[4];

		if (pf.at)
			_mm_prefetch(pf.at + ((i >> pf.shift) << 6), _MM_HINT_T0);
		for (int v = 0; v < vecs; v++)
			wv[v] = _mm256_load_ps(w + i * NR + 8 * (v0 + v));
		for (int r = 0; r < rows; r++)
		{
			__m256		xb = _mm256_broadcast_ss(x + r * IC + i);

			for (int v = 0; v < vecs; v++)
				a[r][v] = _mm256_fmadd_ps(wv[v], xb, a[r][v]);
		}
	}
	for (int r = 0; r < rows; r++)
		for (int v = 0; v < vecs; v++)
			_mm256_store_ps(acc[r] + 8 * (v0 + v), a[r][v]);
}

/*
 * Rows of the next tile when `left` rows remain for tiles of at most `most`: as many tiles as
 * needed, of rows as even as can be (8 rows: 4 + 4, not 6 + 2, whose 4 accumulators would leave
 * the fused multiply-adds waiting on each other's latency).
 */
static inline int
tile_rows(int left, int most)
{
	int			tiles = (left + most - 1) / most;

	return (left + tiles - 1) / tiles;
}

/* Inputs of a panel that several rows take at a time: 16 KB of float32 weights, which stay in L1
 * while every group of rows passes over them. */
#define CHUNK 128

/*
 * Runs f32_tile over nr rows (nr > 1) for inputs [i0, i0 + n): tiles of up to 6 rows x 2 vectors,
 * each a pass over half the chunk's columns. The chunk's first passes fetch it from memory and
 * the others find it in L1, so memory and arithmetic would take turns; instead every pass
 * prefetches its share of the next chunk's `next_bytes` at `next` (one line every 2^shift inputs,
 * spread so that the core never has more misses in flight than it can track; a prefetch never
 * faults, even past the last panel), and the next chunk
 * arrives while this one computes. GPT-2 small's step on the 2-core Zen 3 (bench/kernels.c,
 * 2 threads, best of 2 s, two interleaved rounds): 4 rows 22.5 -> 16.6 ms, 8 rows 29.1 -> 18.6,
 * 16 rows 41.5 -> 28.1. Prefetching the whole next chunk in the first pass gained nothing: its
 * misses queued behind the first pass's own.
 */
static T_AVX2 __attribute__((noinline)) void
f32_rows(const Gemv *g, const float *w, size_t i0, size_t n, size_t r0, int nr, float (*acc)[NR],
		 const char *next, size_t next_bytes)
{
	int			passes = 0,
				shift = 0;
	size_t		share;

	for (int i = 0; i < nr; i += tile_rows(nr - i, 6))
		passes += 2;
	share = (next_bytes / 64 + passes - 1) / passes;	/* lines */
	while (share > 0 && (2 << shift) * share <= n)
		shift++;
	for (int i = 0, rows; i < nr; i += rows)
	{
		rows = tile_rows(nr - i, 6);
		for (int v0 = 0; v0 < 4; v0 += 2)
		{
			Prefetch	pf = {next, shift};

			if (next)
				next += share * 64;
			switch (rows)
			{
				case 1:
					f32_tile(g, w, i0, n, r0 + i, acc + i, v0, i0 == 0, pf, 1, 2);
					break;
				case 2:
					f32_tile(g, w, i0, n, r0 + i, acc + i, v0, i0 == 0, pf, 2, 2);
					break;
				case 3:
					f32_tile(g, w, i0, n, r0 + i, acc + i, v0, i0 == 0, pf, 3, 2);
					break;
				case 4:
					f32_tile(g, w, i0, n, r0 + i, acc + i, v0, i0 == 0, pf, 4, 2);
					break;
				case 5:
					f32_tile(g, w, i0, n, r0 + i, acc + i, v0, i0 == 0, pf, 5, 2);
					break;
				default:
					f32_tile(g, w, i0, n, r0 + i, acc + i, v0, i0 == 0, pf, 6, 2);
					break;
			}
		}
	}
}

/*
 * Three rows x 4 vectors over the whole panel: the rows' inputs are broadcast first, then each
 * weight vector is loaded once into the one register left (12 accumulators + 3 + 1 = AVX2's 16).
 * Named variables, not arrays: with arrays GCC stores every accumulator to the stack each input.
 */
static T_AVX2 __attribute__((noinline)) void
f32_three(const Gemv *g, const float *w, size_t r0, float (*acc)[NR])
{
	const float *x = g->inp + r0 * g->IC;
	size_t		IC = g->IC;
	__m256		z = _mm256_setzero_ps(),
				a00 = z, a01 = z, a02 = z, a03 = z,
				a10 = z, a11 = z, a12 = z, a13 = z,
				a20 = z, a21 = z, a22 = z, a23 = z;

	for (size_t i = 0; i < IC; i++)
	{
		const float *wi = w + i * NR;
		__m256		x0 = _mm256_broadcast_ss(x + i),
					x1 = _mm256_broadcast_ss(x + IC + i),
					x2 = _mm256_broadcast_ss(x + 2 * IC + i),
					wv;

#define COLUMNS(v) \
		wv = _mm256_load_ps(wi + 8 * v); \
		a0##v = _mm256_fmadd_ps(wv, x0, a0##v); \
		a1##v = _mm256_fmadd_ps(wv, x1, a1##v); \
		a2##v = _mm256_fmadd_ps(wv, x2, a2##v)
		COLUMNS(0);
		COLUMNS(1);
		COLUMNS(2);
		COLUMNS(3);
#undef COLUMNS
	}
#define STORE(r, v) _mm256_store_ps(acc[r] + 8 * v, a##r##v)
	STORE(0, 0); STORE(0, 1); STORE(0, 2); STORE(0, 3);
	STORE(1, 0); STORE(1, 1); STORE(1, 2); STORE(1, 3);
	STORE(2, 0); STORE(2, 1); STORE(2, 2); STORE(2, 3);
#undef STORE
}

static T_AVX2 void
f32_avx2(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	const float *w = (const float *) panel;

	/*
	 * Up to three rows stream the panel in order, which the hardware prefetcher follows at the
	 * memory's speed; f32_rows's passes over half-rows need the software prefetches, which are
	 * slower while there is too little arithmetic to hide them. bench/kernels.c --level avx2,
	 * Zen 3, one thread, interleaved rounds, step over one row's through f32_rows -> so: two rows
	 * 1.20-1.23x -> 1.05-1.10x, three rows 1.27-1.29x -> 1.12-1.17x (with two threads sharing the
	 * memory, within the noise). Four rows gained nothing this way (3 x 4, then the fourth row
	 * from cache).
	 */
	if (nr == 1)
		f32_tile(g, w, 0, g->IC, r0, acc, 0, true, (Prefetch) {0}, 1, 4);
	else if (nr == 2)
		f32_tile(g, w, 0, g->IC, r0, acc, 0, true, (Prefetch) {0}, 2, 4);
	else if (nr == 3)
		f32_three(g, w, r0, acc);
	else
		for (size_t i0 = 0; i0 < g->IC; i0 += CHUNK)
			/* the next chunk: past the panel's end, the next panel's first (panels are contiguous) */
			f32_rows(g, w + i0 * NR, i0, Min(CHUNK, g->IC - i0), r0, nr, acc,
					 (const char *) (w + (i0 + CHUNK) * NR), CHUNK * NR * sizeof(float));
}

/*
 * One or two rows: bfloat16 pairs of inputs (2k, 2k+1) per 32-bit word, lo = word << 16,
 * hi = word & 0xFFFF0000, converted in registers while the panel streams in order (as f32_avx2's
 * one to three rows).
 */
INLINE T_AVX2 void
bf16_tile(const Gemv *g, const uint32_t *w, size_t r0, float (*acc)[NR], const int rows)
{
	const float *x = g->inp + r0 * g->IC;
	size_t		IC = g->IC;
	const __m256i hi_mask = _mm256_set1_epi32((int) 0xFFFF0000u);
	__m256		a[2][4];

	for (int r = 0; r < rows; r++)
		for (int v = 0; v < 4; v++)
			a[r][v] = _mm256_setzero_ps();
	for (size_t i = 0; i < IC; i += 2)
		for (int v = 0; v < 4; v++)
		{
			__m256i		u = _mm256_load_si256((const __m256i *) (w + (i / 2) * NR + 8 * v));
			__m256		lo = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)),
						hi = _mm256_castsi256_ps(_mm256_and_si256(u, hi_mask));

			for (int r = 0; r < rows; r++)
			{
				a[r][v] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(x + r * IC + i), a[r][v]);
				if (i + 1 < IC)
					a[r][v] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(x + r * IC + i + 1), a[r][v]);
			}
		}
	for (int r = 0; r < rows; r++)
		for (int v = 0; v < 4; v++)
			_mm256_store_ps(acc[r] + 8 * v, a[r][v]);
}

/*
 * One or two rows: bf16_tile, converting in registers while the panel streams (two rows through
 * f32_rows took 1.30-1.37x one row's step on one thread, now 1.06-1.10x; two threads 1.13-1.37x ->
 * 0.99-1.21x; bench/kernels.c --formats bf16 --rows 1,2 --level avx2, interleaved rounds, Zen 3).
 * More rows: the panel's bfloat16 weights become float32 a chunk of inputs at a time, which
 * runs through f32_rows (the same fused multiply-adds in the same order as bf16_tile: bitwise equal).
 * Converting in registers instead costs a shift and a mask per 8 weights for each group of rows,
 * and a 6 x 2 tile then needs more registers than AVX2 has.
 * The conversion reads the chunk that f32_rows prefetched while it ran on the one before
 * (past the panel's end, the next panel's first). GPT-2 small's step (bench/kernels.c, 2 threads,
 * best of 2 s, three interleaved rounds) beside the conversion prefetching the next chunk itself:
 * 4 rows 12.6-13.2 -> 10.4-12.2 ms, 8 rows 18.1-22.0 -> 15.9-18.2.
 */
static T_AVX2 void
bf16_avx2(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	const uint32_t *w = (const uint32_t *) panel;
	const __m256i hi_mask = _mm256_set1_epi32((int) 0xFFFF0000u);
	float		buf[CHUNK * NR] __attribute__((aligned(64)));

	if (nr <= 2)
	{
		if (nr == 1)
			bf16_tile(g, w, r0, acc, 1);
		else
			bf16_tile(g, w, r0, acc, 2);
		return;
	}
	for (size_t i0 = 0; i0 < g->IC; i0 += CHUNK)
	{
		size_t		n = Min(CHUNK, g->IC - i0);

		for (size_t i = 0; i < n; i += 2)
			for (int v = 0; v < 4; v++)
			{
				__m256i		u = _mm256_load_si256((const __m256i *) (w + ((i0 + i) / 2) * NR + 8 * v));
				__m256		lo = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)),
							hi = _mm256_castsi256_ps(_mm256_and_si256(u, hi_mask));

				/* a word is (input i0 + i, input i0 + i + 1) of one column */
				_mm256_store_ps(buf + i * NR + 8 * v, lo);
				_mm256_store_ps(buf + (i + 1) * NR + 8 * v, hi);
			}
		/* the next chunk's words arrive while f32_rows runs on this one (see there) */
		f32_rows(g, buf, i0, n, r0, nr, acc, (const char *) (w + ((i0 + CHUNK) / 2) * NR),
				 CHUNK / 2 * NR * sizeof(uint32_t));
	}
}

/* -- int8 and int4: integer sums per block, added into acc's float32 accumulators per block -- */

/* 4 quantised activations (one group of a block) of row r, in every 32-bit lane */
INLINE T_AVX2 __m256i
act_group(const Q8Act *a, size_t nb, size_t r, size_t b, int k)
{
	int32_t		x;

	memcpy(&x, a->q + (r * nb + b) * QK + k, sizeof(x));
	return _mm256_set1_epi32(x);
}

/* acc[r] columns of vector v0 + v += isum[r][v] * d_w * d_x, per row of the tile, for block b */
INLINE T_AVX2 void
block_to_float(const Q8Act *a, size_t nb, size_t r0, size_t b, const uint8_t *blk, __m256i (*isum)[4],
			   float (*acc)[NR], int v0, const int rows, const int vecs)
{
	for (int v = 0; v < vecs; v++)
	{
		__m256		dw = _mm256_cvtph_ps(_mm_load_si128((const __m128i *) (blk + 16 * (v0 + v))));

		for (int r = 0; r < rows; r++)
		{
			float	   *y = acc[r] + 8 * (v0 + v);
			__m256		d = _mm256_mul_ps(dw, _mm256_set1_ps(a->d[(r0 + r) * nb + b]));

			_mm256_store_ps(y, _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][v]), d, _mm256_load_ps(y)));
		}
	}
}

INLINE T_AVX2 void
tile_zero(float (*acc)[NR], int v0, const int rows, const int vecs)
{
	for (int r = 0; r < rows; r++)
		for (int v = 0; v < vecs; v++)
			_mm256_store_ps(acc[r] + 8 * (v0 + v), _mm256_setzero_ps());
}

INLINE T_AVX2 void
q8_tile(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], int v0, const int rows, const int vecs)
{
	const Q8Act *a = g->act;
	size_t		nb = gemv_blocks(g->IC);
	const __m256i flip = _mm256_set1_epi8((char) 0x80),
				ones = _mm256_set1_epi16(1);

	tile_zero(acc, v0, rows, vecs);
	for (size_t b = 0; b < nb; b++)
	{
		const uint8_t *blk = panel + b * Q8_BLOCK;
		__m256i		isum[5][4];

		for (int r = 0; r < rows; r++)
			for (int v = 0; v < vecs; v++)
				isum[r][v] = _mm256_setzero_si256();
		for (int k = 0; k < QK; k += 4)
		{
			__m256i		w[4];

			for (int v = 0; v < vecs; v++)
				w[v] = _mm256_xor_si256(_mm256_load_si256((const __m256i *) (blk + q8_index(k, 8 * (v0 + v)))), flip);
			for (int r = 0; r < rows; r++)
			{
				__m256i		x = act_group(a, nb, r0 + r, b, k),
							ax = _mm256_abs_epi8(x);

				for (int v = 0; v < vecs; v++)
				{
					__m256i		p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w[v], x));

					isum[r][v] = _mm256_add_epi32(isum[r][v], _mm256_madd_epi16(p, ones));
				}
			}
		}
		block_to_float(a, nb, r0, b, blk, isum, acc, v0, rows, vecs);
	}
}

INLINE T_AVX2 void
q4_tile(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], int v0, const int rows, const int vecs)
{
	const Q8Act *a = g->act;
	size_t		nb = gemv_blocks(g->IC);
	const __m256i low = _mm256_set1_epi8(0x0F),
				ones = _mm256_set1_epi16(1);

	tile_zero(acc, v0, rows, vecs);
	for (size_t b = 0; b < nb; b++)
	{
		const uint8_t *blk = panel + b * Q4_BLOCK;
		__m256i		s16[5][4],
					isum[5][4];

		for (int r = 0; r < rows; r++)
			for (int v = 0; v < vecs; v++)
				s16[r][v] = _mm256_setzero_si256();
		for (int k = 0; k < QK / 2; k += 4)
		{
			__m256i		lo[4],
						hi[4];

			for (int v = 0; v < vecs; v++)
			{
				__m256i		u = _mm256_load_si256((const __m256i *) (blk + q4_index(k, 8 * (v0 + v))));

				lo[v] = _mm256_and_si256(u, low);
				hi[v] = _mm256_and_si256(_mm256_srli_epi16(u, 4), low);
			}
			for (int r = 0; r < rows; r++)
			{
				__m256i		x0 = act_group(a, nb, r0 + r, b, k),
							x1 = act_group(a, nb, r0 + r, b, k + 16);

				for (int v = 0; v < vecs; v++)
					s16[r][v] = _mm256_add_epi16(s16[r][v], _mm256_add_epi16(_mm256_maddubs_epi16(lo[v], x0),
																			 _mm256_maddubs_epi16(hi[v], x1)));
			}
		}
		for (int r = 0; r < rows; r++)
		{
			__m256i		offset = _mm256_set1_epi32(8 * a->sum[(r0 + r) * nb + b]);

			for (int v = 0; v < vecs; v++)
				isum[r][v] = _mm256_sub_epi32(_mm256_madd_epi16(s16[r][v], ones), offset);
		}
		block_to_float(a, nb, r0, b, blk, isum, acc, v0, rows, vecs);
	}
}

/*
 * Q6: the codes u = q + 32 are 4-bit nibbles as Q4's with their top bits (q6_index) moved to bits
 * 4-5 of each byte; a tile reads each block's bytes in order (with the top bits after a Q4 block,
 * read out of order, one row on one thread took 9.6-9.8 ms per GPT-2-small step, now 6.6-8.4).
 * u x fits int16 (63 x 127 x 2 = 16002) for the sum of two pairs only, so the int16 sums go into
 * int32 every two pairs (vpmaddwd) rather than every block as Q4's.
 */
INLINE T_AVX2 void
q6_tile(const Gemv *g, const uint8_t *panel, size_t r0, float (*acc)[NR], int v0, const int rows, const int vecs)
{
	const Q8Act *a = g->act;
	size_t		nb = gemv_blocks(g->IC);
	const __m256i low = _mm256_set1_epi8(0x0F),
				top = _mm256_set1_epi8(0x30),
				ones = _mm256_set1_epi16(1);

	tile_zero(acc, v0, rows, vecs);
	for (size_t b = 0; b < nb; b++)
	{
		const uint8_t *blk = panel + b * Q6_BLOCK;
		__m256i		isum[2][4];

		for (int r = 0; r < rows; r++)
			for (int v = 0; v < vecs; v++)
				isum[r][v] = _mm256_setzero_si256();
		for (int k = 0; k < 8; k += 4)
			for (int v = 0; v < vecs; v++)
			{
				const uint8_t *at = blk + NR * 2 + (k + v0 + v) * 96;	/* group k / 4, vector v0 + v */
				__m256i		u0 = _mm256_load_si256((const __m256i *) at),
							u1 = _mm256_load_si256((const __m256i *) (at + 32)),
							t = _mm256_load_si256((const __m256i *) (at + 64)),
							c[4];

				/* codes of inputs k.., k + 16.., k + 8.., k + 24.. (columns 8 (v0 + v)..) */
				c[0] = _mm256_or_si256(_mm256_and_si256(u0, low), _mm256_and_si256(_mm256_slli_epi16(t, 4), top));
				c[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(u0, 4), low),
									   _mm256_and_si256(_mm256_slli_epi16(t, 2), top));
				c[2] = _mm256_or_si256(_mm256_and_si256(u1, low), _mm256_and_si256(t, top));
				c[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(u1, 4), low),
									   _mm256_and_si256(_mm256_srli_epi16(t, 2), top));
				for (int r = 0; r < rows; r++)
				{
					__m256i		p0 = _mm256_add_epi16(_mm256_maddubs_epi16(c[0], act_group(a, nb, r0 + r, b, k)),
													  _mm256_maddubs_epi16(c[1], act_group(a, nb, r0 + r, b, k + 16))),
								p1 = _mm256_add_epi16(_mm256_maddubs_epi16(c[2], act_group(a, nb, r0 + r, b, k + 8)),
													  _mm256_maddubs_epi16(c[3], act_group(a, nb, r0 + r, b, k + 24)));

					isum[r][v] = _mm256_add_epi32(isum[r][v], _mm256_add_epi32(_mm256_madd_epi16(p0, ones),
																			   _mm256_madd_epi16(p1, ones)));
				}
			}
		for (int r = 0; r < rows; r++)
		{
			__m256i		offset = _mm256_set1_epi32(32 * a->sum[(r0 + r) * nb + b]);

			for (int v = 0; v < vecs; v++)
				isum[r][v] = _mm256_sub_epi32(isum[r][v], offset);
		}
		block_to_float(a, nb, r0, b, blk, isum, acc, v0, rows, vecs);
	}
}

/*
 * The tiles for several rows, the best of 1 to 6 rows x 1, 2 or 4 vectors (bench/kernels.c, 96
 * rows, weights in cache, CPU time of one thread on the Zen 3 machine): int8 2 x 4 (29 ms beside
 * 33 for 4 x 2, 5 x 2 and 3 x 2), int4 5 x 2 (21 ms beside 24 for 4 x 2 and 26 for 2 x 4). One row
 * takes the whole panel, 1 x 4.
 */
static T_AVX2 void
q8_avx2(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	for (int i = 0; i < nr; i += 2)
	{
		if (nr - i == 1)
			q8_tile(g, panel, r0 + i, acc + i, 0, 1, 4);
		else
			q8_tile(g, panel, r0 + i, acc + i, 0, 2, 4);
	}
}

static T_AVX2 void
q4_avx2(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	if (nr == 1)
	{
		q4_tile(g, panel, r0, acc, 0, 1, 4);
		return;
	}
	for (int i = 0, rows; i < nr; i += rows)
	{
		rows = Min(nr - i, 5);	/* balanced tiles measured slower here (the int16 sums have no latency to hide) */
		for (int v0 = 0; v0 < 4; v0 += 2)
			switch (rows)
			{
				case 1:
					q4_tile(g, panel, r0 + i, acc + i, v0, 1, 2);
					break;
				case 2:
					q4_tile(g, panel, r0 + i, acc + i, v0, 2, 2);
					break;
				case 3:
					q4_tile(g, panel, r0 + i, acc + i, v0, 3, 2);
					break;
				case 4:
					q4_tile(g, panel, r0 + i, acc + i, v0, 4, 2);
					break;
				default:
					q4_tile(g, panel, r0 + i, acc + i, v0, 5, 2);
					break;
			}
	}
}

/* Q6 as int8: 2 x 4 tiles (bench/kernels.c --formats q6 --rows 4,8,96, one thread: 4 rows 13.0-13.6
 * ms beside 14.3-15.1 for 4 x 2, 8 and 96 rows within the noise) */
static T_AVX2 void
q6_avx2(const Gemv *g, const uint8_t *panel, size_t r0, int nr, float (*acc)[NR])
{
	for (int i = 0; i < nr; i += 2)
	{
		if (nr - i == 1)
			q6_tile(g, panel, r0 + i, acc + i, 0, 1, 4);
		else
			q6_tile(g, panel, r0 + i, acc + i, 0, 2, 4);
	}
}

static T_AVX2 void
quantise_avx2(void *scratch, const float *inp, size_t R, size_t IC)
{
	gemv_quantise_q8(scratch, inp, R, IC);
}

void
llm_gemv_kernels_avx2(Kernel *k)
{
	k[LLM_WEIGHTS_F32] = (Kernel) {f32_avx2, LLM_GEMV_INPUT_F32, NULL};
	k[LLM_WEIGHTS_BF16] = (Kernel) {bf16_avx2, LLM_GEMV_INPUT_F32, NULL};
	k[LLM_WEIGHTS_Q8] = (Kernel) {q8_avx2, LLM_GEMV_INPUT_Q8, quantise_avx2};
	k[LLM_WEIGHTS_Q4] = (Kernel) {q4_avx2, LLM_GEMV_INPUT_Q8, quantise_avx2};
	k[LLM_WEIGHTS_Q6] = (Kernel) {q6_avx2, LLM_GEMV_INPUT_Q8, quantise_avx2};
}

#endif							/* LLM_GEMV_X86 */
