/*
 * pretokenize.h: GPT-2's pre-tokenizer, the split of text into pieces before BPE.
 *
 * The pattern of the GPT-2 tokenizer,
 *     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * as a hand-written scanner over code points, with letters, numbers and \s classified by the
 * Unicode version of the Oniguruma engine inside tokenizers (unicode_tables.h). Static inline,
 * for the encoder's inner loop (bpe.c, its only user: the tables are static data).
 */
#ifndef PG_LLM_PRETOKENIZE_H
#define PG_LLM_PRETOKENIZE_H

#include "postgres.h"

#include "tokenizer/unicode_tables.h"

static const uint8 ascii_class[128] = {
	/* \t \n \v \f \r are white space; letters and digits; everything else is "other" */
	0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 3, 3, 3, 0, 0,
	0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
	3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
	2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0,
	0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
	1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
	0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
	1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
};

static inline int
uc_class(uint32 c)
{
	return (llm_uc_blocks[llm_uc_stage1[c >> 8]][(c & 255) >> 2] >> ((c & 3) * 2)) & 3;
}

/*
 * Class and byte length of the character at s[p] (p < n). Malformed UTF-8 (only possible through
 * the C interface) counts as one "other" byte, so that scanning never runs past the end.
 */
static inline int
class_at(const unsigned char *s, size_t n, size_t p, size_t *clen)
{
	unsigned char b = s[p];
	uint32		c;

	if (b < 0x80)
	{
		*clen = 1;
		return ascii_class[b];
	}
	if (b >= 0xC2 && b < 0xE0 && p + 1 < n && (s[p + 1] & 0xC0) == 0x80)
	{
		*clen = 2;
		c = ((b & 0x1F) << 6) | (s[p + 1] & 0x3F);
	}
	else if (b >= 0xE0 && b < 0xF0 && p + 2 < n && (s[p + 1] & 0xC0) == 0x80 && (s[p + 2] & 0xC0) == 0x80)
	{
		*clen = 3;
		c = ((b & 0x0F) << 12) | ((s[p + 1] & 0x3F) << 6) | (s[p + 2] & 0x3F);
	}
	else if (b >= 0xF0 && b < 0xF5 && p + 3 < n && (s[p + 1] & 0xC0) == 0x80 &&
			 (s[p + 2] & 0xC0) == 0x80 && (s[p + 3] & 0xC0) == 0x80)
	{
		*clen = 4;
		c = ((b & 0x07) << 18) | ((s[p + 1] & 0x3F) << 12) | ((s[p + 2] & 0x3F) << 6) | (s[p + 3] & 0x3F);
		if (c > 0x10FFFF)
			c = 0xFFFF;			/* not a character: "other" */
	}
	else
	{
		*clen = 1;
		return LLM_UC_OTHER;
	}
	return uc_class(c);
}

/*
 * End of the piece that starts at s[p], p < n: the first alternative of the GPT-2 pattern that
 * matches at p, as a backtracking regex engine picks it.
 */
static inline size_t
next_piece(const unsigned char *s, size_t n, size_t p)
{
	size_t		clen;
	int			cls = class_at(s, n, p, &clen);
	size_t		q,
				last;

	/* 's 't 're 've 'm 'll 'd (lowercase only) */
	if (s[p] == '\'' && p + 1 < n)
	{
		unsigned char d = s[p + 1];

		if (d == 's' || d == 't' || d == 'm' || d == 'd')
			return p + 2;
		if (p + 2 < n && ((d == 'r' && s[p + 2] == 'e') || (d == 'v' && s[p + 2] == 'e') ||
						  (d == 'l' && s[p + 2] == 'l')))
			return p + 3;
	}
	q = p + clen;
	/* An ASCII space joins the letters, numbers or other symbols that follow it. */
	if (s[p] == ' ' && q < n)
	{
		int			next = class_at(s, n, q, &clen);

		if (next != LLM_UC_SPACE)
		{
			cls = next;
			q += clen;
		}
	}
	if (cls != LLM_UC_SPACE)
	{
		while (q < n && class_at(s, n, q, &clen) == cls)
			q += clen;
		return q;
	}
	/* \s+(?!\S) leaves the last white-space character of a run to the word after it; \s+ otherwise. */
	last = p;
	while (q < n && class_at(s, n, q, &clen) == LLM_UC_SPACE)
	{
		last = q;
		q += clen;
	}
	return (q == n || last == p) ? q : last;
}

#endif							/* PG_LLM_PRETOKENIZE_H */
