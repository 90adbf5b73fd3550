/*
 * strmap.c: a string -> int map (see strmap.h).
 */
#include "base/base.h"
#include "tokenizer/strmap.h"

void
strmap_init(StrMap *m, int capacity)
{
	uint32		size = 16;

	while (size < (uint32) capacity * 2)
		size <<= 1;
	m->slots = palloc0_array(uint32, size);
	m->mask = size - 1;
	m->keys = palloc_array(const char *, capacity);
	m->lens = palloc_array(int, capacity);
	m->values = palloc_array(int32, capacity);
	m->n = 0;
}

int32
strmap_lookup(StrMap *m, const char *key, int len, int32 insert_value)
{
	uint32		h = (uint32) llm_hash_bytes((const unsigned char *) key, len) & m->mask;

	for (;;)
	{
		uint32		e = m->slots[h];

		if (e == 0)
		{
			if (insert_value >= 0)
			{
				m->keys[m->n] = key;
				m->lens[m->n] = len;
				m->values[m->n] = insert_value;
				m->slots[h] = ++m->n;
			}
			return -1;
		}
		if (m->lens[e - 1] == len && memcmp(m->keys[e - 1], key, len) == 0)
			return m->values[e - 1];
		h = (h + 1) & m->mask;
	}
}
