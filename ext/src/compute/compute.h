/*
 * compute.h: the compute layer, as the rest of pg_llm sees it: the kernels of training and
 * evaluation (kernels.h: LayerNorm, attention, GELU, losses, AdamW, the products on BLAS), the
 * products of inference over packed weights (gemv.h) with their instruction-set levels, the worker
 * pool (pool.h) and the BLAS library (blas.h).
 *
 * Everything here is plain C over memory its caller owns: it never includes PostgreSQL's headers
 * (the build proves it: these files compile without them, and the C test programs link them as
 * they are), never allocates through PostgreSQL and never fails through it. What it needs from
 * the server comes as arguments: the number of threads a session may use is a function the caller
 * sets (llm_compute_set_thread_source).
 */
#ifndef PG_LLM_COMPUTE_H
#define PG_LLM_COMPUTE_H

#include "compute/blas.h"
#include "compute/gemv.h"
#include "compute/kernels.h"
#include "compute/pool.h"

#endif							/* PG_LLM_COMPUTE_H */
