/*
 * pg_llm.c: the module's entry point. _PG_init asks each subsystem to define its settings and
 * hooks; everything else lives in the folders of src/ (src/README.md).
 */
#include "base/base.h"
#include "generate/generate.h"
#include "runner/runner.h"
#include "weights/weights.h"
#include "train/train.h"

#include "utils/guc.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

void
_PG_init(void)
{
	llm_thread_budget_init();
	llm_compute_set_thread_source(llm_num_threads);
	llm_blas_define_settings();
	llm_wc_init();
	llm_privileges_init();
	llm_served_init();
	llm_batch_init();
	llm_runner_init();
	llm_dataset_init();
	MarkGUCPrefixReserved("pg_llm");
}
