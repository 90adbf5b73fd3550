/*
 * gemv.h: matrix-vector products for decode, over weights packed once into a read-only layout
 * made for them (see gemv.c), in five formats: float32, bfloat16, int8 (Q8), int4 (Q4) and 6-bit
 * (Q6: the head of the int4 precision).
 *
 * Decode is bound by memory bandwidth: every step streams every weight once. These kernels read
 * each packed weight once per call for all R rows (R = 1..96 at once: the sequences of a batch,
 * beams; more rows go in blocks of 96, so a prompt's T rows run here too, as fast as sgemm),
 * split over the worker pool (llm_parallel_for) by panels of output columns, each thread streaming
 * one contiguous range of memory. The packed copy is derived data: any producer packs it with
 * llm_weights_pack / llm_weights_pack_head and any number of processes may map it read-only.
 *
 * Shapes follow the rest of pg_llm: IC inputs, OC outputs, R rows; a linear layer's weights
 * come in Hugging Face orientation (IC, OC) (out = inp @ w + bias), the tied output head as wte
 * (V, C) (logits = x @ wte^T, i.e. IC = C, OC = V). None of these functions allocates, fails or
 * touches PostgreSQL; they may run on any thread.
 */
#ifndef LLM_GEMV_H
#define LLM_GEMV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Version of the packed layouts (gemv.c): a stored packed copy made under another is stale. */
#define LLM_WEIGHTS_LAYOUT 2

/*
 * Output columns per panel of a packed matrix. Panels are independent: the columns [o0, o1) of a
 * matrix, o0 a multiple of this, pack into exactly the bytes the whole matrix has from panel
 * o0 / LLM_WEIGHTS_PANEL on, so a large matrix can be packed in pieces.
 */
#define LLM_WEIGHTS_PANEL 32

typedef enum LlmWeightFormat
{
	LLM_WEIGHTS_F32,			/* float32: 4 bytes per weight */
	LLM_WEIGHTS_BF16,			/* bfloat16, rounded to nearest even: 2 bytes */
	LLM_WEIGHTS_Q8,				/* int8 in blocks of 32 inputs with an fp16 scale each: 1.0625 bytes */
	LLM_WEIGHTS_Q4,				/* 4 bits in blocks of 32 inputs with an fp16 scale each: 0.5625 bytes */
	LLM_WEIGHTS_Q6				/* 6 bits in blocks of 32 inputs with an fp16 scale each: 0.8125 bytes */
} LlmWeightFormat;

#define LLM_WEIGHTS_FORMATS (LLM_WEIGHTS_Q6 + 1)

/* Bytes of a packed (IC, OC) matrix, a multiple of 64; place packed matrices 64-byte aligned. */
extern size_t llm_weights_packed_size(LlmWeightFormat fmt, size_t IC, size_t OC);

/* dst (llm_weights_packed_size bytes) <- w (IC, OC), a linear layer in HF orientation. */
extern void llm_weights_pack(LlmWeightFormat fmt, void *dst, const float *w, size_t IC, size_t OC);

/* dst (llm_weights_packed_size(fmt, C, V) bytes) <- the head wte (V, C): packs wte^T (C, V). */
extern void llm_weights_pack_head(LlmWeightFormat fmt, void *dst, const float *wte, size_t V, size_t C);

/*
 * dst (IC) <- column `col` of a packed (IC, OC) matrix, in float32: for a packed head, the
 * embedding row wte[col] as the head sees it (rounded or dequantised), so that the tied
 * embedding needs no second copy.
 */
extern void llm_weights_column(LlmWeightFormat fmt, float *dst, const void *packed,
							   size_t IC, size_t OC, size_t col);

/* Bytes of scratch llm_gemv needs for R rows of IC inputs, at any level (0 for float32). */
extern size_t llm_gemv_scratch_size(LlmWeightFormat fmt, size_t R, size_t IC);

/* How the activations enter a format's products at the level in use (see the levels below). */
typedef enum LlmGemvInput
{
	LLM_GEMV_INPUT_F32,			/* as they are, float32 */
	LLM_GEMV_INPUT_BF16,		/* rounded to bfloat16 (nearest even) */
	LLM_GEMV_INPUT_Q8			/* per row and block of 32: q = round(x / d), d = max|x| / 127 */
} LlmGemvInput;

extern LlmGemvInput llm_gemv_input(LlmWeightFormat fmt);

/*
 * out (R, OC) (+)= inp (R, IC) @ W + bias, W packed (IC, OC), bias (OC) or NULL; with accumulate
 * out += ..., else out = .... scratch: llm_gemv_scratch_size bytes, 64-byte aligned (or NULL when
 * that size is 0), for the activations in the kernel's form (bf16 pairs, or int8 blocks). Rows are
 * independent: row r's result does not depend on R or on the other rows.
 */
extern void llm_gemv(LlmWeightFormat fmt, float *out, const float *inp, const void *packed,
					 const float *bias, size_t R, size_t IC, size_t OC, bool accumulate, void *scratch);

/*
 * Instruction-set levels, chosen at run time from the CPU, highest first:
 *   LLM_SIMD_AVX512_DOT  AVX-512 with its dot products: vdpbf16ps (bf16, activations rounded to
 *                        bf16 pairs) where the CPU has AVX512_BF16, vpdpbusd (int8, activations
 *                        quantised per block of 32) where it has AVX512_VNNI;
 *   LLM_SIMD_AVX512      AVX-512 F/BW/VL/DQ: bf16 and int8 weights converted to float32 in
 *                        registers (activations float32);
 *   LLM_SIMD_AVX2        AVX2 + FMA + F16C: bf16 weights converted to float32; int8, int4 and
 *                        6-bit as bytes (vpmaddubsw), activations quantised per block of 32;
 *   LLM_SIMD_PORTABLE    plain C for any x86-64 (or other) CPU: as AVX2, in plain C.
 * int4 and 6-bit quantise the activations at every level (the AVX-512 levels run the AVX2 kernels), and so
 * does int8 everywhere but at LLM_SIMD_AVX512; llm_gemv_input says which form is in use. Levels
 * that take the activations in the same form give bitwise the same results.
 */
typedef enum LlmSimdLevel
{
	LLM_SIMD_PORTABLE,
	LLM_SIMD_AVX2,
	LLM_SIMD_AVX512,
	LLM_SIMD_AVX512_DOT
} LlmSimdLevel;

/* The best level this CPU runs, capped by the environment variable PG_LLM_SIMD if it names one. */
extern LlmSimdLevel llm_simd_detect(void);

/* The level in use (llm_simd_detect() until set). */
extern LlmSimdLevel llm_simd_level(void);

/* Use at most `level` (lower it to test the fallbacks); returns the level now in use. */
extern LlmSimdLevel llm_simd_set_level(LlmSimdLevel level);

/* "portable", "avx2", "avx512", "avx512dot": also the values PG_LLM_SIMD accepts. */
extern const char *llm_simd_name(LlmSimdLevel level);

#endif							/* LLM_GEMV_H */
