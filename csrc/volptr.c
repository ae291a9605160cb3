/*
 * volptr.c -- the newest checkpointed fileset volume of every flushed block, per shard, in
 * shared memory (docs/formats/volptr.md; Python face m3shm/storage/volptr.py).
 *
 * Readers (export, queries, in any worker) find the volume to open here instead of listing a
 * shard's fileset directory at every query. The shard's owner is the only writer: when a
 * flush has written and checkpointed volume N+1 of a block it points the block's slot at N+1
 * and only then deletes volume N (a reader that still opens N finds it gone and looks here
 * again); retention clears the slot of a block it deletes; at start-up the owner rebuilds its
 * shards' slots from the directory and then marks the shard ready.
 *
 * Layout: a 64-byte header (magic "M3VP", version, num_shards, cap, block_ms), then per shard
 * a 64-byte header (state: 0 not built, 1 ready, 2 overflow) and `cap` slots of 32 bytes
 * (seq, block_start, volume + 1, pad). A block's slot is (block_start / block_ms) mod cap,
 * cap a power of two sized above the blocks retention keeps; a block whose slot holds another
 * live block sets the shard's state to overflow (readers then list the directory, as they
 * would without this table), so a slot is never shared.
 *
 * Every slot is a seqlock: the owner makes seq odd (relaxed store), a release fence, writes
 * the fields (relaxed atomic stores), then release-stores seq even; a reader acquire-loads
 * seq, reads the fields (relaxed atomic loads), an acquire fence, reloads seq, and retries if
 * it was odd or changed. So a reader never pairs a block start with another block's volume.
 * The shard state is release-stored after the slots it vouches for and acquire-loaded before
 * and after a reader's scan; a scan that saw it other than ready returns M3_ENOENT.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <sched.h>

#include "m3shm.h"

#define VP_MAGIC 0x5056334du /* "M3VP" little-endian */
#define VP_VERSION 1
#define VP_HDR 64
#define VP_SHARD_HDR 64
#define VP_SLOT 32
#define VP_NOT_BUILT 0u
#define VP_READY 1u
#define VP_OVERFLOW 2u

typedef struct vp_hdr {
    uint32_t magic;
    uint32_t version;
    uint32_t num_shards;
    uint32_t cap;
    int64_t block_ms;
    uint64_t size;
    uint64_t pad[4];
} vp_hdr;

typedef struct vp_slot {
    uint64_t seq;
    int64_t block_start;
    int64_t vol1; /* volume + 1; 0 = empty */
    uint64_t pad;
} vp_slot;

_Static_assert(sizeof(vp_hdr) == VP_HDR, "volptr header");
_Static_assert(sizeof(vp_slot) == VP_SLOT, "volptr slot");

static uint64_t region_bytes(uint32_t cap) { return VP_SHARD_HDR + (uint64_t)cap * VP_SLOT; }

static uint32_t *state_of(uint8_t *base, uint32_t shard)
{
    const vp_hdr *h = (const vp_hdr *)base;
    return (uint32_t *)(base + VP_HDR + shard * region_bytes(h->cap));
}

static vp_slot *slots_of(uint8_t *base, uint32_t shard)
{
    return (vp_slot *)((uint8_t *)state_of(base, shard) + VP_SHARD_HDR);
}

uint64_t m3_volptr_size(uint32_t num_shards, uint32_t cap)
{
    if (!num_shards || num_shards > M3_MAX_SHARDS || !cap || (cap & (cap - 1)) || cap > 1u << 20)
        return 0;
    return VP_HDR + (uint64_t)num_shards * region_bytes(cap);
}

int m3_volptr_init(uint8_t *base, uint64_t size, uint32_t num_shards, uint32_t cap,
                   int64_t block_ms)
{
    uint64_t need = m3_volptr_size(num_shards, cap);
    if (!base || !need || size < need || block_ms <= 0)
        return M3_EINVAL;
    memset(base, 0, need);
    vp_hdr *h = (vp_hdr *)base;
    h->version = VP_VERSION;
    h->num_shards = num_shards;
    h->cap = cap;
    h->block_ms = block_ms;
    h->size = need;
    /* Release: the header is complete before a process that sees the magic reads it. */
    __atomic_store_n(&h->magic, VP_MAGIC, __ATOMIC_RELEASE);
    return M3_OK;
}

int m3_volptr_check(const uint8_t *base, uint64_t size)
{
    const vp_hdr *h = (const vp_hdr *)base;
    if (!base || size < VP_HDR)
        return M3_EINVAL;
    /* Acquire: pairs with m3_volptr_init's release of the magic. */
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != VP_MAGIC)
        return M3_ECORRUPT;
    if (h->version != VP_VERSION)
        return M3_EVERSION;
    uint64_t need = m3_volptr_size(h->num_shards, h->cap);
    if (!need || need != h->size || size < need || h->block_ms <= 0)
        return M3_ECORRUPT;
    return M3_OK;
}

