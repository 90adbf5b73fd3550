/*
 * parallel.h: a fixed pool of worker threads for the plain-C kernels (parallel.c).
 *
 * A job is a function over a range [start, end) of [0, n): the pool cuts it into one share per
 * thread, the calling (backend) thread included, and returns when every share has run. Workers
 * run with every signal blocked and never call PostgreSQL (no palloc, ereport, SPI), so a task
 * function must be pure C over memory the caller owns.
 */
#ifndef PG_LLM_PARALLEL_H
#define PG_LLM_PARALLEL_H

#include <stddef.h>

typedef void (*llm_task_fn) (void *arg, size_t start, size_t end);

/* Runs fn(arg, start, end) over shares of [0, n) on llm_num_threads() threads; n < 2 runs inline. */
extern void llm_parallel_for(size_t n, llm_task_fn fn, void *arg);

/*
 * The same with `per_thread` shares per thread (at most n in all): smaller shares, so that when
 * the OS preempts a thread in the middle of its share (a busy server), the others take over more
 * of the job. Only for tasks whose results do not depend on where the shares begin and end.
 */
extern void llm_parallel_for_shares(size_t n, int per_thread, llm_task_fn fn, void *arg);

#endif							/* PG_LLM_PARALLEL_H */
