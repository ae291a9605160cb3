/*
 * shard_read.c -- bulk reads of the shards in shared memory for queries, by any process.
 *
 * A query reads every worker's shards directly (no hop through the owner): it indexes series
 * labels (m3_series_labels_many), sizes what a selection will cost before reading it
 * (m3_series_extent), then copies the compressed streams of the chunks it needs out of the
 * segment (m3_series_chunks) and decodes the copies later, on its own time, with
 * tsz_decode_many. Nothing here decodes a sample or writes to the segment.
 *
 * Copies, not pointers: a copy is a snapshot taken in one short pass, so the owner can keep
 * appending, release flushed blocks and reuse expired slots without a reader holding on to
 * segment memory while it evaluates. Layout: docs/formats/shm.md.
 *
 * Every function here must be called inside a read section (epoch.c, m3_read_begin): the
 * owner frees released chunks, expired slots and their labels only once every reader has left
 * the section it was in, so whatever a call reaches stays readable (if unlinked) until it
 * returns.
 *
 * Series identity: a slot is reused with gen + 1 after its series expired, so a series is
 * named by (shard, slot, gen) across read sections. The labels reader reports each slot's
 * generation (0 = not live); the extent and chunk readers take the generation the caller
 * indexed and read nothing for a slot that is not live or holds another generation (the
 * caller's series is gone; its data is never attributed to the slot's new series). Within one
 * section a live slot keeps its generation, so one check per series suffices.
 *
 * Consistency of a copied chunk, fence by fence:
 *  - a slot's fields and labels are complete once its state is seen live (acquire load of
 *    state, pairs with the owner's release store of SLOT_LIVE in create_series);
 *  - a chunk reached through `head`/`next` is initialised (acquire loads, pairing with the
 *    release store that linked it in new_chunk, or that unlinked its predecessor in
 *    m3_block_release);
 *  - the stream's published count is loaded with acquire (tsz_count), pairing with the
 *    codec's release store after each append: every byte of those samples, and the encoder's
 *    nbits covering them, were written before it. nbits only grows within a chunk, so the
 *    relaxed load of it after the acquire reads at least the bits of `count` samples.
 *  - the copy's header gets exactly that count, so the copy decodes to the published prefix
 *    even if the owner appended more while we copied (bytes past it are never decoded).
 *
 * Change detection (m3_shards_churn): a reader that indexes slots incrementally needs to know
 * when slots below the high-water mark changed. Slots only leave the live state by expiry,
 * which bumps the shard's series_removed counter with a release store after the slot's state
 * became RETIRED; a slot is reused only after that. So a reader that acquire-loads the counter
 * and finds it unchanged knows no slot it scanned earlier was expired before the load; one
 * that finds it changed rescans the generations of every slot (and keeps re-checking the slots
 * it found not live, which may be reused without the counter moving).
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
    /* Acquire: pairs with create_series' release; slots below the count have been used. */
    return __atomic_load_n(&rd_view_of(base, shard).sh->nseries, __ATOMIC_ACQUIRE);
}

/* Whether a chunk with `count` published samples (count >= 1, loaded with acquire) may hold a
   sample in [mint, maxt]. Its first timestamp is the stream's first 64 bits (written before
   the count was published); every published timestamp is at most the encoder's prev_ts
   (relaxed: it is at least the value stored before that count was released, and a stream's
   timestamps only grow), so a chunk entirely outside the range is skipped without copying or
   decoding it. prev_ts is read under the encoder's seqlock (codec.c, commit_state): when an
   append is copying the state in (seq odd or moved), the chunk is simply kept. */
