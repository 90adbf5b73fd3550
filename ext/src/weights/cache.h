/*
 * weights_cache.h: one read-only copy of a model's weights per server, shared by every backend.
 *
 * A copy is a file per (database, model, weights_version, format) in $PGDATA/pgsql_tmp_pg_llm/,
 * built once by the first backend that needs it and mapped read-only by the others (see
 * weights_cache.c for why a file and how it is kept safe). A format names what the file holds: a
 * layout and a precision, written as a list of sections, each aligned to 2 MB. Inference shares
 * one format per precision (served.h: float32, bfloat16, int8, int4, packed for gemv.c); training's
 * private float32 block (model.h's layout) is one more format, never shared.
 */
#ifndef PG_LLM_WEIGHTS_CACHE_H
#define PG_LLM_WEIGHTS_CACHE_H

#include "model/model.h"

#define LLM_WC_MAX_SECTIONS 16

/* Ids written in a copy's header. Never renumber them: files carry them. */
typedef enum LlmWcLayout
{
	LLM_WC_LAYOUT_BLOCK = 1,	/* model.h's block: kinds grouped across layers, HF orientation */
	LLM_WC_LAYOUT_PACKED = 0x100	/* + LLM_WEIGHTS_LAYOUT: served.h's copies, packed by gemv.c */
} LlmWcLayout;

typedef enum LlmWcPrecision
{
	LLM_WC_FLOAT32 = 1,
	LLM_WC_BFLOAT16 = 2,
	LLM_WC_INT8 = 3,
	LLM_WC_INT4 = 4
} LlmWcPrecision;

typedef enum LlmWcSectionId
{
	LLM_WC_SECTION_PARAMS = 1,	/* the whole parameter block */
	LLM_WC_SECTION_SERVED = 2	/* a served copy: packed matrices and float32 vectors (served.c) */
} LlmWcSectionId;

/* Writes the sections of a copy being built (a shared file or private memory). */
typedef struct LlmWcWriter LlmWcWriter;

/* What a copy holds and how to make it. */
typedef struct LlmWcFormat
{
	const char *name;			/* [a-z0-9_]: in file names, headers and pg_llm_weight_cache() */
	LlmWcLayout layout;
	LlmWcPrecision precision;
	int			n_sections;
	LlmWcSectionId section_id[LLM_WC_MAX_SECTIONS];
	uint64		section_bytes[LLM_WC_MAX_SECTIONS];

	/*
	 * Writes every byte of every section through llm_wc_write. Runs in the backend (it may use
	 * SPI, ereport and must CHECK_FOR_INTERRUPTS in long loops); an ERROR leaves nothing behind.
	 */
	void		(*fill) (const LlmConfig *cfg, LlmWcWriter *w, void *arg);
	void	   *arg;
} LlmWcFormat;

/* A copy in use by this backend: a mapping of the shared file, or private memory. */
typedef struct LlmWcCopy
{
	bool		shared;			/* the server's copy, which other backends map too */
	bool		writable;		/* private memory; else a read-only mapping */
	int			n_sections;
	void	   *section[LLM_WC_MAX_SECTIONS];	/* read-only when shared; 64-byte aligned */
	uint64		section_bytes[LLM_WC_MAX_SECTIONS];
	char	   *base;			/* the mapping or allocation */
	size_t		bytes;
	int			fd;				/* shared: holds a shared flock, which marks the file in use */
	char		path[MAXPGPATH];	/* the server's copy: its file's name ("" otherwise) */
} LlmWcCopy;

/* Settings (defined by llm_wc_init). */
extern bool llm_shared_weights;
extern int	llm_weight_cache_mb;

extern void llm_wc_init(void);

/*
 * The copy of cfg's weights in this format: when shared, the server's file (mapped, or built
 * first when absent, waiting for another backend that is building it); otherwise, or when the
 * file cannot be used (no space, no permission, an I/O error), private memory filled by the
 * format, with a WARNING saying why. ERROR only for what fill reports and for out of memory.
 */
extern LlmWcCopy *llm_wc_get(const LlmConfig *cfg, const LlmWcFormat *fmt, bool shared);

/*
 * The shared copy of cfg's weights in this format that a backend of `database` made, mapped, for a
 * process that cannot build one (the batch runner, which has no database); NULL when there is no
 * valid one.
 */
extern LlmWcCopy *llm_wc_map_shared(Oid database, const LlmConfig *cfg, const LlmWcFormat *fmt);

/* Unmaps or frees a copy. */
extern void llm_wc_release(LlmWcCopy *copy);

/* For fill: copy len bytes to offset of a section. */
extern void llm_wc_write(LlmWcWriter *w, int section, size_t offset, const void *src, size_t len);

#endif							/* PG_LLM_WEIGHTS_CACHE_H */
