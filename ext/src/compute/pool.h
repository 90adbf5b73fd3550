/*
 * pool.h: a fixed pool of worker threads for the plain-C kernels (pool.c).
 *
 * A job is a function over a range [start, end) of [0, n): the pool cuts it into one share per
 * thread, the calling thread included, and returns when every share has run. Workers run with
 * every signal blocked and never call PostgreSQL (no palloc, ereport, SPI), so a task function
 * must be pure C over memory the caller owns.
 */
#ifndef PG_LLM_POOL_H
#define PG_LLM_POOL_H

#include <stddef.h>

typedef void (*llm_task_fn) (void *arg, size_t start, size_t end);

/* Runs fn(arg, start, end) over shares of [0, n) on llm_compute_threads() threads; n < 2 runs inline. */
extern void llm_parallel_for(size_t n, llm_task_fn fn, void *arg);

/*
 * The same with `per_thread` shares per thread (at most n in all): smaller shares, so that when
 * the OS preempts a thread in the middle of its share (a busy server), the others take over more
 * of the job. Only for tasks whose results do not depend on where the shares begin and end.
 */
extern void llm_parallel_for_shares(size_t n, int per_thread, llm_task_fn fn, void *arg);

/*
 * How many threads compute may use: the caller's source, asked before each job (a session's share
 * of the server's threads changes as other sessions start and stop: base/thread_budget.c sets it),
 * or, with none set, one per CPU this process may run on.
 */
typedef int (*llm_thread_source) (void);
extern void llm_compute_set_thread_source(llm_thread_source source);
extern int	llm_compute_threads(void);

#endif							/* PG_LLM_POOL_H */
