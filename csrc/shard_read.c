/*
 * shard_read.c -- bulk reads of the shards in shared memory for queries, by any process.
 *
 * A query reads every worker's shards directly (no hop through the owner): it indexes series
 * labels (m3_shard_labels_many), sizes what a selection will cost before reading it
 * (m3_series_extent), then copies the compressed streams of the chunks it needs out of the
 * segment (m3_series_chunks) and decodes the copies later, on its own time, with
 * tsz_decode_many. Nothing here decodes a sample or writes to the segment.
 *
 * Copies, not pointers: a copy is a snapshot taken in one short pass, so the owner can keep
 * appending (and, once blocks are flushed, reclaim chunks) without a reader holding on to
 * segment memory while it evaluates. Layout: docs/formats/shm.md.
 *
 * Consistency of a copied chunk, fence by fence:
 *  - series slots below nseries are complete (acquire load of nseries, pairs with the owner's
 *    release in create_series);
 *  - a chunk reached through `head`/`next` is initialised (acquire loads, pairing with the
 *    release store that linked it in new_chunk);
 *  - the stream's published count is loaded with acquire (tsz_count), pairing with the
 *    codec's release store after each append: every byte of those samples, and the encoder's
 *    nbits covering them, were written before it. nbits only grows within a chunk, so the
 *    relaxed load of it after the acquire reads at least the bits of `count` samples.
 *  - the copy's header gets exactly that count, so the copy decodes to the published prefix
 *    even if the owner appended more while we copied (bytes past it are never decoded).
 *
 * Order: a series' chunks are emitted sorted by (block_start, stream). Streams of one block
 * may overlap in time (out-of-order writes); a reader that sorts the decoded samples of one
 * series by timestamp, stably, and keeps the last of equal timestamps makes the last write win
 * (the rule in series.c).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "seg_int.h"

typedef struct rd_view {
    const seg_hdr *h;
    const shard_hdr *sh;
    const series_slot *slots;
    const uint8_t *arena;
} rd_view;

static inline rd_view rd_view_of(const uint8_t *base, uint32_t shard)
{
    rd_view v;
    v.h = cseg_of(base);
    const uint8_t *s = shard_at((uint8_t *)base, shard);
    v.sh = (const shard_hdr *)s;
    v.slots = (const series_slot *)(s + v.h->slots_off);
    v.arena = s + v.h->arena_off;
    return v;
}

static inline const chunk *rd_chunk(const rd_view *v, uint64_t off)
{
    return (const chunk *)(v->arena + off);
}

static inline uint64_t rd_head(const rd_view *v, uint32_t slot)
{
    /* Acquire: pairs with the release that linked the first chunk; it is initialised. */
    return __atomic_load_n(&v->slots[slot].head, __ATOMIC_ACQUIRE);
}

static inline uint64_t rd_next(const chunk *c)
{
    /* Acquire: pairs with the release that linked the next chunk; it is initialised. */
    return __atomic_load_n(&c->next, __ATOMIC_ACQUIRE);
}

static inline int rd_overlaps(const chunk *c, int64_t bms, int64_t mint, int64_t maxt)
{
    return !(c->block_start > maxt || c->block_start + bms <= mint);
}

static uint32_t rd_nseries(const uint8_t *base, uint32_t shard)
{
    if (shard >= cseg_of(base)->p.num_shards)
        return 0;
    /* Acquire: pairs with create_series' release; slots below the count are complete. */
    return __atomic_load_n(&rd_view_of(base, shard).sh->nseries, __ATOMIC_ACQUIRE);
}

int m3_shard_labels_many(const uint8_t *base, uint32_t shard, uint32_t from, uint32_t to,
                         uint8_t *out, size_t cap, uint64_t *offs, uint32_t *done)
{
    if (!out || !offs || !done || from > to)
        return M3_EINVAL;
    *done = 0;
    if (to > rd_nseries(base, shard))
        return M3_EINVAL;
    rd_view v = rd_view_of(base, shard);
    uint64_t o = 0;
    offs[0] = 0;
    for (uint32_t s = from; s < to; s++) {
        const series_slot *sl = &v.slots[s];
        if (o + sl->labels_len > cap)
            return *done ? M3_OK : M3_ENOSPC;
        memcpy(out + o, v.arena + sl->labels_off, sl->labels_len);
        o += sl->labels_len;
        offs[s - from + 1] = o;
        *done = s - from + 1;
    }
    return M3_OK;
}

