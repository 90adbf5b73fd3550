/*
 * shared_file.c: the files that the server's processes share, in the data directory's
 * pgsql_tmp_pg_llm/ (LLM_SHARED_DIR): the shared copies of the weights (weights/cache.c), the
 * thread budget (thread_budget.c) and the batch runners' slots (runner/).
 *
 * This is pg_llm's stand-in for a registry of named shared memory, which PostgreSQL 15 gives an
 * extension only at server start (17's named DSM segments were measured and not used: see
 * docs/architecture.md): a file has a name every process finds, mapping it costs a system call,
 * base backups skip pgsql_tmp* entries and nothing of it goes to WAL. A file that processes write
 * through their mappings has its blocks allocated when it is made, so that a full disk is an
 * error then, never a SIGBUS through the mapping later. flock says who holds a file: it is
 * dropped by the kernel however the holder ends.
 */
#include "base/base.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file_perm.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "storage/latch.h"
#include "utils/wait_event.h"

bool
llm_shared_dir_create(void)
{
	return MakePGDirectory(LLM_SHARED_DIR) == 0 || errno == EEXIST;
}

void
llm_shared_wait_flock(int fd, int op, const char *path)
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
llm_shared_open_locked(const char *path, int op, bool create, int *slot)
{
	struct stat a,
				b;
	int			fd = open(path, (create ? O_RDWR | O_CREAT : O_RDONLY) | O_CLOEXEC, pg_file_create_mode);

	if (fd < 0)
		return -1;
	*slot = fd;
	llm_shared_wait_flock(fd, op, path);
	*slot = -1;
	if (fstat(fd, &a) != 0 || stat(path, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev)
	{
		close(fd);
		errno = ENOENT;			/* gone or replaced: the caller starts again */
		return -1;
	}
	return fd;
}

void *
llm_shared_map(const char *path, size_t min_bytes, size_t *bytes, int *fd)
{
	struct stat st;
	void	   *map;

	*fd = open(path, O_RDWR | O_CLOEXEC);
	if (*fd < 0)
		return NULL;
	if (fstat(*fd, &st) != 0 || (size_t) st.st_size < min_bytes ||
		(map = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0)) == MAP_FAILED)
	{
		close(*fd);
		*fd = -1;
		return NULL;
	}
	*bytes = st.st_size;
	return map;
}

void *
llm_shared_create(const char *path, size_t bytes, int *fd)
{
	char	   *tmp = psprintf("%s.new", path);
	void	   *map;

	(void) unlink(tmp);
	*fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, pg_file_create_mode);
	if (*fd < 0)
		return NULL;
	if (posix_fallocate(*fd, 0, (off_t) bytes) != 0 ||
		(map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0)) == MAP_FAILED)
	{
		close(*fd);
		*fd = -1;
		(void) unlink(tmp);
		return NULL;
	}
	pfree(tmp);
	return map;
}

bool
llm_shared_publish(const char *path, void *map, size_t bytes, int fd)
{
	char	   *tmp = psprintf("%s.new", path);

	if (rename(tmp, path) == 0)
		return true;
	llm_shared_unmap(map, bytes, fd);
	(void) unlink(tmp);
	return false;
}

void *
llm_shared_map_or_create(const char *path, size_t bytes, int *err)
{
	int			fd = llm_shared_dir_create() ? open(path, O_RDWR | O_CREAT | O_CLOEXEC, pg_file_create_mode) : -1;
	void	   *map = NULL;

	*err = 0;
	if (fd < 0)
		*err = errno;
	else if ((*err = posix_fallocate(fd, 0, (off_t) bytes)) == 0)
	{
		map = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (map == MAP_FAILED)
		{
			*err = errno;
			map = NULL;
		}
	}
	if (fd >= 0)
		close(fd);				/* the mapping stays */
	return map;
}

void
llm_shared_unmap(void *map, size_t bytes, int fd)
{
	if (map != NULL)
		(void) munmap(map, bytes);
	if (fd >= 0)
		close(fd);
}

bool
llm_shared_held(int fd)
{
	if (flock(fd, LOCK_SH | LOCK_NB) == 0)
	{
		(void) flock(fd, LOCK_UN);
		return false;
	}
	return errno == EWOULDBLOCK;
}
