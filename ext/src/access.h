/*
 * access.h: hints for roles that lack pg_llm's rights (access.c).
 */
#ifndef PG_LLM_ACCESS_H
#define PG_LLM_ACCESS_H

extern void llm_access_init(void);

#endif							/* PG_LLM_ACCESS_H */
