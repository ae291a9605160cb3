/*
 * arena.c -- the owner's allocator for a shard's arena and series slots, with reclamation by
 * epochs (epoch.c). Only the shard's owner calls these, holding the shard lock.
 *
 * Objects: chunks (M3_CHUNK_BYTES, and CHUNK_FIRST_BYTES for a series' first chunk of a
 * block), label blocks (size classes: 32-byte steps up to 512, then powers of two up to
 * 64 KiB) and series slots. New memory comes from the arena's bump pointer (arena_used, never
 * moves back); freed memory goes to per-kind free lists in the shard header and is reused
 * first. A 512-byte label block and a chunk are the same size, so each may take the other's
 * free memory when its own list is empty; a first chunk may take a free label block of its
 * class. Chunks of each size have their own free list (chunk_free, chunk_free_small).
 *
 * Life of a freed object (docs/formats/shm.md, "Reclamation"):
 *
 *   live --unlink--> pending --tag R, append--> limbo --all readers past R--> free --> live
 *
 *   unlink    the caller removes the object from everything a reader can reach (a chunk
 *             from its series' chain, a slot from the hash table) with release stores, then
 *             calls arena_pend_*: the object joins the pending list of the operation.
 *   retire    arena_retire_pending advances the global epoch once (m3_epoch_retire returns
 *             R), tags every pending object with R and appends the pending list to limbo in
 *             O(1). Limbo lists are FIFO with non-decreasing tags.
 *   reclaim   arena_reclaim computes the oldest epoch a reader may still be in; limbo
 *             objects tagged below it cannot be reached by anyone and move to the free lists
 *             (a slot's labels go to their class list, its state becomes SLOT_FREE).
 *
 * Links: chunks on the pending, limbo and chunk free lists are linked through retire_next
 * (a field readers never look at: a reader still on a retired chunk follows `next`, which
 * stays intact until reuse); label blocks on class lists through their first 8 bytes (nobody
 * reads a free block); slots that are not live through open[0] (slot + 1) with their tag in
 * open[1] (owner-private fields).
 *
 * Crash safety: the owner may die between any two stores. Every step is ordered so that a
 * crash leaks at most the one object in flight (popped from one list, not yet on the next),
 * never puts an object on two lists or frees one that is still reachable. The pending lists
 * live in the shard header, so m3_shard_recover finishes a retire that was cut short.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>

#include "seg_int.h"

#define SMALL_STEP 32u
#define SMALL_MAX 512u
#define SMALL_CLASSES 16 /* 32 .. 512 */
#define CHUNK_CLASS (SMALL_CLASSES - 1)
#define RECLAIM_BACKOFF 64

_Static_assert(SMALL_MAX == M3_CHUNK_BYTES, "class 15 is chunk-sized");

static int label_class(uint32_t len)
{
    if (len <= SMALL_MAX)
        return (int)((len + SMALL_STEP - 1) / SMALL_STEP) - (len ? 1 : 0);
    int c = SMALL_CLASSES;
    uint32_t sz = 1024;
    while (sz < len) {
        sz <<= 1;
        c++;
    }
    return c;
}

static uint32_t class_bytes(int c)
{
    if (c < SMALL_CLASSES)
        return (uint32_t)(c + 1) * SMALL_STEP;
    return 1024u << (c - SMALL_CLASSES);
}

uint32_t label_block_bytes(uint32_t len) { return class_bytes(label_class(len)); }

_Static_assert(SMALL_CLASSES + 7 == LABEL_CLASSES, "classes up to 64 KiB");

static inline uint64_t *link8(const shard_view *v, uint64_t off)
{
    return (uint64_t *)(v->arena + off);
}

