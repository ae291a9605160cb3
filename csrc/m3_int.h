/*
 * m3_int.h -- private helpers shared by the C files of csrc/; not part of the cffi API.
 *
 * M3_ASSERT(cond) checks an internal invariant in debug and sanitizer builds (M3_DEBUG, set by
 * csrc/build_ffi.py for M3SHM_SANITIZE=1 and M3SHM_DEBUG=1) and costs nothing in release builds.
 * It never guards against bad input: untrusted bytes get an error code, not an assertion.
 */
#ifndef M3_INT_H
#define M3_INT_H

#ifdef M3_DEBUG
#include <stdio.h>
#include <stdlib.h>
#define M3_ASSERT(cond)                                                                      \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "m3shm invariant failed: %s at %s:%d\n", #cond, __FILE__,        \
                    __LINE__);                                                               \
            abort();                                                                         \
        }                                                                                    \
    } while (0)
#else
#define M3_ASSERT(cond) ((void)0)
#endif

#endif
