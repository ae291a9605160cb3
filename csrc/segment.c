/*
 * segment.c -- the shared-memory segment: its header, its layout and the global sequence.
 *
 * The supervisor creates the segment as a named file in /dev/shm (zero-filled by ftruncate),
 * calls m3_seg_init once, and forks the workers, which inherit the mapping. Layout, in order
 * (docs/formats/shm.md has the box diagram):
 *
 *   [0, 4096)        header: magic "M3SG", layout version, size, the creation parameters,
 *                    every region's offset and stride, a checksum of all of that; at 256 the
 *                    global batch sequence (its own cache line); at 320 the producers'
 *                    shutdown flags; at 1408 the global reclamation epoch (epoch.c).
 *   [4096, 20480)    reader slots, one cache line each (epoch.c)
 *   [20480, 24576)   owner doorbells, one u32 per producer 16 bytes apart (bell.c)
 *   lanes            num_shards * num_producers lanes, shard-major (lane.c)
 *   shards           num_shards regions: header, series hash table, series slots, arena
 *                    (series.c)
 *
 * Invariants: every region starts on a 4 KiB boundary, lane data and arenas are powers of two
 * or multiples of M3_CHUNK_BYTES, and the header is never written after m3_seg_init, so a
 * reader that checks the checksum once may trust every offset in it afterwards. Changing any
 * layout constant here or in seg_int.h bumps M3_SEG_LAYOUT_VERSION.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <limits.h>

#include "seg_int.h"

static inline uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }
static inline int is_pow2(uint64_t x) { return x && !(x & (x - 1)); }

static uint64_t next_pow2(uint64_t x)
{
    uint64_t p = 1;
    while (p < x)
        p <<= 1;
    return p;
}

static int params_ok(const m3_seg_params *p)
{
    return p && p->num_shards >= 1 && p->num_shards <= M3_MAX_SHARDS &&
           p->num_producers >= 1 && p->num_producers <= M3_MAX_PRODUCERS &&
           is_pow2(p->lane_bytes) && p->lane_bytes >= (64u << 10) &&
           p->lane_bytes <= (UINT64_C(1) << 34) && p->series_per_shard >= 1 &&
           p->series_per_shard <= (1u << 26) && p->arena_bytes >= (64u << 10) &&
           p->arena_bytes % M3_CHUNK_BYTES == 0 && p->arena_bytes <= (UINT64_C(1) << 40) &&
           p->block_ms > 0 && p->buffer_past_ms >= 0 && p->buffer_future_ms >= 0 &&
           p->retention_ms >= 0 && (p->flags & ~(uint32_t)M3_NS_COLD_WRITES) == 0;
}

/* Fill the derived fields of h from h->p; returns the total size. */
static uint64_t layout(seg_hdr *h)
{
    const m3_seg_params *p = &h->p;
    h->slot_cap = (uint64_t)p->series_per_shard + p->series_per_shard / 4 + 64;
    h->table_size = next_pow2(h->slot_cap * 2);
    h->lane_stride = LANE_HDR + p->lane_bytes;
    h->lanes_off = SEG_HDR_BYTES;
    h->table_off = SHARD_HDR;
    h->slots_off = align_up(h->table_off + h->table_size * 8, M3_CACHE_LINE);
    h->arena_off = align_up(h->slots_off + h->slot_cap * sizeof(series_slot), 4096);
    h->shard_stride = align_up(h->arena_off + p->arena_bytes, 4096);
    h->shards_off = align_up(h->lanes_off + (uint64_t)p->num_shards * p->num_producers *
                                                h->lane_stride, 4096);
    return h->shards_off + (uint64_t)p->num_shards * h->shard_stride;
}

uint64_t m3_seg_size(const m3_seg_params *p)
{
    if (!params_ok(p))
        return 0;
    seg_hdr h;
    memset(&h, 0, sizeof h);
    h.p = *p;
    return layout(&h);
}

int m3_seg_init(uint8_t *base, uint64_t size, const m3_seg_params *p)
{
    if (!base || !params_ok(p))
        return M3_EINVAL;
    seg_hdr h;
    memset(&h, 0, sizeof h);
    h.magic = M3_SEG_MAGIC;
    h.layout_version = M3_SEG_LAYOUT_VERSION;
    h.p = *p;
    h.size = layout(&h);
    if (h.size > size)
        return M3_ENOSPC;
    h.checksum = m3_labels_hash((const uint8_t *)&h, offsetof(seg_hdr, checksum));
    for (uint32_t s = 0; s < p->num_shards; s++) {
        shard_hdr *sh = (shard_hdr *)(base + h.shards_off + (uint64_t)s * h.shard_stride);
        /* arena offset 0 means "none": the first cache line of every arena stays unused */
        sh->arena_used = M3_CACHE_LINE;
        sh->warm_floor = INT64_MIN;
    }
    memcpy(base, &h, sizeof h);
    /* Relaxed: published to the workers by the release store of the sequence below. */
    __atomic_store_n((uint64_t *)(base + SEG_EPOCH_OFF), 1, __ATOMIC_RELAXED);
    /* Release: the layout above is visible before the sequence line that workers use first. */
    __atomic_store_n((uint64_t *)(base + SEG_SEQ_OFF), p->seq_base, __ATOMIC_RELEASE);
    return M3_OK;
}

int m3_seg_check(const uint8_t *base, uint64_t size, m3_seg_params *p)
{
    if (!base || size < SEG_HDR_BYTES)
        return M3_EINVAL;
    seg_hdr h;
    memcpy(&h, base, sizeof h);
    if (h.magic != M3_SEG_MAGIC)
        return M3_ECORRUPT;
    if (h.layout_version != M3_SEG_LAYOUT_VERSION)
        return M3_EVERSION;
    if (h.checksum != m3_labels_hash((const uint8_t *)&h, offsetof(seg_hdr, checksum)))
        return M3_ECORRUPT;
    seg_hdr want;
    memset(&want, 0, sizeof want);
    want.p = h.p;
    if (!params_ok(&h.p) || layout(&want) != h.size || h.size > size ||
        want.shards_off != h.shards_off || want.arena_off != h.arena_off)
        return M3_ECORRUPT;
    if (p)
        *p = h.p;
    return M3_OK;
}

uint64_t m3_seg_next_seq(uint8_t *base)
{
    /* Relaxed is enough: the number only has to be unique and increasing; it orders
       batches, not memory. */
    return __atomic_fetch_add((uint64_t *)(base + SEG_SEQ_OFF), 1, __ATOMIC_RELAXED);
}

void m3_seg_set_producer_done(uint8_t *base, uint32_t producer, uint32_t done)
{
    if (producer >= cseg_of(base)->p.num_producers)
        return;
    /* Release: every lane tail this producer published is visible before its done flag. */
    __atomic_store_n((uint32_t *)(base + SEG_DONE_OFF) + producer, done, __ATOMIC_RELEASE);
}

int m3_seg_all_producers_done(const uint8_t *base)
{
    uint32_t n = cseg_of(base)->p.num_producers;
    for (uint32_t i = 0; i < n; i++)
        /* Acquire: pairs with m3_seg_set_producer_done; the tails read next are final. */
        if (!__atomic_load_n((const uint32_t *)(base + SEG_DONE_OFF) + i, __ATOMIC_ACQUIRE))
            return 0;
    return 1;
}
