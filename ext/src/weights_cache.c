/*
 * weights_cache.c: one read-only copy of each model's weights per server, shared by its backends.
 *
 * A copy is a file in $PGDATA/pgsql_tmp_pg_llm/, one per (database, model, weights_version,
 * format), mapped read-only and MAP_SHARED by every backend that serves the model, the way
 * llama.cpp maps its model files. Why a file and not dynamic shared memory: PostgreSQL 15 without
 * shared_preload_libraries can reserve no shared memory at start, so a DSM segment could be found by
 * other backends only through a registry that does not exist, and it would die with the last
 * backend attached; a file is found by its name, outlives every backend (and restarts), and the
 * kernel keeps one copy of it in the page cache, mapped with 2 MB pages where the filesystem has
 * large folios (ext4 and xfs on Linux 6.x): decode reads it as fast as private memory (see
 * bench/serving.py and the README).
 *
 * - Never backed up, never in WAL: pg_basebackup (and pg_rewind) skip every entry whose name starts
 *   with "pgsql_tmp", and the startup cleanup removes only base/pgsql_tmp and temporary relations,
 *   so the directory survives restarts. A standby builds its own copies from its replicated tables.
 * - Never half-built: the builder writes an unnamed file (O_TMPFILE) with pwrite, so that a full
 *   disk is an error and never a SIGBUS as it would be through a writable mapping, flushes it
 *   (fdatasync: an OS crash must not leave a named file with unwritten pages) and only then links
 *   it under its name. A crash or cancel while building leaves nothing visible.
 * - Built once: a lock file per key (flock), waited on with CHECK_FOR_INTERRUPTS; who holds it
 *   checks again for the file before building, and unlinks the lock file before releasing it
 *   (everyone who locks a file checks afterwards that its name still leads to it).
 * - Validated: the header (magic, file version, CRC, the key, the architecture, the format and its
 *   sections, the size) is checked before a file is trusted; it also holds the system identifier
 *   and the timeline, so that a copy of the directory made behind PostgreSQL's back (a file-level
 *   backup restored to an earlier point, where a weights_version may be reused) is rebuilt.
 * - In use: a backend that maps a copy holds a shared flock on it. The space is bounded by
 *   pg_llm.weight_cache_size: unused copies are evicted, least recently used first (last use is
 *   the file's atime, set on map and unmap). A new version unlinks the older versions of its model
 *   in every format (precision); Linux keeps their pages for the backends still mapping them, which
 *   remap at their next call. Only committed weights are shared (see model.c), so versions only grow.
 */
#include "pg_llm.h"
#include "privileges.h"
#include "weights_cache.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "access/xlog.h"
#include "access/xlogrecovery.h"
#include "catalog/pg_authid.h"
#include "commands/dbcommands.h"
#include "common/file_perm.h"
#include "common/hashfn.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "port/pg_crc32c.h"
#include "storage/fd.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#define WC_DIR LLM_WC_DIR
#define WC_MAGIC "PGLLM-WC"
#define WC_FILE_VERSION 1
#define WC_HEADER_BYTES 4096
#define WC_SECTION_ALIGN ((uint64) 2 << 20) /* a huge page: sections can be mapped with PMDs */
#define WC_FORMAT_MAX 32

bool		llm_shared_weights = true;
int			llm_weight_cache_mb = 16384;
static int	debug_pause_lock = 0;

typedef struct WcSection
{
	uint32		id;
	uint32		reserved;
	uint64		offset;			/* in the file, a multiple of WC_SECTION_ALIGN */
	uint64		bytes;
} WcSection;

/* The first page of a copy. Written from zeroed memory, so that headers compare with memcmp. */
typedef struct WcHeader
{
	char		magic[8];
	uint32		file_version;
	pg_crc32c	crc;			/* of the header with crc = 0 */
	uint64		file_bytes;
	uint64		system_id;
	TimeLineID	timeline;
	Oid			database;
	Oid			table_oid;		/* of llm_model_config */
	uint32		layout;
	int64		weights_version;
	TimestampTz built_at;
	int32		n_layer,
				n_head,
				d_model,
				n_positions,
				vocab;
	uint32		precision;
	uint32		n_sections;
	uint32		reserved;
	WcSection	sections[LLM_WC_MAX_SECTIONS];
	char		format[WC_FORMAT_MAX];
	char		model[LLM_MODEL_NAME_MAX + 1];
} WcHeader;

StaticAssertDecl(sizeof(WcHeader) <= WC_HEADER_BYTES, "the header must fit its page");

/* Where a copy lives: file names carry the key except the model's name, which is hashed. */
typedef struct WcKey
{
	Oid			database;
	Oid			table_oid;
	uint64		model_hash;
	int64		version;
	const char *format;
	char		path[MAXPGPATH];	/* WC_DIR/<database>_<table>_<hash>_<version>.<format> */
	char		lock[MAXPGPATH];	/* path + ".lock" */
} WcKey;

/* A data file found in the directory. */
typedef struct WcEntry
{
	char		name[NAME_MAX + 1];
	Oid			database;
	Oid			table_oid;
	uint64		model_hash;
	int64		version;
	char		format[WC_FORMAT_MAX];
	uint64		bytes;
	struct timespec last_used;
	dev_t		dev;
	ino_t		ino;
} WcEntry;

