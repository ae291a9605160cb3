/*
 * gather.c -- copy compressed blocks from several buffers into one, in a new order.
 *
 * A query that merges answers (several sources of one namespace, or several namespaces of a
 * query across resolutions: m3shm/query/local.py combine) must put every series' blocks next
 * to each other, so the decoder (flat_decode.c) sees one buffer with blocks back to back:
 * block i of the result is buf[offs[i], offs[i + 1]). The blocks come from the answers'
 * buffers; only their order changes. Python computes the order (numpy, over whole arrays);
 * this copies: output block i = srcs[src_of[i]][starts[i] .. starts[i] + lens[i]), written
 * back to back from dst[0]. One memcpy per block, no per-byte index.
 *
 * Invariants checked before anything is copied: every source index is below nsrcs, every
 * block lies inside its source, and the blocks' total fits dst_cap (M3_EINVAL otherwise, dst
 * untouched). Returns the bytes written.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "m3shm.h"

int64_t m3_gather_blocks(const uint8_t *const *srcs, const uint64_t *src_lens, uint32_t nsrcs,
                         const uint32_t *src_of, const uint64_t *starts, const uint64_t *lens,
                         size_t n, uint8_t *dst, size_t dst_cap)
{
    if ((n && (!srcs || !src_lens || !src_of || !starts || !lens)) || (!dst && dst_cap))
        return M3_EINVAL;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t s = src_of[i];
        if (s >= nsrcs || starts[i] > src_lens[s] || lens[i] > src_lens[s] - starts[i])
            return M3_EINVAL;
        total += lens[i];
        if (total > dst_cap)
            return M3_EINVAL;
    }
    uint64_t at = 0;
    for (size_t i = 0; i < n; i++) {
        if (lens[i])
            memcpy(dst + at, srcs[src_of[i]] + starts[i], lens[i]);
        at += lens[i];
    }
    return (int64_t)at;
}
