/* Shared by the addon's files. */
#ifndef BLOCKREP_IOV_H
#define BLOCKREP_IOV_H
#include <node_api.h>
#include <sys/uio.h>

/* Buffers a vectored request may have. */
#define MAX_IOV 64

int buffers_to_iov(napi_env env, napi_value v, struct iovec *iov);

#endif
