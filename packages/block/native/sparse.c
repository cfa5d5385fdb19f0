/* Sparse-file system calls Node's fs module lacks: hole punching, zero ranges, SEEK_DATA/HOLE.
 * Each returns the result or -errno; the JS side maps errors and falls back when absent. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <node_api.h>
#include <unistd.h>

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

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "fallocate", NAPI_AUTO_LENGTH, js_fallocate, NULL, &fn);
  napi_set_named_property(env, exports, "fallocate", fn);
  napi_create_function(env, "lseek", NAPI_AUTO_LENGTH, js_lseek, NULL, &fn);
  napi_set_named_property(env, exports, "lseek", fn);
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
  napi_create_int64(env, ENXIO, &c);
  napi_set_named_property(env, exports, "ENXIO", c);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
