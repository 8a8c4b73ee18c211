/* File helpers: whole-file reads, read-only maps, atomic replace. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error_impl.h"
#include "core/file_impl.h"

caprl_status caprl_file_read_all(const char *path, size_t max_size, uint8_t **data, size_t *size, caprl_error *err) {
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fileno(fp), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(fp);
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: not a regular file", path);
    }
    if ((uint64_t)st.st_size > (uint64_t)max_size) {
        fclose(fp);
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: file is %lld bytes, more than the limit of %zu", path,
                             (long long)st.st_size, max_size);
    }
    size_t   n = (size_t)st.st_size;
    uint8_t *buf = caprl_try_malloc(n + 1);
    if (!buf) {
        fclose(fp);
        return caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate %zu bytes", path, n + 1);
    }
    size_t got = fread(buf, 1, n, fp);
    int    read_error = ferror(fp);
    fclose(fp);
    if (got != n || read_error) {
        free(buf);
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: short read (%zu of %zu bytes)", path, got, n);
    }
    buf[n] = 0;
    *data = buf;
    *size = n;
    return CAPRL_OK;
}

caprl_status caprl_file_map(caprl_mapped_file *mf, const char *path, caprl_error *err) {
    memset(mf, 0, sizeof *mf);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: not a regular file", path);
    }
    size_t n = (size_t)st.st_size;
    if (n > 0) {
        void *p = mmap(NULL, n, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            close(fd);
            return caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot map %zu bytes: %s", path, n, strerror(errno));
        }
        mf->data = p;
    }
    close(fd);
    mf->size = n;
    mf->path = caprl_xstrdup(path);
    return CAPRL_OK;
}

void caprl_file_unmap(caprl_mapped_file *mf) {
    if (!mf) {
        return;
    }
    if (mf->data) {
        munmap((void *)(uintptr_t)mf->data, mf->size);
    }
    free(mf->path);
    memset(mf, 0, sizeof *mf);
}

/* ---- atomic replace -------------------------------------------------------------------------------------- */

caprl_status caprl_atomic_open(caprl_atomic_file *af, const char *path, caprl_error *err) {
    memset(af, 0, sizeof *af);
    af->path = caprl_xstrdup(path);
    af->tmp_path = caprl_xasprintf("%s.tmp.%ld", path, (long)getpid());
    FILE *fp = fopen(af->tmp_path, "wb");
    if (!fp) {
        caprl_status st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot create: %s", af->tmp_path, strerror(errno));
        free(af->path);
        free(af->tmp_path);
        memset(af, 0, sizeof *af);
        return st;
    }
    af->fp = fp;
    return CAPRL_OK;
}

caprl_status caprl_atomic_write(caprl_atomic_file *af, const void *data, size_t n, caprl_error *err) {
    if (n && fwrite(data, 1, n, (FILE *)af->fp) != n) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: write failed: %s", af->tmp_path, strerror(errno));
    }
    return CAPRL_OK;
}

static void fsync_parent_dir(const char *path) {
    char *copy = caprl_xstrdup(path);
    int   fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
    free(copy);
}

caprl_status caprl_atomic_commit(caprl_atomic_file *af, caprl_error *err) {
    FILE *fp = af->fp;
    af->fp = NULL;
    bool ok = fflush(fp) == 0 && fsync(fileno(fp)) == 0;
    ok = (fclose(fp) == 0) && ok;
    if (!ok) {
        caprl_status st = caprl_err_set(err, CAPRL_ERR_IO, "%s: flush failed: %s", af->tmp_path, strerror(errno));
        caprl_atomic_abort(af);
        return st;
    }
    if (rename(af->tmp_path, af->path) != 0) {
        caprl_status st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot rename to %s: %s", af->tmp_path, af->path,
                                        strerror(errno));
        caprl_atomic_abort(af);
        return st;
    }
    fsync_parent_dir(af->path);
    free(af->path);
    free(af->tmp_path);
    memset(af, 0, sizeof *af);
    return CAPRL_OK;
}

void caprl_atomic_abort(caprl_atomic_file *af) {
    if (!af) {
        return;
    }
    if (af->fp) {
        fclose((FILE *)af->fp);
    }
    if (af->tmp_path) {
        (void)unlink(af->tmp_path);
    }
    free(af->path);
    free(af->tmp_path);
    memset(af, 0, sizeof *af);
}

char *caprl_path_join(const char *dir, const char *name) {
    size_t n = strlen(dir);
    if (n == 0) {
        return caprl_xstrdup(name);
    }
    return caprl_xasprintf("%s%s%s", dir, dir[n - 1] == '/' ? "" : "/", name);
}

char *caprl_path_dir(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) {
        return caprl_xstrdup("");
    }
    return slash == path ? caprl_xstrdup("/") : caprl_xstrndup(path, (size_t)(slash - path));
}

bool caprl_path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

bool caprl_path_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

caprl_status caprl_mkdir_p(const char *dir, caprl_error *err) {
    char *path = caprl_xstrdup(dir);
    for (char *p = path + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(path, 0755) != 0 && errno != EEXIST) {
                caprl_status st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot create directory: %s", path,
                                                strerror(errno));
                free(path);
                return st;
            }
            *p = '/';
        }
    }
    caprl_status st = CAPRL_OK;
    if (mkdir(path, 0755) != 0 && errno != EEXIST) {
        st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot create directory: %s", path, strerror(errno));
    } else if (!caprl_path_is_dir(path)) {
        st = caprl_err_set(err, CAPRL_ERR_IO, "%s: exists and is not a directory", path);
    }
    free(path);
    return st;
}
