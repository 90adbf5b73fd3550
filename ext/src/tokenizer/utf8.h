/*
 * utf8.h: UTF-8 as a strict decoder sees it (utf8.c): no overlong forms, no surrogates, nothing
 * past U+10FFFF. Byte-level BPE tokens may hold part of a character; these decide what is text.
 */
#ifndef PG_LLM_UTF8_H
#define PG_LLM_UTF8_H

#include "postgres.h"

/*
 * Copies bytes into out as valid UTF-8: each maximal invalid subpart (Unicode's recommended
 * practice, as Rust's from_utf8_lossy and Python's errors="replace") becomes U+FFFD. NUL, which
 * text cannot hold, becomes U+FFFD too. out needs 3 * len + 1 bytes; it is NUL-terminated.
 * Returns the length.
 */
extern size_t llm_utf8_lossy(const unsigned char *s, size_t len, char *out);

/* Bytes at the end of s that begin a character but do not finish it (0 to 3). */
extern int	llm_utf8_unfinished_tail(const unsigned char *s, int len);

#endif							/* PG_LLM_UTF8_H */