/* Descriptors of a shared_copy() in progress; its PG_CATCH closes them when an ERROR ends it. */
typedef struct WcFds
{
	int			lock;			/* the key's lock file */
	bool		lock_held;
	int			dir;			/* the directory, locked while it changes */
	int			file;			/* the copy being opened or built */
} WcFds;

/*
 * A huge page of the file being built, partly written. The page cache gives a 2 MB folio, which
 * backends can map with one PMD, only to a write of the whole aligned 2 MB: the parts of a page
 * that tensors written at different times share are gathered here first. Written in order, a
 * fill has one or two pages in stages at a time; in any order, at most all of them (the size of
 * a private copy).
 */
typedef struct WcStage
{
	uint64		start;			/* in the file, a multiple of WC_SECTION_ALIGN */
	uint64		len;			/* WC_SECTION_ALIGN, or less at the end of a section */
	uint64		filled;
	char	   *data;
} WcStage;

struct LlmWcWriter
{
	int			fd;				/* the unnamed file being built, or -1: private memory */
	char	   *base;			/* private memory */
	int			n_sections;
	uint64		offset[LLM_WC_MAX_SECTIONS];	/* in the file or the memory */
	uint64		bytes[LLM_WC_MAX_SECTIONS];
	WcStage    *stages;
	int			n_stages;
	int			max_stages;
	MemoryContext cxt;			/* of the stages: the caller's, which outlives the fill's SPI */
	uint64		written;
	uint64		pause_at;		/* pg_llm.debug_build_pause_lock: bytes, 0 = never */
	int			error;			/* errno of the first failed write; later writes are skipped */
};

void
llm_wc_init(void)
{
	DefineCustomBoolVariable("pg_llm.shared_weights",
							 "Serve models from one read-only copy of their weights shared by all backends.",
							 "Off: each backend loads a private copy, as training does. Applies from the next call.",
							 &llm_shared_weights, true, PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("pg_llm.weight_cache_size",
							"Disk space for the shared copies of model weights, in the data directory.",
							"Copies no backend uses are evicted, least recently used first; a copy that does not fit is private to its backend.",
							&llm_weight_cache_mb, 16384, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MB, NULL, NULL, NULL);
	DefineCustomIntVariable("pg_llm.debug_build_pause_lock",
							"For tests: halfway through building a shared copy, wait for this session advisory lock (0 = never).",
							NULL, &debug_pause_lock, 0, 0, INT_MAX,
							PGC_SUSET, GUC_NOT_IN_SAMPLE, NULL, NULL, NULL);
}

static uint64
align_up(uint64 x, uint64 a)
{
	return (x + a - 1) & ~(a - 1);
}

/* ---- writing a copy ------------------------------------------------------------------------ */

static void
debug_pause(void)
{
	DirectFunctionCall1(pg_advisory_lock_shared_int8, Int64GetDatum(debug_pause_lock));
	DirectFunctionCall1(pg_advisory_unlock_shared_int8, Int64GetDatum(debug_pause_lock));
}

static void
write_file(LlmWcWriter *w, const char *src, uint64 len, uint64 pos)
{
	while (len > 0 && w->error == 0)
	{
		ssize_t		n = pwrite(w->fd, src, len, (off_t) pos);

		if (n < 0 && errno != EINTR)
			w->error = errno;
		else if (n > 0)
			src += n, len -= n, pos += n;
	}
}

/* Writes len bytes at pos, all inside the huge page at start of length page_len. */
static void
write_page_part(LlmWcWriter *w, const char *src, uint64 len, uint64 pos, uint64 start, uint64 page_len)
{
	WcStage    *st = NULL;

	if (len == page_len)
	{
		write_file(w, src, len, pos);
		return;
	}
	for (int i = 0; i < w->n_stages && st == NULL; i++)
		if (w->stages[i].start == start)
			st = &w->stages[i];
	if (st == NULL)
	{
		if (w->n_stages == w->max_stages)
		{
			w->max_stages = Max(16, 2 * w->max_stages);
			w->stages = w->stages ? repalloc(w->stages, w->max_stages * sizeof(WcStage))
				: MemoryContextAlloc(w->cxt, w->max_stages * sizeof(WcStage));
		}
		st = &w->stages[w->n_stages++];
		st->start = start;
		st->len = page_len;
		st->filled = 0;
		st->data = MemoryContextAllocZero(w->cxt, page_len);
	}
	memcpy(st->data + (pos - start), src, len);
	st->filled += len;
	if (st->filled == st->len)
	{
		write_file(w, st->data, st->len, st->start);
		pfree(st->data);
		*st = w->stages[--w->n_stages];
	}
}

/* Writes what is left in the stages (pages whose every byte the fill did not write). */
static void
flush_stages(LlmWcWriter *w)
{
	while (w->n_stages > 0)
	{
		WcStage    *st = &w->stages[--w->n_stages];

		write_file(w, st->data, st->len, st->start);
		pfree(st->data);
	}
}

void
llm_wc_write(LlmWcWriter *w, int section, size_t offset, const void *src, size_t len)
{
	if (section < 0 || section >= w->n_sections || offset > w->bytes[section] || len > w->bytes[section] - offset)
		elog(ERROR, "write past section %d of a weight copy", section);
	if (w->fd < 0)
	{
		memcpy(w->base + w->offset[section] + offset, src, len);
		return;
	}
	w->written += len;
	while (len > 0)
	{
		/* sections start on a huge page, so pages are aligned in the section too */
		uint64		start = offset & ~(WC_SECTION_ALIGN - 1);
		uint64		page_len = Min(WC_SECTION_ALIGN, w->bytes[section] - start);
		uint64		n = Min(len, start + page_len - offset);

		write_page_part(w, src, n, w->offset[section] + offset, w->offset[section] + start, page_len);
		src = (const char *) src + n;
		offset += n;
		len -= n;
	}
	if (w->pause_at > 0 && w->written >= w->pause_at)
	{
		w->pause_at = 0;
		debug_pause();
	}
}

static void
writer_init(LlmWcWriter *w, const LlmWcFormat *fmt, int fd, char *base, const uint64 *offsets)
{
	memset(w, 0, sizeof(*w));
	w->cxt = CurrentMemoryContext;
	w->fd = fd;
	w->base = base;
	w->n_sections = fmt->n_sections;
	for (int s = 0; s < fmt->n_sections; s++)
	{
		w->offset[s] = offsets[s];
		w->bytes[s] = fmt->section_bytes[s];
	}
}

/* ---- private copies ------------------------------------------------------------------------ */

static LlmWcCopy *
private_copy(const LlmConfig *cfg, const LlmWcFormat *fmt)
{
	LlmWcCopy  *copy = MemoryContextAllocZero(TopMemoryContext, sizeof(LlmWcCopy));
	uint64		offsets[LLM_WC_MAX_SECTIONS];
	uint64		total = 0;
	LlmWcWriter w;

	for (int s = 0; s < fmt->n_sections; s++)
	{
		offsets[s] = total;
		total += align_up(fmt->section_bytes[s], 64);
	}
	total = align_up(Max(total, 1), WC_SECTION_ALIGN);
	copy->base = aligned_alloc(WC_SECTION_ALIGN, total);
	if (copy->base == NULL)
	{
		pfree(copy);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory loading model \"%s\"", cfg->model),
				 errdetail("The weights need %llu MB.", (unsigned long long) (total >> 20))));
	}
