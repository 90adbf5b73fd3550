/*
 * utf8.c: UTF-8 as a strict decoder sees it (see utf8.h).
 */
#include "base/base.h"
#include "tokenizer/utf8.h"

/*
 * Whether byte b starts a character, and then how many continuation bytes it wants and the range
 * of the first of them (narrower after E0, ED, F0 and F4; the others are 80..BF).
 */
static inline bool
utf8_lead(unsigned char b, int *need, unsigned char *lo, unsigned char *hi)
{
	*lo = 0x80;
	*hi = 0xBF;
	if (b >= 0xC2 && b <= 0xDF)
		*need = 1;
	else if (b >= 0xE0 && b <= 0xEF)
	{
		*need = 2;
		if (b == 0xE0)
			*lo = 0xA0;
		else if (b == 0xED)
			*hi = 0x9F;
	}
	else if (b >= 0xF0 && b <= 0xF4)
	{
		*need = 3;
		if (b == 0xF0)
			*lo = 0x90;
		else if (b == 0xF4)
			*hi = 0x8F;
	}
	else
		return false;			/* ASCII, a continuation byte, C0, C1 or F5..FF */
	return true;
}

size_t
llm_utf8_lossy(const unsigned char *s, size_t len, char *out)
{
	static const char fffd[3] = {(char) 0xEF, (char) 0xBF, (char) 0xBD};
	size_t		o = 0;
	size_t		i = 0;

	while (i < len)
	{
		unsigned char b = s[i];
		int			need;
		unsigned char lo,
					hi;
		size_t		j;

		if (b != 0 && b < 0x80)
		{
			out[o++] = b;
			i++;
			continue;
		}
		if (!utf8_lead(b, &need, &lo, &hi))
		{
			/* NUL, a continuation byte, C0, C1 or F5..FF: one replacement for the byte */
			memcpy(out + o, fffd, 3);
			o += 3;
			i++;
			continue;
		}
		j = i + 1;
		for (int k = 0; k < need; k++, j++)
		{
			if (j >= len || s[j] < (k == 0 ? lo : 0x80) || s[j] > (k == 0 ? hi : 0xBF))
				break;
		}
		if (j - i == (size_t) need + 1)
		{
			memcpy(out + o, s + i, j - i);
			o += j - i;
		}
		else
		{
			memcpy(out + o, fffd, 3);
			o += 3;
		}
		i = j;
	}
	out[o] = '\0';
	return o;
}

int
llm_utf8_unfinished_tail(const unsigned char *s, int len)
{
	for (int k = 1; k <= 3 && k <= len; k++)
	{
		unsigned char b = s[len - k];
		int			need;		/* continuation bytes this lead byte wants */
		unsigned char lo,
					hi;

		if (b >= 0x80 && b <= 0xBF)
			continue;			/* a continuation byte: look further back */
		if (!utf8_lead(b, &need, &lo, &hi))
			return 0;			/* ASCII or a byte that starts nothing */
		if (need < k)
			return 0;			/* the character is complete */
		for (int i = 1; i < k; i++)
		{
			unsigned char c = s[len - k + i];

			if (c < (i == 1 ? lo : 0x80) || c > (i == 1 ? hi : 0xBF))
				return 0;		/* broken: the decoder replaces it, nothing to wait for */
		}
		return k;
	}
	return 0;
}
