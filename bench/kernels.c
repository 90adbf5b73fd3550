/*
 * kernels.c: one GPT-2-small decode step's worth of matrix-vector products with the decode
 * kernels of ext/src/compute/gemv.c (built and driven by bench/kernels.py; usable alone):
 *
 *   kernels [--threads 2] [--formats f32,bf16,q8,q4,q6,sgemm] [--rows 1,4,8,16] [--level NAME]
 *           [--pages huge|4k|file] [--seconds 2] [--layers 12 --d-model 768 --vocab 50257]
 *
 * A step is, per layer, the four linear layers (C x 3C, C x C, C x 4C, 4C x C, with bias, the two
 * projections accumulating into the residual) and then the tied head (V x C), for R rows: every
 * packed weight read once. The weights are random (speed only depends on the shape), packed into
 * one arena per format, as the shared copy of a server would hold them. --pages says how the
 * arena is mapped: anonymous memory with transparent huge pages (madvise), anonymous with 4 KiB
 * pages, or a file written then mapped read-only and shared (page cache, 4 KiB pages: what an
 * mmap'd copy in the data directory gets). Attention, LayerNorm and GELU are not part of a step.
 * Format "sgemm" runs the same step as the engine's prompt pass does today: OpenBLAS cblas_sgemm
 * on the float32 weights in Hugging Face orientation (head: wte transposed), on --threads threads.
 *
 * Prints, per format and R: "result fmt=.. level=.. pages=.. R=.. bytes=.. ms=MEDIAN min=MIN
 * cpu=MIN_CPU" over as many steps as fit in --seconds (at least 5; cpu: the process's CPU time
 * per step, all threads), and "read ..." for a plain read of the
 * float32 arena on the same threads (the memory bandwidth the kernels can hope for).
 */
#define _GNU_SOURCE
#include "compute/compute.h"

#include <fcntl.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* OpenBLAS (libopenblas-dev), for the sgemm baseline */
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };
extern void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha,
						const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);
extern void openblas_set_num_threads(int n);

#define Min(a, b) ((a) < (b) ? (a) : (b))

static int	threads = 2;

/* the pool asks how many threads to use: the count this program sets */
static int
thread_count(void)
{
	return threads;
}


static double
now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU time of the whole process: with --threads 1, a step's cost free of other processes' load */
static double
cpu_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 0x9E3779B97F4A7C15ULL;