#ifdef MADV_HUGEPAGE
	/* huge pages where THP is "madvise" (decode streams every weight: fewer TLB misses) */
	(void) madvise(copy->base, total, MADV_HUGEPAGE);
#endif
	copy->bytes = total;
	copy->writable = true;
	copy->fd = -1;
	copy->n_sections = fmt->n_sections;
	for (int s = 0; s < fmt->n_sections; s++)
	{
		copy->section[s] = copy->base + offsets[s];
		copy->section_bytes[s] = fmt->section_bytes[s];
	}
	writer_init(&w, fmt, -1, copy->base, offsets);
	PG_TRY();
	{
		fmt->fill(cfg, &w, fmt->arg);
	}
	PG_CATCH();
	{
		free(copy->base);
		pfree(copy);
		PG_RE_THROW();
	}
	PG_END_TRY();
	return copy;
}

/* ---- names, headers, locks ----------------------------------------------------------------- */

static void
make_key(Oid database, const LlmConfig *cfg, const LlmWcFormat *fmt, WcKey *key)
{
	key->database = database;
	key->table_oid = cfg->table_oid;
	key->model_hash = hash_bytes_extended((const unsigned char *) cfg->model, strlen(cfg->model), 0);
	key->version = cfg->weights_version;
	key->format = fmt->name;
	snprintf(key->path, sizeof(key->path), "%s/%u_%u_%016llx_" INT64_FORMAT ".%s", WC_DIR,
			 key->database, key->table_oid, (unsigned long long) key->model_hash, key->version, fmt->name);
	snprintf(key->lock, sizeof(key->lock), "%s.lock", key->path);
}

/* Parses a data file's name; false for anything else (lock files, strays). */
static bool
parse_name(const char *name, WcEntry *e)
{
	unsigned long long hash;
	long long	version;
	int			end = -1;

	if (sscanf(name, "%u_%u_%16llx_%lld.%31[a-z0-9_]%n", &e->database, &e->table_oid, &hash, &version,
			   e->format, &end) != 5 || end < 0 || name[end] != '\0')
		return false;
	strlcpy(e->name, name, sizeof(e->name));
	e->model_hash = hash;
	e->version = version;
	return true;
}

static TimeLineID
current_timeline(void)
{
	TimeLineID	tli = 0;

	if (RecoveryInProgress())
		(void) GetXLogReplayRecPtr(&tli);
	else
		tli = GetWALInsertionTimeLine();
	return tli;
}

/* The header a valid copy of cfg in this format has (built_at and crc aside). */
static void
expected_header(WcHeader *h, const WcKey *key, const LlmConfig *cfg, const LlmWcFormat *fmt)
{
	uint64		offset = WC_SECTION_ALIGN;

	memset(h, 0, sizeof(*h));
	memcpy(h->magic, WC_MAGIC, sizeof(h->magic));
	h->file_version = WC_FILE_VERSION;
	h->system_id = GetSystemIdentifier();
	h->timeline = current_timeline();
	h->database = key->database;
	h->table_oid = key->table_oid;
	h->weights_version = key->version;
	strlcpy(h->model, cfg->model, sizeof(h->model));
	strlcpy(h->format, fmt->name, sizeof(h->format));
	h->n_layer = cfg->n_layer;
	h->n_head = cfg->n_head;
	h->d_model = cfg->d_model;
	h->n_positions = cfg->n_positions;
	h->vocab = cfg->vocab;
	h->layout = fmt->layout;
	h->precision = fmt->precision;
	h->n_sections = fmt->n_sections;
	for (int s = 0; s < fmt->n_sections; s++)
	{
		h->sections[s].id = fmt->section_id[s];
		h->sections[s].offset = offset;
		h->sections[s].bytes = fmt->section_bytes[s];
		offset = align_up(offset + fmt->section_bytes[s], WC_SECTION_ALIGN);
	}
	h->file_bytes = fmt->n_sections > 0 ? align_up(h->sections[fmt->n_sections - 1].offset +
												   h->sections[fmt->n_sections - 1].bytes, 4096) : WC_HEADER_BYTES;
}

