/*
 * pool_stress.c: a stress test of the worker pool (src/parallel.c), built and run by
 * tests/test_pool.py, outside PostgreSQL.
 *
 *   pool_stress THREADS JOBS [vary]
 *
 * Runs JOBS calls of llm_parallel_for on a pool of THREADS threads, alternating small jobs (2
 * elements, so 2 shares) and full ones (one share per thread, of one element or of three or four):
 * the pattern in which a worker that read one job's fields can claim a share of the next. Every element has its
 * own counter, incremented by the task; after each call returns the caller checks that every
 * counter of the job is exactly 1, then closes the job, and a task that starts or ends on a closed
 * job counts as a late run. At the end every counter is checked again. Any count other than 1, or
 * any late run, fails (exit status 1). Run it with more threads than cores: a worker descheduled
 * at an unlucky moment is what breaks a wrong protocol. With `vary`, the number of threads a call
 * may use (the thread source) changes every 4 calls, through every value from 1 to THREADS, as a
 * session's share of the server's threads does: workers park and come back between jobs.
 */
#include "compute/compute.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct Job
{
	int			closed;			/* atomic: the call returned */
	uint8_t    *count;			/* one counter per element */
} Job;

static int	threads;
static bool vary;
static long calls;				/* calls of thread_count: one per llm_parallel_for */
static long late_runs;			/* atomic: tasks that ran on a job whose call had returned */

/* the pool asks how many threads to use: this program's source (the server's is its thread budget) */
static int
thread_count(void)
{
	long		c = calls++;

	return vary ? 1 + (int) ((c / 4 * 5) % threads) : threads;
}

static void
task(void *arg, size_t start, size_t end)
{
	Job		   *job = arg;

	if (__atomic_load_n(&job->closed, __ATOMIC_SEQ_CST))
		__atomic_add_fetch(&late_runs, 1, __ATOMIC_SEQ_CST);
	for (size_t i = start; i < end; i++)
		__atomic_add_fetch(&job->count[i], 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&job->closed, __ATOMIC_SEQ_CST))
		__atomic_add_fetch(&late_runs, 1, __ATOMIC_SEQ_CST);
}

static size_t
job_size(long j)
{
	if (j % 2 == 0)
		return 2;
	return j % 4 == 1 ? (size_t) threads : 3 * (size_t) threads + 1;
}

/* Jobs of [0, n_jobs) with a counter other than 1; the first few are printed. */
static long
bad_counts(Job *jobs, long n_jobs, const char *when)
{
	long		bad = 0;

	for (long j = 0; j < n_jobs; j++)
		for (size_t i = 0; i < job_size(j); i++)
		{
			int			c = __atomic_load_n(&jobs[j].count[i], __ATOMIC_SEQ_CST);

			if (c != 1)
			{
				if (bad++ < 5)
					printf("job %ld element %zu ran %d times (%s)\n", j, i, c, when);
				break;
			}
		}
	return bad;
}

int
main(int argc, char **argv)
{
	long		n_jobs;
	long		at_return = 0;
	long		at_end;
	Job		   *jobs;
	uint8_t    *counts;
	size_t		n_counts = 0;

	llm_compute_set_thread_source(thread_count);
	vary = argc == 4 && strcmp(argv[3], "vary") == 0;
	if ((argc != 3 && !vary) || (threads = atoi(argv[1])) < 2 || threads > 256 || (n_jobs = atol(argv[2])) < 1)
	{
		fprintf(stderr, "usage: pool_stress THREADS(2..256) JOBS [vary]\n");
		return 2;
	}
	for (long j = 0; j < n_jobs; j++)
		n_counts += job_size(j);
	jobs = calloc(n_jobs, sizeof(Job));
	counts = calloc(n_counts, 1);
	if (jobs == NULL || counts == NULL)
	{
		fprintf(stderr, "out of memory\n");
		return 2;
	}

	for (long j = 0; j < n_jobs; j++)
	{
		jobs[j].count = counts;
		counts += job_size(j);
		llm_parallel_for(job_size(j), task, &jobs[j]);
		for (size_t i = 0; i < job_size(j); i++)
			if (__atomic_load_n(&jobs[j].count[i], __ATOMIC_SEQ_CST) != 1)
			{
				if (at_return++ < 5)
					printf("job %ld element %zu ran %d times when the call returned\n",
						   j, i, jobs[j].count[i]);
				break;
			}
		__atomic_store_n(&jobs[j].closed, 1, __ATOMIC_SEQ_CST);
	}
	at_end = bad_counts(jobs, n_jobs, "at the end");

	printf("%ld jobs on %d threads%s: %ld jobs had a wrong count when the call returned, %ld at the end; %ld late runs\n",
		   n_jobs, threads, vary ? " (varying)" : "", at_return, at_end, __atomic_load_n(&late_runs, __ATOMIC_SEQ_CST));
	return (at_return == 0 && at_end == 0 && late_runs == 0) ? 0 : 1;
}
