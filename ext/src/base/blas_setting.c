/*
 * blas_setting.c: which BLAS the server loads (pg_llm.blas_library), what to say when none loads,
 * and pg_llm_blas_info(). The loading itself is the compute layer's (compute/blas.c).
 */
#include "base/base.h"
#include "compute/compute.h"

#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/guc.h"

/* pg_llm.blas_library: a BLAS of the administrator's choice, tried alone ("" = the usual list). */
static char *blas_library = NULL;

void
llm_blas_define_settings(void)
{
	/* sighup: only an administrator may make the server load a library */
	DefineCustomStringVariable("pg_llm.blas_library",
							   "BLAS library to load: a path, or a name the dynamic linker finds.",
							   "Empty: the system's OpenBLAS (libopenblas.so.0), else the reference CBLAS.",
							   &blas_library, "", PGC_SIGHUP, 0, NULL, NULL, NULL);
}

void
llm_blas_init(void)
{
	bool		chosen = blas_library != NULL && blas_library[0] != '\0';

	if (llm_blas_open(blas_library))
		return;
	if (chosen)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("pg_llm could not load the BLAS library \"%s\"", blas_library),
				 errdetail("It does not open, or has no cblas_sgemm (nor scipy_cblas_sgemm)."),
				 errhint("Set pg_llm.blas_library to an OpenBLAS, or empty for the system's.")));
	ereport(ERROR,
			(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
			 errmsg("pg_llm could not load a BLAS library"),
			 errdetail("Tried libopenblas.so.0, libopenblas.so, libcblas.so.3 and libblas.so.3."),
			 errhint("Install OpenBLAS on the database server, e.g. apt-get install libopenblas0, "
					 "or set pg_llm.blas_library to the library of pip's scipy-openblas32.")));
}

PG_FUNCTION_INFO_V1(pg_llm_blas_info);
Datum
pg_llm_blas_info(PG_FUNCTION_ARGS)
{
	llm_blas_init();
	PG_RETURN_TEXT_P(cstring_to_text(psprintf("%s, %d threads", llm_blas_name(), llm_compute_threads())));
}