static pg_crc32c
header_crc(const WcHeader *h)
{
	WcHeader	copy = *h;
	pg_crc32c	crc;

	copy.crc = 0;
	INIT_CRC32C(crc);
	COMP_CRC32C(crc, &copy, sizeof(copy));
	FIN_CRC32C(crc);
	return crc;
}

/* Reads a copy's header; NULL when it is a valid copy of `want`, else why not. */
static const char *
check_header(int fd, const WcHeader *want, WcHeader *h)
{
	struct stat st;
	WcHeader	cmp;

	if (pread(fd, h, sizeof(*h), 0) != sizeof(*h) || fstat(fd, &st) != 0)
		return "its header cannot be read";
	if (memcmp(h->magic, WC_MAGIC, sizeof(h->magic)) != 0)
		return "it is not a pg_llm weight file";
	if (h->file_version != WC_FILE_VERSION)
		return "another version of pg_llm wrote it";
	if (!EQ_CRC32C(h->crc, header_crc(h)))
		return "its header is corrupt";
	if ((uint64) st.st_size != h->file_bytes)
		return "it has the wrong size";
	if (h->system_id != want->system_id || h->timeline != want->timeline)
		return "it was built on another system or timeline";
	cmp = *h;
	cmp.crc = 0;
	cmp.built_at = 0;
	if (memcmp(&cmp, want, sizeof(cmp)) != 0)
		return "it holds other weights or another layout";
	return NULL;
}

/* Takes flock op on fd, waiting as long as it takes; cancel and termination work meanwhile. */
static void
wait_flock(int fd, int op, const char *path)
{
	while (flock(fd, op | LOCK_NB) != 0)
	{
		if (errno != EWOULDBLOCK && errno != EINTR)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not lock \"%s\": %m", path)));
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

int
llm_open_locked(const char *path, int op, bool create, int *slot)
{
	struct stat a,
				b;
	int			fd = open(path, (create ? O_RDWR | O_CREAT : O_RDONLY) | O_CLOEXEC, pg_file_create_mode);

	if (fd < 0)
		return -1;
	*slot = fd;
	wait_flock(fd, op, path);
	*slot = -1;
	if (fstat(fd, &a) != 0 || stat(path, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev)
	{
		close(fd);
		errno = ENOENT;			/* gone or replaced: the caller starts again */
		return -1;
	}
	return fd;
}

static void
touch(int fd)
{
	struct timespec times[2] = {{.tv_nsec = UTIME_NOW}, {.tv_nsec = UTIME_OMIT}};

	(void) futimens(fd, times);
}

/* ---- the directory ------------------------------------------------------------------------- */

/* The data files in the directory (a List of WcEntry *). */
static List *
scan_dir(void)
{
	List	   *entries = NIL;
	DIR		   *dir = AllocateDir(WC_DIR);
	struct dirent *de;

	while ((de = ReadDirExtended(dir, WC_DIR, LOG)) != NULL)
	{
		WcEntry    *e = palloc0(sizeof(WcEntry));
		char		path[MAXPGPATH];
		struct stat st;

		snprintf(path, sizeof(path), "%s/%s", WC_DIR, de->d_name);
		if (!parse_name(de->d_name, e) || stat(path, &st) != 0 || !S_ISREG(st.st_mode))
		{
			pfree(e);
			continue;
		}
		e->bytes = (uint64) st.st_size;
		e->last_used = st.st_atim;
		e->dev = st.st_dev;
		e->ino = st.st_ino;
		entries = lappend(entries, e);
	}
	FreeDir(dir);
	return entries;
}

/* Unlinks an entry when no backend maps it; true when it is gone. */
static bool
evict(const WcEntry *e)
{
	char		path[MAXPGPATH];
	struct stat st;
	int			fd;
	bool		gone = false;

	snprintf(path, sizeof(path), "%s/%s", WC_DIR, e->name);
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOATIME);
	if (fd < 0)
		return errno == ENOENT;
	if (flock(fd, LOCK_EX | LOCK_NB) == 0)
		gone = fstat(fd, &st) == 0 && st.st_ino == e->ino && st.st_dev == e->dev && unlink(path) == 0;
	close(fd);
	if (gone)
		ereport(DEBUG1, (errmsg_internal("pg_llm: evicted the shared copy \"%s\"", path)));
	return gone;
}

/*
 * Whether e is a copy of an older version of key's model, in any format (or one of a dropped
 * pg_llm): a version is stale in every precision once a newer one exists.
 */