static float
uniform(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (float) ((rng >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

typedef struct Matrix
{
	size_t		IC,
				OC,
				offset;			/* in the arena */
	bool		head;
} Matrix;

typedef struct Model
{
	size_t		L,
				C,
				V,
				n;				/* matrices: 4 per layer, then the head */
	Matrix	   *m;
} Model;

static void *
map_arena(size_t bytes, const char *pages)
{
	void	   *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
	{
		perror("mmap");
		exit(2);
	}
	madvise(p, bytes, strcmp(pages, "huge") == 0 ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	return p;
}

/* The packed arena of one format, mapped as --pages says. */
static const uint8_t *
pack_model(const Model *md, LlmWeightFormat fmt, bool sgemm, const char *pages, size_t *total)
{
	size_t		bytes = 0;
	uint8_t    *arena;

	for (size_t k = 0; k < md->n; k++)
	{
		size_t		size = sgemm ? md->m[k].IC * md->m[k].OC * sizeof(float) :
			llm_weights_packed_size(fmt, md->m[k].IC, md->m[k].OC);

		md->m[k].offset = bytes;
		bytes += (size + 4095) / 4096 * 4096;
	}
	arena = map_arena(bytes, pages);
	for (size_t k = 0; k < md->n; k++)
	{
		const Matrix *m = &md->m[k];
		float	   *w = malloc(m->IC * m->OC * sizeof(float));

		for (size_t i = 0; i < m->IC * m->OC; i++)
			w[i] = 0.02f * uniform();
		if (sgemm)
			memcpy(arena + m->offset, w, m->IC * m->OC * sizeof(float));
		else if (m->head)
			llm_weights_pack_head(fmt, arena + m->offset, w, m->OC, m->IC);
		else
			llm_weights_pack(fmt, arena + m->offset, w, m->IC, m->OC);
		free(w);
	}
	if (strcmp(pages, "file") == 0)
	{
		char		path[] = "/tmp/pgllm-kernels-XXXXXX";
		int			fd = mkstemp(path);
		const uint8_t *mapped;

		if (fd < 0 || write(fd, arena, bytes) != (ssize_t) bytes)
		{
			perror("writing the arena file");
			exit(2);
		}
		munmap(arena, bytes);
		mapped = mmap(NULL, bytes, PROT_READ, MAP_SHARED, fd, 0);
		if (mapped == MAP_FAILED)
		{
			perror("mmap file");
			exit(2);
		}
		unlink(path);
		close(fd);
		arena = (uint8_t *) mapped;
	}
	else
		mprotect(arena, bytes, PROT_READ);
	*total = bytes;
	return arena;
}

typedef struct Buffers
{
	float	   *x,
			   *ln,
			   *qkv,
			   *att,
			   *fch,
			   *logits,
			   *bias;
	void	   *scratch;
} Buffers;

static void
step(const Model *md, LlmWeightFormat fmt, const uint8_t *arena, Buffers *b, size_t R)
{
	size_t		C = md->C;

	for (size_t l = 0; l < md->L; l++)
	{
		const Matrix *m = md->m + 4 * l;

		llm_gemv(fmt, b->qkv, b->ln, arena + m[0].offset, b->bias, R, C, 3 * C, false, b->scratch);
		llm_gemv(fmt, b->x, b->att, arena + m[1].offset, b->bias, R, C, C, true, b->scratch);
		llm_gemv(fmt, b->fch, b->ln, arena + m[2].offset, b->bias, R, C, 4 * C, false, b->scratch);
		llm_gemv(fmt, b->x, b->fch, arena + m[3].offset, b->bias, R, 4 * C, C, true, b->scratch);
	}
	llm_gemv(fmt, b->logits, b->ln, arena + md->m[md->n - 1].offset, NULL, R, C, md->V, false, b->scratch);
}

/* out (R, OC) (+)= inp (R, IC) @ w (IC, OC) + bias, as the prompt pass does it */
static void
sgemm_linear(float *out, const float *inp, const float *w, const float *bias, size_t R, size_t IC,
			 size_t OC, bool accumulate)
{
	for (size_t r = 0; r < R; r++)
		for (size_t o = 0; o < OC; o++)
			out[r * OC + o] = (accumulate ? out[r * OC + o] : 0.0f) + bias[o];
	cblas_sgemm(RowMajor, NoTrans, NoTrans, (int) R, (int) OC, (int) IC, 1.0f, inp, (int) IC, w, (int) OC,
				1.0f, out, (int) OC);
}

static void
step_sgemm(const Model *md, const uint8_t *arena, Buffers *b, size_t R)
{
	size_t		C = md->C;

	for (size_t l = 0; l < md->L; l++)
	{
		const Matrix *m = md->m + 4 * l;

		sgemm_linear(b->qkv, b->ln, (const float *) (arena + m[0].offset), b->bias, R, C, 3 * C, false);
		sgemm_linear(b->x, b->att, (const float *) (arena + m[1].offset), b->bias, R, C, C, true);
		sgemm_linear(b->fch, b->ln, (const float *) (arena + m[2].offset), b->bias, R, C, 4 * C, false);
		sgemm_linear(b->x, b->fch, (const float *) (arena + m[3].offset), b->bias, R, 4 * C, C, true);
	}
	cblas_sgemm(RowMajor, NoTrans, Trans, (int) R, (int) md->V, (int) C, 1.0f, b->ln, (int) C,
				(const float *) (arena + md->m[md->n - 1].offset), (int) C, 0.0f, b->logits, (int) md->V);
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return (x > y) - (x < y);
}

/* A plain read of the arena on `threads` threads, each its contiguous share: sums of 64-byte lines. */
typedef struct ReadJob
{
	const uint8_t *p;
	size_t		start,
				end;			/* lines */
	uint64_t	sum;
} ReadJob;

__attribute__((target("avx2"))) static void *
read_share(void *arg)
{
	ReadJob    *j = arg;
	__m256i		a = _mm256_setzero_si256(),
				b = _mm256_setzero_si256();

	for (size_t i = j->start; i < j->end; i++)
	{
		const __m256i *q = (const __m256i *) (j->p + i * 64);

		a = _mm256_add_epi64(a, _mm256_load_si256(q));
		b = _mm256_add_epi64(b, _mm256_load_si256(q + 1));
	}
	a = _mm256_add_epi64(a, b);
	j->sum = (uint64_t) _mm256_extract_epi64(a, 0) + (uint64_t) _mm256_extract_epi64(a, 3);
	return NULL;
}

static double
read_seconds(const uint8_t *p, size_t bytes)
{
	ReadJob		j[64];
	pthread_t	t[64];
	int			n = threads < 64 ? threads : 64;
	double		t0 = now();

	for (int k = 0; k < n; k++)
	{
		j[k] = (ReadJob) {p, bytes / 64 * k / n, bytes / 64 * (k + 1) / n, 0};
		if (k > 0)
			pthread_create(&t[k], NULL, read_share, &j[k]);
	}
	read_share(&j[0]);
	for (int k = 1; k < n; k++)
		pthread_join(t[k], NULL);
	return now() - t0;
}

static void
split_list(const char *s, char out[][16], int *n)
{
	char		buf[256];

	*n = 0;
	snprintf(buf, sizeof(buf), "%s", s);
	for (char *t = strtok(buf, ","); t && *n < 16; t = strtok(NULL, ","))
		snprintf(out[(*n)++], 16, "%s", t);
}

/* 64-byte aligned memory; aligned_alloc wants the size a multiple of the alignment. */
static void *
alloc64(size_t bytes)
{
	return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

int
main(int argc, char **argv)
{
	const char *formats = "f32,bf16,q8",
			   *rows = "1,4,8,16",
			   *level_name = NULL,
			   *pages = "huge";
	double		seconds = 2.0;
	Model		md = {12, 768, 50257, 0, NULL};
	char		fl[16][16],
				rl[16][16];
	int			nf,
				nr;
	size_t		Rmax = 1;
	Buffers		b;
	static const char *const fmt_names[] = {"f32", "bf16", "q8", "q4", "q6"};

	llm_compute_set_thread_source(thread_count);

	for (int a = 1; a + 1 < argc; a += 2)
	{
		if (!strcmp(argv[a], "--threads"))
			threads = atoi(argv[a + 1]);
		else if (!strcmp(argv[a], "--formats"))
			formats = argv[a + 1];
		else if (!strcmp(argv[a], "--rows"))
			rows = argv[a + 1];
		else if (!strcmp(argv[a], "--level"))
			level_name = argv[a + 1];
		else if (!strcmp(argv[a], "--pages"))
			pages = argv[a + 1];
		else if (!strcmp(argv[a], "--seconds"))
			seconds = atof(argv[a + 1]);
		else if (!strcmp(argv[a], "--layers"))
			md.L = (size_t) atol(argv[a + 1]);
		else if (!strcmp(argv[a], "--d-model"))
			md.C = (size_t) atol(argv[a + 1]);
		else if (!strcmp(argv[a], "--vocab"))
			md.V = (size_t) atol(argv[a + 1]);
		else
		{
			fprintf(stderr, "unknown option %s\n", argv[a]);
			return 2;
		}
	}
	if (level_name)
		for (int l = LLM_SIMD_PORTABLE; l <= LLM_SIMD_AVX512_DOT; l++)
			if (!strcmp(level_name, llm_simd_name((LlmSimdLevel) l)))
				llm_simd_set_level((LlmSimdLevel) l);
	split_list(formats, fl, &nf);
	split_list(rows, rl, &nr);
	for (int k = 0; k < nr; k++)
		Rmax = (size_t) atol(rl[k]) > Rmax ? (size_t) atol(rl[k]) : Rmax;

	md.n = 4 * md.L + 1;
	md.m = calloc(md.n, sizeof(Matrix));
	for (size_t l = 0; l < md.L; l++)
	{
		md.m[4 * l + 0] = (Matrix) {md.C, 3 * md.C, 0, false};
		md.m[4 * l + 1] = (Matrix) {md.C, md.C, 0, false};
		md.m[4 * l + 2] = (Matrix) {md.C, 4 * md.C, 0, false};
		md.m[4 * l + 3] = (Matrix) {4 * md.C, md.C, 0, false};
	}
	md.m[md.n - 1] = (Matrix) {md.C, md.V, 0, true};

	b.x = alloc64(Rmax * md.C * 4);
	b.ln = alloc64(Rmax * md.C * 4);
	b.att = alloc64(Rmax * md.C * 4);
	b.qkv = alloc64(Rmax * 3 * md.C * 4);
	b.fch = alloc64(Rmax * 4 * md.C * 4);
	b.logits = alloc64(Rmax * md.V * 4);
	b.bias = alloc64(4 * md.C * 4);
	b.scratch = alloc64(llm_gemv_scratch_size(LLM_WEIGHTS_Q8, Rmax, 4 * md.C) +
							  llm_gemv_scratch_size(LLM_WEIGHTS_BF16, Rmax, 4 * md.C) + 64);
	for (size_t i = 0; i < Rmax * md.C; i++)
		b.x[i] = uniform(), b.ln[i] = uniform(), b.att[i] = uniform();
	for (size_t i = 0; i < Rmax * 4 * md.C; i++)
		b.fch[i] = uniform();
	for (size_t i = 0; i < 4 * md.C; i++)
		b.bias[i] = 0.01f * uniform();

	for (int f = 0; f < nf; f++)
	{
		LlmWeightFormat fmt = LLM_WEIGHTS_F32;
		bool		sgemm = !strcmp(fl[f], "sgemm");
		size_t		bytes;
		const uint8_t *arena;

		if (sgemm)
			openblas_set_num_threads(threads);
		else if (!strcmp(fl[f], "f32"))
			fmt = LLM_WEIGHTS_F32;
		else if (!strcmp(fl[f], "bf16"))
			fmt = LLM_WEIGHTS_BF16;
		else if (!strcmp(fl[f], "q8"))
			fmt = LLM_WEIGHTS_Q8;
		else if (!strcmp(fl[f], "q4"))
			fmt = LLM_WEIGHTS_Q4;
		else if (!strcmp(fl[f], "q6"))
			fmt = LLM_WEIGHTS_Q6;
		else
		{
			fprintf(stderr, "unknown format %s\n", fl[f]);
			return 2;
		}
		arena = pack_model(&md, fmt, sgemm, pages, &bytes);
		if (fmt == LLM_WEIGHTS_F32 && !sgemm)
		{
			double		best = 1e9;

			for (int rep = 0; rep < 10; rep++)
			{
				double		t = read_seconds(arena, bytes);

				best = t < best ? t : best;
			}
			printf("read pages=%s threads=%d bytes=%zu ms=%.3f GBps=%.1f\n", pages, threads, bytes,
				   best * 1e3, bytes / best / 1e9);
		}
		for (int k = 0; k < nr; k++)
		{
			size_t		R = (size_t) atol(rl[k]);
			double		times[10000],
						cpu_best = 1e9;
			int			n = 0;
			double		start = now();

			for (int warm = 1; n < 10000 && (n < 5 || now() - start < seconds); warm = 0)
			{
				double		t0 = now(),
							c0 = cpu_now();

				if (sgemm)
					step_sgemm(&md, arena, &b, R);
				else
					step(&md, fmt, arena, &b, R);
				if (!warm)		/* the first step faults pages in and starts the threads */
				{
					times[n++] = now() - t0;
					cpu_best = Min(cpu_best, cpu_now() - c0);
				}
			}
			qsort(times, n, sizeof(double), cmp_double);
			printf("result fmt=%s level=%s pages=%s threads=%d R=%zu bytes=%zu steps=%d ms=%.3f min=%.3f cpu=%.3f\n",
				   sgemm ? "sgemm" : fmt_names[fmt], sgemm ? "openblas" : llm_simd_name(llm_simd_level()),
				   pages, threads, R, bytes, n,
				   times[n / 2] * 1e3, times[0] * 1e3, cpu_best * 1e3);
			fflush(stdout);
		}
		munmap((void *) arena, bytes);
	}
	return 0;
}
