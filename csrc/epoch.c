/*
 * epoch.c -- epoch-based reclamation across processes: reader slots and the global epoch.
 *
 * Problem: readers in any process walk a shard's series slots, labels and chunk chains without
 * locks while the owner unlinks chunks (flush) and series (churn). Unlinked memory may be
 * reused only once no reader can still be looking at it.
 *
 * Shape (docs/formats/shm.md, "Reclamation"): the segment holds one global epoch (u64, starts
 * at 1, on its own cache line at SEG_EPOCH_OFF) and M3_MAX_READERS reader slots (one cache line
 * each at SEG_READERS_OFF). A reading thread claims a slot once (m3_reader_claim, tagged with
 * pid << 32 | low bits of its process start time) and brackets each read with m3_read_begin /
 * m3_read_end, which store the epoch it entered at (0 = outside). The owner, after unlinking
 * a batch of objects, advances the epoch with a fetch-add and tags the batch with the value it
 * got, R (m3_epoch_retire); a batch tagged R may be reused once every slot's epoch is 0 or
 * above R (m3_epoch_min_active).
 *
 * Why that is safe, fence by fence:
 *  - read_begin: load epoch (acquire), store it in the slot, then a seq_cst fence, then read.
 *    retire: unlink (release stores), fetch-add (seq_cst, a release), ... later min_active:
 *    seq_cst fence, then load every slot. By the two fences, either the owner's scan sees the
 *    reader's slot store (and waits for it), or the reader's reads after its fence see the
 *    unlinks (and never reach the objects). A reader that entered with an epoch above R loaded
 *    it after the fetch-add, so it also sees the unlinks.
 *  - read_end: release store of 0, so the reader's reads happen before the owner's acquire
 *    load in min_active sees the slot empty, and hence before any reuse.
 * Tags only grow (one fetch-add per retire batch), so each owner's limbo list is FIFO.
 *
 * Dead readers: a process killed inside a section leaves its slot's epoch set. Any process may
 * call m3_readers_reap: a slot whose pid is gone, is a zombie, or now belongs to a process with
 * another start time is taken (tag 0/live -> 1 by CAS, so two reapers cannot both clear it,
 * nor can a reaper clear a slot that a new process has claimed meanwhile), its epoch cleared,
 * then freed (tag 0, release). Owners reap when reclamation is held back, so a SIGKILLed
 * reader delays reclamation only until the owner next looks.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <signal.h>
#include <sys/types.h>
#include <unistd.h>

#include "seg_int.h"

#define TAG_REAPING 1u

static inline uint64_t *epoch_word(uint8_t *base) { return (uint64_t *)(base + SEG_EPOCH_OFF); }

static inline reader_slot *rslot_at(uint8_t *base, uint32_t i)
{
    return (reader_slot *)(base + SEG_READERS_OFF) + i;
}

/* Process start time (clock ticks after boot, /proc/<pid>/stat field 22) and whether the
   process is a zombie. Returns 0 if the process does not exist. */
static uint64_t proc_start(pid_t pid, int *zombie)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (!p || p[1] != ' ')
        return 0;
    p += 2;
    if (zombie)
        *zombie = (*p == 'Z' || *p == 'X');
    for (int field = 3; field < 22 && *p; field++) {
        while (*p && *p != ' ')
            p++;
        while (*p == ' ')
            p++;
    }
    unsigned long long st = 0;
    if (sscanf(p, "%llu", &st) != 1)
        return 0;
    return st ? (uint64_t)st : 1;
}

static uint64_t my_tag(uint64_t *start)
{
    pid_t pid = getpid();
    uint64_t st = proc_start(pid, NULL);
    if (start)
        *start = st;
    return (uint64_t)(uint32_t)pid << 32 | (st & 0xffffffffu);
}

/* 1 if the process that tagged a slot with `tag` is certainly gone. */
static int tag_dead(uint64_t tag)
{
    pid_t pid = (pid_t)(tag >> 32);
    if (pid <= 0)
        return 0;
    if (pid == getpid())
        return 0;
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return 1;
    int zombie = 0;
    uint64_t st = proc_start(pid, &zombie);
    if (!st)
        return 1;
    return zombie || (st & 0xffffffffu) != (tag & 0xffffffffu);
}