static bool
replaced_by(const WcEntry *e, const WcKey *key)
{
	return e->database == key->database && e->model_hash == key->model_hash &&
		(e->table_oid != key->table_oid || e->version < key->version);
}

static int
by_last_use(const ListCell *a, const ListCell *b)
{
	const WcEntry *x = lfirst(a),
			   *y = lfirst(b);

	if (x->last_used.tv_sec != y->last_used.tv_sec)
		return x->last_used.tv_sec < y->last_used.tv_sec ? -1 : 1;
	return (x->last_used.tv_nsec > y->last_used.tv_nsec) - (x->last_used.tv_nsec < y->last_used.tv_nsec);
}

/*
 * With the directory locked: evicts unused copies, least recently used first, until `bytes` more
 * fit in pg_llm.weight_cache_size, not counting what key replaces. Removes the copies of dropped
 * databases. Sets *newer when the directory holds a newer version of key's model (any format).
 * Returns whether the copy fits; *used gets what the others take.
 */
static bool
make_room(const WcKey *key, uint64 bytes, uint64 *used, bool *newer)
{
	uint64		limit = (uint64) llm_weight_cache_mb << 20;
	List	   *entries = scan_dir();
	List	   *candidates = NIL;
	ListCell   *lc;

	*used = 0;
	*newer = false;
	foreach(lc, entries)
	{
		WcEntry    *e = lfirst(lc);

		if (e->database != key->database && !SearchSysCacheExists1(DATABASEOID, ObjectIdGetDatum(e->database)))
		{
			(void) evict(e);
			continue;
		}
		if (replaced_by(e, key))
			continue;
		*newer |= e->database == key->database && e->table_oid == key->table_oid &&
			e->model_hash == key->model_hash && e->version > key->version;
		*used += e->bytes;
		candidates = lappend(candidates, e);
	}
	list_sort(candidates, by_last_use);
	foreach(lc, candidates)
	{
		WcEntry    *e = lfirst(lc);

		if (*used + bytes <= limit)
			break;
		if (evict(e))
			*used -= e->bytes;
	}
	list_free(candidates);
	list_free_deep(entries);
	return *used + bytes <= limit;
}

static void
lock_dir(WcFds *fds)
{
	int			fd = open(WC_DIR, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open directory \"%s\": %m", WC_DIR)));
	fds->dir = fd;
	wait_flock(fd, LOCK_EX, WC_DIR);
}

static void
unlock_dir(WcFds *fds)
{
	close(fds->dir);
	fds->dir = -1;
}

/* ---- shared copies ------------------------------------------------------------------------- */

/* Says why a model is served from a private copy after all. */
static void
use_private(const LlmConfig *cfg, const char *detail, const char *hint)
{
	ereport(WARNING,
			(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
			 errmsg("model \"%s\" is served from a private copy of its weights in this backend", cfg->model),
			 errdetail_internal("%s", detail),
			 hint ? errhint("%s", hint) : 0));
}

static void
no_room(const LlmConfig *cfg, uint64 bytes, uint64 used)
{
	use_private(cfg, psprintf("Its copy needs %llu MB; pg_llm.weight_cache_size is %d MB, and copies in use take %llu MB.",
							  (unsigned long long) (bytes >> 20), llm_weight_cache_mb, (unsigned long long) (used >> 20)),
				"Raise pg_llm.weight_cache_size (ALTER SYSTEM, then SELECT pg_reload_conf()).");
}

#define IO_HINT "Check the free space and permissions of the data directory's " WC_DIR ", or SET pg_llm.shared_weights = off."

/* Maps a valid copy (fd holds a shared lock on it) into a new LlmWcCopy; NULL when mmap fails. */
static LlmWcCopy *
map_copy(int fd, const WcHeader *h, bool shared)
{
	LlmWcCopy  *copy = MemoryContextAllocZero(TopMemoryContext, sizeof(LlmWcCopy));
	char	   *base = mmap(NULL, h->file_bytes, PROT_READ, MAP_SHARED, fd, 0);

	if (base == MAP_FAILED)
	{
		pfree(copy);
		return NULL;
	}
#ifdef MADV_HUGEPAGE
	/* pages read back from disk come in 2 MB folios too (large-folio filesystems) */
	(void) madvise(base, h->file_bytes, MADV_HUGEPAGE);
#endif
	/* after a restart the pages may be on disk only: read them ahead, all are needed */
	(void) madvise(base, h->file_bytes, MADV_WILLNEED);
	touch(fd);
	copy->shared = shared;
	copy->base = base;
	copy->bytes = h->file_bytes;
	copy->fd = fd;
	copy->n_sections = (int) h->n_sections;
	for (uint32 s = 0; s < h->n_sections; s++)
	{
		copy->section[s] = base + h->sections[s].offset;
		copy->section_bytes[s] = h->sections[s].bytes;
	}
	return copy;
}

/* Allocates the file's blocks up front (ENOSPC here, not halfway); 0 or an errno. */
static int
reserve(int fd, const WcHeader *h)
{
	int			err;

	if (ftruncate(fd, (off_t) h->file_bytes) != 0)
		return errno;
	err = posix_fallocate(fd, 0, WC_HEADER_BYTES);
	for (uint32 s = 0; err == 0 && s < h->n_sections; s++)
		err = posix_fallocate(fd, (off_t) h->sections[s].offset, (off_t) h->sections[s].bytes);
	return err;
}