static inline int rd_in_range(const chunk *c, int64_t mint, int64_t maxt)
{
    const uint8_t *p = c->buf + TSZ_HEADER_BYTES;
    uint64_t first = 0;
    for (int i = 0; i < 8; i++)
        first = first << 8 | p[i];
    if ((int64_t)first > maxt)
        return 0;
    /* Acquire: pairs with commit_state's release of the even seq; the fields copied before
       it are visible. */
    uint32_t s1 = __atomic_load_n(&c->enc.seq, __ATOMIC_ACQUIRE);
    int64_t last = (int64_t)__atomic_load_n(&c->enc.prev_ts, __ATOMIC_RELAXED);
    /* Acquire fence: the prev_ts load happens before the second seq load. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint32_t s2 = __atomic_load_n(&c->enc.seq, __ATOMIC_RELAXED);
    if ((s1 & 1u) || s1 != s2)
        return 1;
    return last >= mint;
}

/* The generation of a live slot, 0 if it is not live. */
static inline uint32_t rd_gen(const rd_view *v, uint32_t slot)
{
    const series_slot *sl = &v->slots[slot];
    /* Acquire: pairs with the owner's release of SLOT_LIVE; gen, labels and the other fields
       written before it are complete. The slot cannot be reused before our section ends. */
    if (__atomic_load_n(&sl->state, __ATOMIC_ACQUIRE) != SLOT_LIVE)
        return 0;
    return sl->gen;
}

void m3_shards_churn(const uint8_t *base, uint32_t *nseries, uint64_t *removed)
{
    uint32_t n = cseg_of(base)->p.num_shards;
    for (uint32_t s = 0; s < n; s++) {
        const shard_hdr *sh = rd_view_of(base, s).sh;
        /* Acquire: pairs with arena_pend_slot's release; an expiry it counts is visible to
           the slot reads that follow (load it before nseries and before scanning). */
        removed[s] = __atomic_load_n(&sh->series_removed, __ATOMIC_ACQUIRE);
        nseries[s] = rd_nseries(base, s);
    }
}

int m3_series_gens(const uint8_t *base, uint32_t shard, const uint32_t *slots, size_t n,
                   uint32_t *gens)
{
    if ((n && (!slots || !gens)) || shard >= cseg_of(base)->p.num_shards)
        return M3_EINVAL;
    uint32_t ns = rd_nseries(base, shard);
    rd_view v = rd_view_of(base, shard);
    for (size_t i = 0; i < n; i++)
        gens[i] = slots[i] < ns ? rd_gen(&v, slots[i]) : 0;
    return M3_OK;
}

int m3_series_labels_many(const uint8_t *base, uint32_t shard, const uint32_t *slots,
                          size_t n, uint8_t *out, size_t cap, uint64_t *offs, uint32_t *gens,
                          size_t *done)
{
    if (!out || !offs || !gens || !done || (n && !slots))
        return M3_EINVAL;
    *done = 0;
    if (shard >= cseg_of(base)->p.num_shards)
        return M3_EINVAL;
    uint32_t ns = rd_nseries(base, shard);
    rd_view v = rd_view_of(base, shard);
    uint64_t o = 0;
    offs[0] = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t g = slots[i] < ns ? rd_gen(&v, slots[i]) : 0;
        const series_slot *sl = &v.slots[slots[i] < ns ? slots[i] : 0];
        uint32_t len = g ? sl->labels_len : 0;
        if (o + len > cap)
            return *done ? M3_OK : M3_ENOSPC;
        if (len)
            memcpy(out + o, v.arena + sl->labels_off, len);
        o += len;
        gens[i] = g;
        offs[i + 1] = o;
        *done = i + 1;
    }
    return M3_OK;
}

/* The first chunk of slot's series if it is live with generation gen, else 0 (nothing). */
static inline uint64_t rd_first(const rd_view *v, uint32_t slot, uint32_t gen)
{
    if (!gen || rd_gen(v, slot) != gen)
        return 0;
    return rd_head(v, slot);
}

int m3_series_extent(const uint8_t *base, uint32_t shard, const uint32_t *slots,
                     const uint32_t *gens, size_t n, int64_t mint, int64_t maxt,
                     uint32_t *chunks, uint64_t *samples)
{
    if ((n && (!slots || !gens)) || !chunks || !samples)
        return M3_EINVAL;
    uint32_t ns = rd_nseries(base, shard);
    rd_view v = rd_view_of(base, shard);
    int64_t bms = v.h->p.block_ms;
    for (size_t i = 0; i < n; i++) {
        if (slots[i] >= ns)
            return M3_EINVAL;
        uint32_t nc = 0;
        uint64_t cnt = 0;
        for (uint64_t off = rd_first(&v, slots[i], gens[i]); off;
             off = rd_next(rd_chunk(&v, off))) {
            const chunk *c = rd_chunk(&v, off);
            if (!rd_overlaps(c, bms, mint, maxt))
                continue;
            uint32_t k = 0;
            /* tsz_count loads the published count with acquire (codec.c) */
            if (tsz_count(c->buf, c->cap, &k) == M3_OK && k && rd_in_range(c, mint, maxt)) {
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

int m3_series_chunks(const uint8_t *base, uint32_t shard, const uint32_t *slots,
                     const uint32_t *gens, size_t n, int64_t mint, int64_t maxt, uint8_t *out,
                     size_t out_cap, m3_chunk_ref *refs, size_t max_refs, size_t *done,
                     size_t *nrefs)
{
    if ((n && (!slots || !gens)) || !out || !refs || !done || !nrefs)
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
        for (uint64_t off = rd_first(&v, slots[i], gens[i]); off;
             off = rd_next(rd_chunk(&v, off))) {
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
            if (tsz_count(c->buf, c->cap, &cnt) != M3_OK || cnt == 0 ||
                !rd_in_range(c, mint, maxt))
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