int m3_series_extent(const uint8_t *base, uint32_t shard, const uint32_t *slots, size_t n,
                     int64_t mint, int64_t maxt, uint32_t *chunks, uint64_t *samples)
{
    if ((n && !slots) || !chunks || !samples)
        return M3_EINVAL;
    uint32_t ns = rd_nseries(base, shard);
    rd_view v = rd_view_of(base, shard);
    int64_t bms = v.h->p.block_ms;
    for (size_t i = 0; i < n; i++) {
        if (slots[i] >= ns)
            return M3_EINVAL;
        uint32_t nc = 0;
        uint64_t cnt = 0;
        for (uint64_t off = rd_head(&v, slots[i]); off; off = rd_next(rd_chunk(&v, off))) {
            const chunk *c = rd_chunk(&v, off);
            if (!rd_overlaps(c, bms, mint, maxt))
                continue;
            uint32_t k = 0;
            /* tsz_count loads the published count with acquire (codec.c) */
            if (tsz_count(c->buf, c->cap, &k) == M3_OK && k) {
                nc++;
                cnt += k;
            }
        }
        chunks[i] = nc;
        samples[i] = cnt;
    }
    return M3_OK;
}

static int ref_before(const m3_chunk_ref *a, const m3_chunk_ref *b)
{
    if (a->block_start != b->block_start)
        return a->block_start < b->block_start;
    return a->stream < b->stream;
}

int m3_series_chunks(const uint8_t *base, uint32_t shard, const uint32_t *slots, size_t n,
                     int64_t mint, int64_t maxt, uint8_t *out, size_t out_cap,
                     m3_chunk_ref *refs, size_t max_refs, size_t *done, size_t *nrefs)
{
    if ((n && !slots) || !out || !refs || !done || !nrefs)
        return M3_EINVAL;
    *done = 0;
    *nrefs = 0;
    uint32_t ns = rd_nseries(base, shard);
    rd_view v = rd_view_of(base, shard);
    int64_t bms = v.h->p.block_ms;
    size_t r = 0;      /* refs used by completed series */
    uint64_t o = 0;    /* bytes used by completed series */
    for (size_t i = 0; i < n; i++) {
        if (slots[i] >= ns)
            return M3_EINVAL;
        /* pass 1: this series' chunks in the range, in chain order; ref.off = arena offset */
        size_t first = r, k = r;
        for (uint64_t off = rd_head(&v, slots[i]); off; off = rd_next(rd_chunk(&v, off))) {
            const chunk *c = rd_chunk(&v, off);
            if (!rd_overlaps(c, bms, mint, maxt))
                continue;
            if (k >= max_refs)
                goto full;
            refs[k] = (m3_chunk_ref){(uint32_t)i, 0, c->block_start, c->stream, off, 0};
            k++;
        }
        /* sort by (block_start, stream): insertion sort, chains are nearly sorted already */
        for (size_t a = first + 1; a < k; a++) {
            m3_chunk_ref t = refs[a];
            size_t b = a;
            while (b > first && ref_before(&t, &refs[b - 1])) {
                refs[b] = refs[b - 1];
                b--;
            }
            refs[b] = t;
        }
        /* pass 2: copy each published stream prefix */
        uint64_t so = o;
        size_t w = first;
        for (size_t a = first; a < k; a++) {
            const chunk *c = rd_chunk(&v, refs[a].off);
            uint32_t cnt = 0;
            /* tsz_count: acquire load of the published count (see the top of this file) */
            if (tsz_count(c->buf, c->cap, &cnt) != M3_OK || cnt == 0)
                continue;
            /* Relaxed: ordered after the acquire above; nbits only grows within a chunk. */
            uint64_t nbits = __atomic_load_n(&c->enc.nbits, __ATOMIC_RELAXED);
            uint64_t len = TSZ_HEADER_BYTES + (nbits + 7) / 8;
            if (len > c->cap)
                len = c->cap;
            if (so + len > out_cap)
                goto full;
            memcpy(out + so, c->buf, len);
            /* the copy claims exactly the samples whose bytes it is known to hold */
            memcpy(out + so + 4, &cnt, 4);
            m3_chunk_ref t = refs[a];
            t.count = cnt;
            t.off = so;
            t.len = len;
            refs[w++] = t;
            so += len;
        }
        r = w;
        o = so;
        *done = i + 1;
        *nrefs = r;
    }
    return M3_OK;
full:
    return *done ? M3_OK : M3_ENOSPC;
}