/*
 * Builds the copy, holding the key's lock: an unnamed file, filled, flushed, then linked under its
 * name with the directory locked (unlinking the versions it replaces). NULL, with a WARNING, when
 * it cannot be; a copy that was built but cannot be linked stays this backend's own.
 */
static LlmWcCopy *
build_copy(const WcKey *key, const LlmConfig *cfg, const LlmWcFormat *fmt, WcFds *fds)
{
	WcHeader   *h = palloc0(WC_HEADER_BYTES);
	uint64		used,
				offsets[LLM_WC_MAX_SECTIONS];
	bool		fits,
				newer,
				linked = false;
	LlmWcWriter w;
	LlmWcCopy  *copy;
	char		proc_path[64];
	int			err;

	expected_header(h, key, cfg, fmt);
	lock_dir(fds);
	fits = make_room(key, h->file_bytes, &used, &newer);
	unlock_dir(fds);
	if (!fits)
	{
		no_room(cfg, h->file_bytes, used);
		return NULL;
	}

#ifdef O_TMPFILE
	fds->file = open(WC_DIR, O_TMPFILE | O_RDWR | O_CLOEXEC, pg_file_create_mode);
#else
	errno = ENOTSUP;
#endif
	if (fds->file < 0)
	{
		use_private(cfg, psprintf("Could not create a file in \"%s\": %m.", WC_DIR), IO_HINT);
		return NULL;
	}
	if ((err = reserve(fds->file, h)) != 0)
	{
		errno = err;
		use_private(cfg, psprintf("Could not allocate %llu MB in \"%s\": %m.",
								  (unsigned long long) (h->file_bytes >> 20), WC_DIR), IO_HINT);
		return NULL;
	}

	for (uint32 s = 0; s < h->n_sections; s++)
		offsets[s] = h->sections[s].offset;
	writer_init(&w, fmt, fds->file, NULL, offsets);
	for (uint32 s = 0; debug_pause_lock > 0 && s < h->n_sections; s++)
		w.pause_at += h->sections[s].bytes / 2 + 1;
	fmt->fill(cfg, &w, fmt->arg);
	flush_stages(&w);

	h->built_at = GetCurrentTimestamp();
	h->crc = header_crc(h);
	if (w.error == 0 && pwrite(fds->file, h, WC_HEADER_BYTES, 0) != WC_HEADER_BYTES)
		w.error = errno ? errno : EIO;
	if (w.error == 0 && fdatasync(fds->file) != 0)
		w.error = errno;
	if (w.error == 0 && flock(fds->file, LOCK_SH) != 0)
		w.error = errno;
	if (w.error != 0)
	{
		errno = w.error;
		use_private(cfg, psprintf("Could not write a file in \"%s\": %m.", WC_DIR), IO_HINT);
		return NULL;
	}

	/* publish it, unless it does not fit after all or a newer version appeared meanwhile */
	lock_dir(fds);
	fits = make_room(key, h->file_bytes, &used, &newer);
	if (!fits)
		no_room(cfg, h->file_bytes, used);
	else if (!newer)
	{
		snprintf(proc_path, sizeof(proc_path), "/proc/self/fd/%d", fds->file);
		linked = linkat(AT_FDCWD, proc_path, AT_FDCWD, key->path, AT_SYMLINK_FOLLOW) == 0;
		if (!linked)
			ereport(WARNING,
					(errcode_for_file_access(),
					 errmsg("could not link the shared copy \"%s\": %m", key->path),
					 errdetail("Model \"%s\" is served from a copy private to this backend.", cfg->model)));
	}
	if (linked)
	{
		List	   *entries = scan_dir();
		ListCell   *lc;

		foreach(lc, entries)
		{
			WcEntry    *e = lfirst(lc);
			char		path[MAXPGPATH];

			snprintf(path, sizeof(path), "%s/%s", WC_DIR, e->name);
			if (replaced_by(e, key) && unlink(path) == 0)
				ereport(DEBUG1, (errmsg_internal("pg_llm: removed the replaced copy \"%s\"", path)));
		}
		list_free_deep(entries);
	}
	unlock_dir(fds);

	/* map it by its name, as every other backend does (the unnamed file's path says "deleted") */
	if (linked)
	{
		struct stat a,
					b;
		int			fd = open(key->path, O_RDONLY | O_CLOEXEC);

		if (fd >= 0 && flock(fd, LOCK_SH) == 0 && fstat(fd, &a) == 0 && fstat(fds->file, &b) == 0 &&
			a.st_ino == b.st_ino && a.st_dev == b.st_dev)
		{
			close(fds->file);
			fds->file = fd;
		}
		else if (fd >= 0)
			close(fd);
	}
	copy = map_copy(fds->file, h, linked);
	if (copy == NULL)
	{
		use_private(cfg, psprintf("Could not map \"%s\": %m.", key->path), IO_HINT);
		return NULL;
	}
	if (linked)
		strlcpy(copy->path, key->path, sizeof(copy->path));
	fds->file = -1;				/* the copy owns it */
	ereport(DEBUG1, (errmsg_internal("pg_llm: built the shared copy \"%s\" (%llu MB)", key->path,
									 (unsigned long long) (h->file_bytes >> 20))));
	return copy;
}