static void add_free_bytes(const shard_view *v, int64_t d)
{
    /* Relaxed: statistics and admission read it; only the owner writes. */
    __atomic_store_n(&v->sh->free_bytes, v->sh->free_bytes + (uint64_t)d, __ATOMIC_RELAXED);
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

int arena_commit(uint8_t *arena, uint64_t first, uint64_t used, uint64_t n, uint64_t cap)
{
    uint64_t from = used <= first ? 0 : align_up64(used, ARENA_COMMIT_STEP);
    uint64_t to = align_up64(used + n, ARENA_COMMIT_STEP);
    if (to <= from)
        return 0; /* inside a step that an earlier allocation committed */
    uintptr_t lo = (uintptr_t)(arena + from) & ~(uintptr_t)4095;
    uintptr_t end = ((uintptr_t)(arena + cap) + 4095) & ~(uintptr_t)4095; /* region padding */
    uintptr_t hi = (uintptr_t)(arena + to) < end ? (uintptr_t)(arena + to) : end;
    if (hi <= lo)
        return 0;
    if (madvise((void *)lo, hi - lo, MADV_POPULATE_WRITE) == 0 || errno == EINVAL)
        return 0; /* EINVAL: a kernel without it; pages then come as they are touched */
    return -1;
}

static uint64_t bump(const shard_view *v, uint64_t n)
{
    uint64_t used = v->sh->arena_used;
    if (used + n > v->h->p.arena_bytes)
        return 0;
    if (arena_commit(v->arena, M3_CACHE_LINE, used, n, v->h->p.arena_bytes)) {
        /* Relaxed: an admission hint (m3_batch_admit); only the owner writes it. */
        __atomic_store_n(&v->sh->arena_cap, used, __ATOMIC_RELAXED);
        return 0;
    }
    if (v->sh->arena_cap)
        __atomic_store_n(&v->sh->arena_cap, 0, __ATOMIC_RELAXED); /* /dev/shm has room again */
    /* Relaxed: only the owner allocates; readers load it for statistics only. */
    __atomic_store_n(&v->sh->arena_used, used + n, __ATOMIC_RELAXED);
    return used;
}

/* Reclaim before growing when something waits in limbo; backs off after a fruitless try
   (a reader holds an old epoch), so a stuck reader does not cost a scan per allocation. */
static int try_reclaim(const shard_view *v)
{
    shard_hdr *sh = v->sh;
    if (!sh->chunk_limbo && !sh->slot_limbo)
        return 0;
    if (sh->reclaim_skip) {
        sh->reclaim_skip--;
        return 0;
    }
    int n = arena_reclaim(v, 0);
    if (!n)
        n = arena_reclaim(v, 1);
    if (!n)
        sh->reclaim_skip = RECLAIM_BACKOFF;
    return n;
}

static uint64_t pop_chunk_list(const shard_view *v, uint64_t *list, uint32_t bytes)
{
    uint64_t off = *list;
    if (!off)
        return 0;
    *list = chunk_at(v, off)->retire_next;
    v->sh->chunks_free--;
    add_free_bytes(v, -(int64_t)bytes);
    return off;
}

static uint64_t pop_chunk_free(const shard_view *v)
{
    return pop_chunk_list(v, &v->sh->chunk_free, M3_CHUNK_BYTES);
}

static uint64_t pop_class(const shard_view *v, int c)
{
    shard_hdr *sh = v->sh;
    uint64_t off = sh->label_free[c];
    if (!off)
        return 0;
    sh->label_free[c] = *link8(v, off);
    add_free_bytes(v, -(int64_t)class_bytes(c));
    return off;
}

uint64_t arena_alloc_chunk(const shard_view *v, uint32_t bytes)
{
    int small = bytes != M3_CHUNK_BYTES;
    for (int attempt = 0; attempt < 2; attempt++) {
        uint64_t off = small ? pop_chunk_list(v, &v->sh->chunk_free_small, bytes)
                             : pop_chunk_free(v);
        if (!off)
            off = pop_class(v, small ? label_class(bytes) : CHUNK_CLASS);
        if (!off)
            off = bump(v, bytes);
        if (off)
            return off;
        if (!try_reclaim(v))
            break;
    }
    return 0;
}

uint64_t arena_alloc_labels(const shard_view *v, uint32_t len)
{
    int c = label_class(len);
    for (int attempt = 0; attempt < 2; attempt++) {
        uint64_t off = pop_class(v, c);
        if (!off)
            off = bump(v, class_bytes(c));
        if (!off && c <= CHUNK_CLASS)
            off = pop_chunk_free(v); /* a chunk holds any small label set */
        if (off)
            return off;
        if (!try_reclaim(v))
            break;
    }
    return 0;
}

static void free_labels(const shard_view *v, uint64_t off, uint32_t len)
{
    int c = label_class(len);
    uint32_t sz = class_bytes(c);
    if (c < CHUNK_CLASS || sz != M3_CHUNK_BYTES) {
        *link8(v, off) = v->sh->label_free[c];
        v->sh->label_free[c] = off;
        return;
    }
    /* a chunk-sized block goes back as a chunk: chunks are the common demand */
    chunk_at(v, off)->retire_next = v->sh->chunk_free;
    v->sh->chunk_free = off;
    v->sh->chunks_free++;
}

uint32_t arena_alloc_slot(const shard_view *v)
{
    shard_hdr *sh = v->sh;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (sh->slot_free) {
            uint32_t s = sh->slot_free - 1;
            sh->slot_free = (uint32_t)v->slots[s].open[0];
            return s;
        }
        if (sh->nseries < v->h->slot_cap)
            return sh->nseries;
        if (!try_reclaim(v))
            break;
    }
    return UINT32_MAX;
}

void arena_free_slot(const shard_view *v, uint32_t s)
{
    v->slots[s].open[0] = v->sh->slot_free;
    v->sh->slot_free = s + 1;
}

