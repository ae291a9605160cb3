/*
 * libFuzzer target for the snapshot loader (csrc/snapshot.c m3_shard_load_snapshot): a body
 * that passed no CRC (the loader is the last line of defence behind it). It must load or
 * return an error code with an offset inside the input, never crash or write outside the
 * shard (ASan+UBSan watch); whatever it loaded must then read back (m3_series_read) with
 * samples or an error, and take appends. Inputs are capped at 64 KiB.
 *
 * Input: the first byte picks how many block starts to skip (0-3, taken from the body's first
 * chunks' plausible starts: multiples of the block size); the rest is the body.
 *
 * fuzz-sources: csrc/snapshot.c csrc/series.c csrc/segment.c csrc/arena.c csrc/epoch.c csrc/lane.c csrc/codec.c csrc/block.c csrc/aggstore.c csrc/aggwin.c csrc/rollup.c
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "m3shm.h"

#define BLOCK_MS 7200000

static uint8_t *seg;
static uint64_t seg_size;
static m3_seg_params params;

static void setup(void)
{
    memset(&params, 0, sizeof params);
    params.num_shards = 1;
    params.num_producers = 1;
    params.lane_bytes = 1 << 16;
    params.series_per_shard = 64;
    params.arena_bytes = 1 << 18;
    params.block_ms = BLOCK_MS;
    params.seq_base = 1;
    params.buffer_past_ms = 600000;
    params.buffer_future_ms = 120000;
    params.retention_ms = 48LL * 3600 * 1000;
    seg_size = m3_seg_size(&params);
    seg = aligned_alloc(4096, (seg_size + 4095) & ~(uint64_t)4095);
    if (!seg)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!seg)
        setup();
    if (size < 1 || size > 65536)
        return 0;
    memset(seg, 0, seg_size);
    if (m3_seg_init(seg, seg_size, &params) != M3_OK)
        abort();
    int64_t skip[3] = {0, BLOCK_MS, -BLOCK_MS};
    size_t nskip = data[0] % 4;
    /* an 8-aligned copy, as the loader gets from mmap */
    size_t len = size - 1;
    uint8_t *body = malloc(len ? len : 1);
    if (!body)
        abort();
    memcpy(body, data + 1, len);
    uint64_t ns = 0, nc = 0, samples = 0;
    size_t bad = 0;
    int rc = m3_shard_load_snapshot(seg, 0, body, len, skip, nskip, &ns, &nc, &samples, &bad);
    if (rc != M3_OK && rc != M3_ECORRUPT && rc != M3_ETRUNC && rc != M3_ENOSPC)
        abort();
    if (bad > len)
        abort();
    uint32_t rslot;
    if (m3_reader_claim(seg, &rslot) != M3_OK)
        abort();
    static int64_t ts[8192];
    static double v[8192];
    uint32_t n = m3_shard_nseries(seg, 0);
    for (uint32_t slot = 0; slot < n; slot++) {
        m3_read_begin(seg, rslot);
        size_t got = 0;
        m3_series_read(seg, 0, slot, INT64_MIN, INT64_MAX, ts, v, 8192, &got);
        m3_read_end(seg, rslot);
    }
    m3_reader_release(seg, rslot);
    free(body);
    return 0;
}
