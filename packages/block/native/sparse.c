/* System calls Node lacks: hole punching, zero ranges, SEEK_DATA/HOLE, preadv2
 * with flags (RWF_NOWAIT: read only what the page cache holds, never wait for the disk),
 * open-file-description byte locks (the image locking protocol QEMU uses), and a socket's send
 * buffer size (Node sets it only for UDP). writer.c adds a writer thread per image file for large
 * writes.
 * Each returns the result or -errno; the JS side maps errors and falls back when absent. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <node_api.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "iov.h"

static int64_t arg_i64(napi_env env, napi_value v) {
  int64_t r = 0;
  napi_get_value_int64(env, v, &r);
  return r;
}

static napi_value ret_i64(napi_env env, int64_t r) {
  napi_value out;
  napi_create_int64(env, r, &out);
  return out;
}

/* fallocate(fd, mode, offset, len) */
static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 4) return ret_i64(env, -EINVAL);
  int r = fallocate((int)arg_i64(env, argv[0]), (int)arg_i64(env, argv[1]), arg_i64(env, argv[2]), arg_i64(env, argv[3]));
  return ret_i64(env, r < 0 ? -errno : 0);
}

/* lseek(fd, offset, whence) */
static napi_value js_lseek(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3) return ret_i64(env, -EINVAL);
  off_t r = lseek((int)arg_i64(env, argv[0]), arg_i64(env, argv[1]), (int)arg_i64(env, argv[2]));
  return ret_i64(env, r < 0 ? -errno : (int64_t)r);
}

/* Fills iov (room for MAX_IOV) from a Buffer or an array of Buffers; returns the count, or -1
 * when it cannot. Shared with writer.c. */
int buffers_to_iov(napi_env env, napi_value v, struct iovec *iov) {
  bool is_array = false;
  napi_is_array(env, v, &is_array);
  if (!is_array) {
    void *data;
    size_t len;
    if (napi_get_buffer_info(env, v, &data, &len) != napi_ok) return -1;
    iov[0].iov_base = data;
    iov[0].iov_len = len;
    return 1;
  }
  uint32_t n = 0;
  napi_get_array_length(env, v, &n);
  if (n > MAX_IOV) return -1;
  for (uint32_t i = 0; i < n; i++) {
    napi_value el;
    void *data;
    size_t len;
    napi_get_element(env, v, i, &el);
    if (napi_get_buffer_info(env, el, &data, &len) != napi_ok) return -1;
    iov[i].iov_base = data;
    iov[i].iov_len = len;
  }
  return (int)n;
}

/* preadv2(fd, buffers, offset, flags): bytes read or -errno (-EINVAL for unusable buffers) */
static napi_value js_preadv2(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 4) return ret_i64(env, -EINVAL);
  struct iovec iov[MAX_IOV];
  int n = buffers_to_iov(env, argv[1], iov);
  if (n < 0) return ret_i64(env, -EINVAL);
  ssize_t r = preadv2((int)arg_i64(env, argv[0]), iov, n, arg_i64(env, argv[2]), (int)arg_i64(env, argv[3]));
  return ret_i64(env, r < 0 ? -errno : (int64_t)r);
}

/* The byte range [argv[1], argv[1] + argv[2]) as a lock request of the given type. */
static struct flock byte_range(napi_env env, napi_value *argv, short type) {
  struct flock fl = {0};
  fl.l_whence = SEEK_SET;
  fl.l_start = arg_i64(env, argv[1]);
  fl.l_len = arg_i64(env, argv[2]);
  fl.l_type = type;
  return fl;
}

/* ofdLock(fd, start, len, shared): a shared lock (shared = 1) or none (0) on the bytes, not
 * waiting. 0 or -errno. */
static napi_value js_ofd_lock(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 4) return ret_i64(env, -EINVAL);
  struct flock fl = byte_range(env, argv, arg_i64(env, argv[3]) ? F_RDLCK : F_UNLCK);
  int r = fcntl((int)arg_i64(env, argv[0]), F_OFD_SETLK, &fl);
  return ret_i64(env, r < 0 ? -errno : 0);
}

/* ofdHeld(fd, start, len): 1 when another open file description holds a lock on the bytes (an
 * exclusive lock could not be taken), 0 when none does. -errno on failure. */
static napi_value js_ofd_held(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3) return ret_i64(env, -EINVAL);
  struct flock fl = byte_range(env, argv, F_WRLCK);
  int r = fcntl((int)arg_i64(env, argv[0]), F_OFD_GETLK, &fl);
  if (r < 0) return ret_i64(env, -errno);
  return ret_i64(env, fl.l_type == F_UNLCK ? 0 : 1);
}

/* sndbuf(fd, bytes): sets a socket's send buffer to bytes (when bytes > 0; the kernel caps it at
 * net.core.wmem_max and doubles it for its bookkeeping), and returns the size in effect, or
 * -errno. */
static napi_value js_sndbuf(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 2) return ret_i64(env, -EINVAL);
  int fd = (int)arg_i64(env, argv[0]);
  int want = (int)arg_i64(env, argv[1]);
  if (want > 0 && setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof want) < 0) return ret_i64(env, -errno);
  int have = 0;
  socklen_t len = sizeof have;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &have, &len) < 0) return ret_i64(env, -errno);
  return ret_i64(env, have);
}

void writer_init(napi_env env, napi_value exports);

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  writer_init(env, exports);
  napi_create_function(env, "ofdLock", NAPI_AUTO_LENGTH, js_ofd_lock, NULL, &fn);
  napi_set_named_property(env, exports, "ofdLock", fn);
  napi_create_function(env, "ofdHeld", NAPI_AUTO_LENGTH, js_ofd_held, NULL, &fn);
  napi_set_named_property(env, exports, "ofdHeld", fn);
  napi_create_function(env, "preadv2", NAPI_AUTO_LENGTH, js_preadv2, NULL, &fn);
  napi_set_named_property(env, exports, "preadv2", fn);
  napi_create_function(env, "fallocate", NAPI_AUTO_LENGTH, js_fallocate, NULL, &fn);
  napi_set_named_property(env, exports, "fallocate", fn);
  napi_create_function(env, "lseek", NAPI_AUTO_LENGTH, js_lseek, NULL, &fn);
  napi_set_named_property(env, exports, "lseek", fn);
  napi_create_function(env, "sndbuf", NAPI_AUTO_LENGTH, js_sndbuf, NULL, &fn);
  napi_set_named_property(env, exports, "sndbuf", fn);
  napi_value c;
  napi_create_int64(env, FALLOC_FL_KEEP_SIZE, &c);
  napi_set_named_property(env, exports, "FALLOC_FL_KEEP_SIZE", c);
  napi_create_int64(env, FALLOC_FL_PUNCH_HOLE, &c);
  napi_set_named_property(env, exports, "FALLOC_FL_PUNCH_HOLE", c);
  napi_create_int64(env, FALLOC_FL_ZERO_RANGE, &c);
  napi_set_named_property(env, exports, "FALLOC_FL_ZERO_RANGE", c);
  napi_create_int64(env, SEEK_DATA, &c);
  napi_set_named_property(env, exports, "SEEK_DATA", c);
  napi_create_int64(env, SEEK_HOLE, &c);
  napi_set_named_property(env, exports, "SEEK_HOLE", c);
  napi_create_int64(env, RWF_NOWAIT, &c);
  napi_set_named_property(env, exports, "RWF_NOWAIT", c);
  napi_create_int64(env, ENXIO, &c);
  napi_set_named_property(env, exports, "ENXIO", c);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
