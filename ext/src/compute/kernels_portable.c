/*
 * kernels_portable.c: the kernels' tasks for any x86-64 (or other) CPU: the baseline instruction
 * set, SSE2 on x86-64.
 */
#include "compute/kernels_args.h"

#define LLM_TASK(name) name##_portable
#define LLM_TASKS llm_kernel_tasks_portable

#include "compute/kernels_tasks.h"