static void
close_fds(WcFds *fds, const WcKey *key)
{
	if (fds->lock >= 0)
	{
		/* only who holds the lock may unlink the lock file: the next one checks that it did */
		if (fds->lock_held)
			(void) unlink(key->lock);
		close(fds->lock);
	}
	if (fds->dir >= 0)
		close(fds->dir);
	if (fds->file >= 0)
		close(fds->file);
	fds->lock = fds->dir = fds->file = -1;
	fds->lock_held = false;
}

/* Opens a valid copy, or NULL; *invalid gets why an existing file is not one (NULL if absent). */
static LlmWcCopy *
open_copy(const WcKey *key, const WcHeader *want, WcFds *fds, const char **invalid, const LlmConfig *cfg,
		  bool *failed)
{
	WcHeader	h;
	LlmWcCopy  *copy;

	*invalid = NULL;
	fds->file = llm_open_locked(key->path, LOCK_SH, false, &fds->file);
	if (fds->file < 0)
	{
		if (errno != ENOENT)
		{
			use_private(cfg, psprintf("Could not open \"%s\": %m.", key->path), IO_HINT);
			*failed = true;
		}
		return NULL;
	}
	if ((*invalid = check_header(fds->file, want, &h)) != NULL)
	{
		close(fds->file);
		fds->file = -1;
		return NULL;
	}
	copy = map_copy(fds->file, &h, true);
	if (copy == NULL)
	{
		use_private(cfg, psprintf("Could not map \"%s\": %m.", key->path), IO_HINT);
		*failed = true;
		return NULL;
	}
	strlcpy(copy->path, key->path, sizeof(copy->path));
	fds->file = -1;
	return copy;
}

/* The shared copy, mapped or built; NULL (after a WARNING) when this backend must use its own. */
static LlmWcCopy *
shared_copy(const LlmConfig *cfg, const LlmWcFormat *fmt)
{
	WcKey		key;
	WcHeader   *want = palloc(sizeof(WcHeader));
	WcFds		fds = {.lock = -1, .dir = -1, .file = -1};
	LlmWcCopy  *copy = NULL;
	bool		failed = false;

	make_key(MyDatabaseId, cfg, fmt, &key);
	expected_header(want, &key, cfg, fmt);
	if (MakePGDirectory(WC_DIR) != 0 && errno != EEXIST)
	{
		use_private(cfg, psprintf("Could not create directory \"%s\": %m.", WC_DIR), IO_HINT);
		return NULL;
	}
	PG_TRY();
	{
		while (copy == NULL && !failed)
		{
			const char *invalid;

			CHECK_FOR_INTERRUPTS();
			copy = open_copy(&key, want, &fds, &invalid, cfg, &failed);
			if (copy != NULL || failed)
				break;

			/* absent or invalid: build it, or wait for whoever builds it */
			fds.lock = llm_open_locked(key.lock, LOCK_EX, true, &fds.lock);
			if (fds.lock < 0)
			{
				if (errno == ENOENT)
					continue;	/* its builder finished meanwhile */
				use_private(cfg, psprintf("Could not lock \"%s\": %m.", key.lock), IO_HINT);
				failed = true;
				break;
			}
			fds.lock_held = true;
			copy = open_copy(&key, want, &fds, &invalid, cfg, &failed);
			if (copy == NULL && !failed)
			{
				if (invalid != NULL && unlink(key.path) == 0)
					ereport(LOG,
							(errmsg("pg_llm: rebuilding the shared copy \"%s\" of model \"%s\": %s",
									key.path, cfg->model, invalid)));
				copy = build_copy(&key, cfg, fmt, &fds);
				failed = copy == NULL;
			}
			close_fds(&fds, &key);
		}
	}
	PG_CATCH();
	{
		close_fds(&fds, &key);
		PG_RE_THROW();
	}
	PG_END_TRY();
	close_fds(&fds, &key);
	pfree(want);
	return copy;
}

LlmWcCopy *
llm_wc_get(const LlmConfig *cfg, const LlmWcFormat *fmt, bool shared)
{
	LlmWcCopy  *copy = shared ? shared_copy(cfg, fmt) : NULL;

	return copy != NULL ? copy : private_copy(cfg, fmt);
}

LlmWcCopy *
llm_wc_map_shared(Oid database, const LlmConfig *cfg, const LlmWcFormat *fmt)
{
	WcKey		key;
	WcHeader	want;
	WcFds		fds = {.lock = -1, .dir = -1, .file = -1};
	const char *invalid;
	bool		failed = false;
	LlmWcCopy  *copy;

	make_key(database, cfg, fmt, &key);
	expected_header(&want, &key, cfg, fmt);
	copy = open_copy(&key, &want, &fds, &invalid, cfg, &failed);
	close_fds(&fds, &key);
	return copy;
}

void
llm_wc_release(LlmWcCopy *copy)
{
	if (copy == NULL)
		return;
	if (copy->fd >= 0)
	{
		touch(copy->fd);		/* its last use, for eviction */
		(void) munmap(copy->base, copy->bytes);
		close(copy->fd);
	}
	else
		free(copy->base);
	pfree(copy);
}

/* ---- SQL: pg_llm_weight_cache() ------------------------------------------------------------ */

