/*
 * kernels_avx2.c: the kernels' tasks for x86-64-v3 (AVX2, FMA, F16C, BMI): the level AVX2 and up
 * (the AVX-512 levels too: these loops gain nothing measurable from 512-bit vectors, which gemv's
 * products do).
 */
#include "compute/kernels_args.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("arch=x86-64-v3")
#endif

#define LLM_TASK(name) name##_avx2
#define LLM_TASKS llm_kernel_tasks_avx2

#include "compute/kernels_tasks.h"