static int64_t block_index(int64_t bs, int64_t bms)
{
    int64_t q = bs / bms;
    return (bs % bms < 0) ? q - 1 : q;
}

static void slot_write(vp_slot *sl, int64_t bs, int64_t vol1)
{
    uint64_t s = sl->seq;
    __atomic_store_n(&sl->seq, s + 1, __ATOMIC_RELAXED);
    /* Release fence: the odd seq is visible before either field changes (a reader that sees
       a new field value also sees the seq changed). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&sl->block_start, bs, __ATOMIC_RELAXED);
    __atomic_store_n(&sl->vol1, vol1, __ATOMIC_RELAXED);
    /* Release: both fields are visible before the even seq that ends the write. */
    __atomic_store_n(&sl->seq, s + 2, __ATOMIC_RELEASE);
}

static void slot_read(const vp_slot *sl, int64_t *bs, int64_t *vol1)
{
    for (;;) {
        /* Acquire: pairs with the release store of the even seq; the fields are complete. */
        uint64_t s1 = __atomic_load_n(&sl->seq, __ATOMIC_ACQUIRE);
        if (s1 & 1) {
            sched_yield();
            continue;
        }
        *bs = __atomic_load_n(&sl->block_start, __ATOMIC_RELAXED);
        *vol1 = __atomic_load_n(&sl->vol1, __ATOMIC_RELAXED);
        /* Acquire fence: the field loads happen before the second load of seq. */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&sl->seq, __ATOMIC_RELAXED) == s1)
            return;
    }
}

void m3_volptr_reset(uint8_t *base, uint32_t shard)
{
    const vp_hdr *h = (const vp_hdr *)base;
    if (!base || shard >= h->num_shards)
        return;
    /* Release: readers stop trusting the shard before its slots change. */
    __atomic_store_n(state_of(base, shard), VP_NOT_BUILT, __ATOMIC_RELEASE);
    vp_slot *sl = slots_of(base, shard);
    for (uint32_t i = 0; i < h->cap; i++)
        if (sl[i].vol1)
            slot_write(&sl[i], 0, 0);
}

void m3_volptr_set_ready(uint8_t *base, uint32_t shard)
{
    const vp_hdr *h = (const vp_hdr *)base;
    if (!base || shard >= h->num_shards)
        return;
    uint32_t *st = state_of(base, shard);
    if (__atomic_load_n(st, __ATOMIC_RELAXED) == VP_NOT_BUILT)
        /* Release: every slot written before is visible to a reader that sees ready. */
        __atomic_store_n(st, VP_READY, __ATOMIC_RELEASE);
}

int m3_volptr_set(uint8_t *base, uint32_t shard, int64_t block_start, int64_t volume)
{
    const vp_hdr *h = (const vp_hdr *)base;
    if (!base || shard >= h->num_shards || volume < -1 || volume >= INT64_MAX - 1 ||
        block_start % h->block_ms)
        return M3_EINVAL;
    vp_slot *sl = &slots_of(base, shard)[(uint64_t)block_index(block_start, h->block_ms) &
                                         (h->cap - 1)];
    if (sl->vol1 && sl->block_start != block_start) {
        if (volume < 0)
            return M3_OK; /* removing a block that is not there */
        /* Release: as in set_ready; readers list the directory from now on. */
        __atomic_store_n(state_of(base, shard), VP_OVERFLOW, __ATOMIC_RELEASE);
        return M3_ERANGE;
    }
    slot_write(sl, volume < 0 ? 0 : block_start, volume + 1);
    return M3_OK;
}

int m3_volptr_list(const uint8_t *base, uint32_t shard, int64_t *starts, int64_t *volumes,
                   size_t cap, size_t *n)
{
    const vp_hdr *h = (const vp_hdr *)base;
    if (!base || !n || (cap && (!starts || !volumes)) || shard >= h->num_shards)
        return M3_EINVAL;
    uint32_t *st = state_of((uint8_t *)base, shard);
    /* Acquire: pairs with the release of ready; the slots it vouches for are visible. */
    if (__atomic_load_n(st, __ATOMIC_ACQUIRE) != VP_READY)
        return M3_ENOENT;
    const vp_slot *sl = slots_of((uint8_t *)base, shard);
    size_t k = 0;
    int full = 0;
    for (uint32_t i = 0; i < h->cap; i++) {
        int64_t bs, v1;
        slot_read(&sl[i], &bs, &v1);
        if (!v1)
            continue;
        if (k < cap) {
            starts[k] = bs;
            volumes[k] = v1 - 1;
        } else {
            full = 1;
        }
        k++;
    }
    *n = k;
    /* Acquire fence: the slot loads happen before this second look at the state; a reset
       or an overflow during the scan makes the caller list the directory. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(st, __ATOMIC_RELAXED) != VP_READY)
        return M3_ENOENT;
    return full ? M3_ENOSPC : M3_OK;
}