static int reap_slot(reader_slot *r, uint64_t tag)
{
    uint64_t want = tag;
    /* Acquire on success: we own the slot now; nobody else clears or claims it. */
    if (!__atomic_compare_exchange_n(&r->tag, &want, TAG_REAPING, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        return 0;
    r->depth = 0;
    /* Release: the dead reader's epoch goes before the slot is free again. */
    __atomic_store_n(&r->epoch, 0, __ATOMIC_RELEASE);
    /* Release: the cleared fields are visible before a new claimer's CAS sees tag 0. */
    __atomic_store_n(&r->tag, 0, __ATOMIC_RELEASE);
    return 1;
}

uint32_t m3_readers_reap(uint8_t *base)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < M3_MAX_READERS; i++) {
        reader_slot *r = rslot_at(base, i);
        /* Acquire: pairs with the claimer's CAS; pid bits of the tag are the claimer's. */
        uint64_t tag = __atomic_load_n(&r->tag, __ATOMIC_ACQUIRE);
        if (tag > TAG_REAPING && tag_dead(tag))
            n += (uint32_t)reap_slot(r, tag);
    }
    return n;
}

int m3_reader_claim(uint8_t *base, uint32_t *rslot)
{
    if (!base || !rslot)
        return M3_EINVAL;
    uint64_t st = 0;
    uint64_t tag = my_tag(&st);
    for (int round = 0; round < 2; round++) {
        for (uint32_t i = 0; i < M3_MAX_READERS; i++) {
            reader_slot *r = rslot_at(base, i);
            uint64_t want = 0;
            /* Acquire on success: pairs with the release that freed the slot (its epoch is
               0 before we own it). */
            if (__atomic_compare_exchange_n(&r->tag, &want, tag, 0, __ATOMIC_ACQUIRE,
                                            __ATOMIC_RELAXED)) {
                r->depth = 0;
                r->pid = (uint32_t)(tag >> 32);
                r->start_time = st;
                *rslot = i;
                return M3_OK;
            }
        }
        if (!m3_readers_reap(base))
            break;
    }
    return M3_ENOSPC;
}

void m3_reader_release(uint8_t *base, uint32_t rslot)
{
    if (rslot >= M3_MAX_READERS)
        return;
    reader_slot *r = rslot_at(base, rslot);
    r->depth = 0;
    /* Release: our reads are done before an owner sees the slot out of its section. */
    __atomic_store_n(&r->epoch, 0, __ATOMIC_RELEASE);
    /* Release: the slot is clean before another thread may claim it. */
    __atomic_store_n(&r->tag, 0, __ATOMIC_RELEASE);
}

void m3_read_begin(uint8_t *base, uint32_t rslot)
{
    if (rslot >= M3_MAX_READERS)
        return;
    reader_slot *r = rslot_at(base, rslot);
    if (r->depth++)
        return;
    /* Acquire: pairs with the owner's fetch-add in m3_epoch_retire; a reader entering at an
       epoch above R sees every unlink tagged R. */
    uint64_t e = __atomic_load_n(epoch_word(base), __ATOMIC_ACQUIRE);
    __atomic_store_n(&r->epoch, e, __ATOMIC_RELAXED);
    /* Full fence: our slot store is ordered before every read of shard memory that follows;
       pairs with the fence in m3_epoch_min_active (see the top of the file). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

void m3_read_end(uint8_t *base, uint32_t rslot)
{
    if (rslot >= M3_MAX_READERS)
        return;
    reader_slot *r = rslot_at(base, rslot);
    if (!r->depth || --r->depth)
        return;
    /* Release: every read of shard memory in the section happens before an owner's acquire
       load sees the slot empty, hence before the memory is reused. */
    __atomic_store_n(&r->epoch, 0, __ATOMIC_RELEASE);
}

uint64_t m3_epoch_now(const uint8_t *base)
{
    return __atomic_load_n((const uint64_t *)(base + SEG_EPOCH_OFF), __ATOMIC_ACQUIRE);
}

uint64_t m3_epoch_retire(uint8_t *base)
{
    /* Seq_cst RMW (a release): the unlinks before it are visible to every reader that loads
       an epoch above the value returned. */
    return __atomic_fetch_add(epoch_word(base), 1, __ATOMIC_SEQ_CST);
}

uint64_t m3_epoch_min_active(uint8_t *base, int reap)
{
    /* Full fence: our unlinks (before this call) are ordered before the slot loads below;
       pairs with the fence in m3_read_begin. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t min = UINT64_MAX;
    for (uint32_t i = 0; i < M3_MAX_READERS; i++) {
        reader_slot *r = rslot_at(base, i);
        /* Acquire: pairs with m3_read_end's release; a reader seen outside has finished. */
        uint64_t e = __atomic_load_n(&r->epoch, __ATOMIC_ACQUIRE);
        if (!e)
            continue;
        if (reap) {
            uint64_t tag = __atomic_load_n(&r->tag, __ATOMIC_ACQUIRE);
            if (tag > TAG_REAPING && tag_dead(tag) && reap_slot(r, tag))
                continue;
        }
        if (e < min)
            min = e;
    }
    return min;
}