void arena_pend_chunk(const shard_view *v, uint64_t off)
{
    shard_hdr *sh = v->sh;
    uint32_t bytes = chunk_bytes(chunk_at(v, off));
    chunk_at(v, off)->retire_next = 0;
    if (sh->chunk_pending_tail)
        chunk_at(v, sh->chunk_pending_tail)->retire_next = off;
    else
        sh->chunk_pending = off;
    sh->chunk_pending_tail = off;
    sh->chunks_released++;
    add_free_bytes(v, bytes);
}

void arena_pend_slot(const shard_view *v, uint32_t s)
{
    shard_hdr *sh = v->sh;
    v->slots[s].open[0] = 0;
    if (sh->slot_pending_tail)
        v->slots[sh->slot_pending_tail - 1].open[0] = s + 1;
    else
        sh->slot_pending = s + 1;
    sh->slot_pending_tail = s + 1;
    /* Release: the slot's RETIRED state (stored before this call) is visible to a reader
       that acquire-loads the new count (shard_read.c, m3_shards_churn). */
    __atomic_store_n(&sh->series_removed, sh->series_removed + 1, __ATOMIC_RELEASE);
    add_free_bytes(v, label_block_bytes(v->slots[s].labels_len));
}

void arena_retire_pending(const shard_view *v)
{
    shard_hdr *sh = v->sh;
    if (!sh->chunk_pending && !sh->slot_pending)
        return;
    /* Every pending object is unreachable for a reader entering after this. */
    uint64_t r = m3_epoch_retire(v->base);
    if (sh->chunk_pending) {
        if (sh->chunk_limbo_tail == sh->chunk_pending_tail) {
            /* a retire cut short by a crash after its append: already in limbo */
        } else {
            uint64_t n = 0;
            for (uint64_t off = sh->chunk_pending; off; off = chunk_at(v, off)->retire_next) {
                chunk_at(v, off)->retire_epoch = r;
                n++;
            }
            if (sh->chunk_limbo_tail)
                chunk_at(v, sh->chunk_limbo_tail)->retire_next = sh->chunk_pending;
            else
                sh->chunk_limbo = sh->chunk_pending;
            sh->chunk_limbo_tail = sh->chunk_pending_tail;
            sh->chunks_limbo += n;
        }
        sh->chunk_pending = sh->chunk_pending_tail = 0;
    }
    if (sh->slot_pending) {
        if (sh->slot_limbo_tail != sh->slot_pending_tail) {
            uint64_t n = 0;
            for (uint32_t s = sh->slot_pending; s; s = (uint32_t)v->slots[s - 1].open[0]) {
                v->slots[s - 1].open[1] = r;
                n++;
            }
            if (sh->slot_limbo_tail)
                v->slots[sh->slot_limbo_tail - 1].open[0] = sh->slot_pending;
            else
                sh->slot_limbo = sh->slot_pending;
            sh->slot_limbo_tail = sh->slot_pending_tail;
            sh->slots_limbo += n;
        }
        sh->slot_pending = sh->slot_pending_tail = 0;
    }
}

int arena_reclaim(const shard_view *v, int reap)
{
    shard_hdr *sh = v->sh;
    if (!sh->chunk_limbo && !sh->slot_limbo)
        return 0;
    uint64_t min = m3_epoch_min_active(v->base, reap);
    int n = 0;
    while (sh->chunk_limbo && chunk_at(v, sh->chunk_limbo)->retire_epoch < min) {
        uint64_t off = sh->chunk_limbo;
        chunk *c = chunk_at(v, off);
        sh->chunk_limbo = c->retire_next;
        if (!sh->chunk_limbo)
            sh->chunk_limbo_tail = 0;
        sh->chunks_limbo--;
        /* a crash here leaks this one chunk; each size goes back to its own list */
        uint64_t *list = chunk_bytes(c) == M3_CHUNK_BYTES ? &sh->chunk_free
                                                          : &sh->chunk_free_small;
        c->retire_next = *list;
        *list = off;
        sh->chunks_free++;
        n++;
    }
    while (sh->slot_limbo && v->slots[sh->slot_limbo - 1].open[1] < min) {
        uint32_t s = sh->slot_limbo - 1;
        series_slot *sl = &v->slots[s];
        sh->slot_limbo = (uint32_t)sl->open[0];
        if (!sh->slot_limbo)
            sh->slot_limbo_tail = 0;
        sh->slots_limbo--;
        free_labels(v, sl->labels_off, sl->labels_len);
        sl->labels_off = 0;
        /* Release: (for tidiness; no reader can reach the slot through the table any more,
           and one iterating slots skips it either way) */
        __atomic_store_n(&sl->state, SLOT_FREE, __ATOMIC_RELEASE);
        arena_free_slot(v, s);
        n++;
    }
    if (n)
        sh->reclaim_skip = 0;
    return n;
}
