/*
 * strmap.h: hashing byte strings, and a string -> int map over the caller's strings (strmap.c).
 */
#ifndef PG_LLM_STRMAP_H
#define PG_LLM_STRMAP_H

#include "postgres.h"

/* A 64-bit hash of n bytes: 8 bytes per multiply, good enough for open addressing. */
static inline uint64
llm_hash_bytes(const unsigned char *s, size_t n)
{
	uint64		h = 0x9E3779B97F4A7C15ULL ^ (n * 0xff51afd7ed558ccdULL);
	uint64		v;

	while (n >= 8)
	{
		memcpy(&v, s, 8);
		h = (h ^ v) * 0xff51afd7ed558ccdULL;
		h ^= h >> 32;
		s += 8;
		n -= 8;
	}
	v = 0;
	memcpy(&v, s, n);
	h = (h ^ v) * 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 29;
	return h;
}

/*
 * String -> int, open addressing over indices into arrays of keys; the keys themselves are the
 * caller's (they must outlive the map). palloc'd in CurrentMemoryContext; no deletion.
 */
typedef struct StrMap
{
	uint32	   *slots;			/* entry index + 1; 0 = empty */
	uint32		mask;
	const char **keys;
	int		   *lens;
	int32	   *values;
	int			n;
} StrMap;

/* A map for up to capacity keys. */
extern void strmap_init(StrMap *m, int capacity);

/* The value of key, or -1. With insert_value >= 0, inserts it when absent (returns -1 then). */
extern int32 strmap_lookup(StrMap *m, const char *key, int len, int32 insert_value);

#endif							/* PG_LLM_STRMAP_H */