/* How many processes hold a shared flock on each file (from /proc/locks); NULL if unreadable. */
static bool
count_mappers(const WcEntry *e, int *count)
{
	FILE	   *f = AllocateFile("/proc/locks", "r");
	char		line[256];

	*count = 0;
	if (f == NULL)
		return false;
	while (fgets(line, sizeof(line), f) != NULL)
	{
		unsigned int maj,
					min;
		unsigned long ino;
		int			pid;

		if (sscanf(line, "%*d: FLOCK ADVISORY READ %d %x:%x:%lu", &pid, &maj, &min, &ino) == 4 &&
			maj == major(e->dev) && min == minor(e->dev) && ino == (unsigned long) e->ino)
			(*count)++;
	}
	FreeFile(f);
	return true;
}

PG_FUNCTION_INFO_V1(pg_llm_weight_cache);

/*
 * pg_llm_weight_cache() -> (database, model, weights_version, format, bytes, built_at, last_used,
 * backends, path): the shared copies on this server. Roles with the privileges of pg_read_all_stats
 * see all of them; others those of this database's models whose weights they may read.
 */
Datum
pg_llm_weight_cache(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bool		all = has_privs_of_role(GetUserId(), ROLE_PG_READ_ALL_STATS);
	List	   *entries;
	ListCell   *lc;
	struct stat st;

	InitMaterializedSRF(fcinfo, 0);
	if (stat(WC_DIR, &st) != 0)
		PG_RETURN_VOID();
	entries = scan_dir();
	foreach(lc, entries)
	{
		WcEntry    *e = lfirst(lc);
		Datum		values[9] = {0};
		bool		nulls[9] = {0};
		char		path[MAXPGPATH];
		char	   *db;
		WcHeader	h;
		int			fd,
					count;
		bool		header_ok;

		if (e->database != MyDatabaseId && !all)
			continue;
		snprintf(path, sizeof(path), "%s/%s", WC_DIR, e->name);
		fd = open(path, O_RDONLY | O_CLOEXEC | O_NOATIME);	/* looking is no use */
		header_ok = fd >= 0 && pread(fd, &h, sizeof(h), 0) == sizeof(h) &&
			memcmp(h.magic, WC_MAGIC, sizeof(h.magic)) == 0 && EQ_CRC32C(h.crc, header_crc(&h));
		if (header_ok)
			h.model[sizeof(h.model) - 1] = '\0';
		if (fd >= 0)
			close(fd);
		/* a model's copies are shown to whoever may read its weights, all of them to monitoring roles */
		if (!all && (!header_ok || !llm_may_see_model(h.model)))
			continue;
		db = get_database_name(e->database);
		values[0] = db ? CStringGetTextDatum(db) : (Datum) 0;
		nulls[0] = db == NULL;
		if (header_ok)
		{
			values[1] = CStringGetTextDatum(h.model);
			values[5] = TimestampTzGetDatum(h.built_at);
		}
		nulls[1] = nulls[5] = !header_ok;
		values[2] = Int64GetDatum(e->version);
		values[3] = CStringGetTextDatum(e->format);
		values[4] = Int64GetDatum((int64) e->bytes);
		values[6] = TimestampTzGetDatum(time_t_to_timestamptz(e->last_used.tv_sec) + e->last_used.tv_nsec / 1000);
		nulls[7] = !count_mappers(e, &count);
		values[7] = Int32GetDatum(count);
		values[8] = CStringGetTextDatum(path);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_VOID();
}

/* ---- SQL: pg_llm_weight_cache_discard(model) ----------------------------------------------- */

PG_FUNCTION_INFO_V1(pg_llm_weight_cache_discard);

/*
 * pg_llm_weight_cache_discard(model text) -> int: unlinks every shared copy of the model in this
 * database, whatever its version and format, and returns how many. llm_model_drop and
 * llm_model_rename call it: the copies of a name that no longer has weights would otherwise stay
 * until evicted. Backends that map one keep its pages until their next call (as when a new version
 * replaces it), and the model's batch runner retires, as it does for a new version. A copy is only
 * a cache, so a drop that rolls back afterwards costs a rebuild, nothing more. Allowed to whoever
 * may delete the model's weights (DELETE on llm_param).
 */
Datum
pg_llm_weight_cache_discard(PG_FUNCTION_ARGS)
{
	char	   *model = text_to_cstring(PG_GETARG_TEXT_PP(0));
	uint64		hash = hash_bytes_extended((const unsigned char *) model, strlen(model), 0);
	Oid			param = DatumGetObjectId(DirectFunctionCall1(regclassin, CStringGetDatum(llm_table("llm_param"))));
	struct stat st;
	WcFds		fds = {.lock = -1, .dir = -1, .file = -1};
	List	   *entries;
	ListCell   *lc;
	int			n = 0;

	if (pg_class_aclcheck(param, GetUserId(), ACL_DELETE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to discard the shared copies of model \"%s\"", model),
				 errdetail("Discarding them is for roles that may delete the model's weights (DELETE on llm_param).")));
	if (stat(WC_DIR, &st) != 0)
		PG_RETURN_INT32(0);
	lock_dir(&fds);
	entries = scan_dir();
	foreach(lc, entries)
	{
		WcEntry    *e = lfirst(lc);
		char		path[MAXPGPATH];

		snprintf(path, sizeof(path), "%s/%s", WC_DIR, e->name);
		if (e->database == MyDatabaseId && e->model_hash == hash && unlink(path) == 0)
			n++;
	}
	unlock_dir(&fds);
	list_free_deep(entries);
	PG_RETURN_INT32(n);
}
