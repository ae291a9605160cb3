/*
 * libFuzzer target for ROLLUP_IN records (csrc/rollup.c) as a group owner meets them in a lane
 * or a commit-log batch: arbitrary bytes are walked as records; m3_rollup_check must refuse
 * each malformed one, and every record it accepts is applied to a group cell through a forward
 * table (twice: the second is a duplicate) without reading or writing out of bounds or hitting
 * undefined behaviour (ASan+UBSan watch). Inputs are capped at 64 KiB (-max_len in run.sh).
 *
 * fuzz-sources: csrc/rollup.c csrc/aggwin.c csrc/lane.c csrc/segment.c csrc/series.c csrc/arena.c csrc/epoch.c csrc/block.c csrc/codec.c csrc/rw_series.c csrc/aggstore.c
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "m3shm.h"

#define NSRC 4
#define OUT_CAP ((M3_AGG_MAX_WINDOWS + M3_REC_MAX_SAMPLES) * 2)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static m3_agg_out out[OUT_CAP];
    static uint64_t cellmem[8192];
    static uint64_t tablemem[8192];
    m3_agg_params p;
    memset(&p, 0, sizeof p);
    p.res_ms = 1000;
    p.admission_ms = 5000;
    p.aggmask = (1u << M3_AGG_SUM) | (1u << M3_AGG_MAX);
    p.nwin = 8;
    uint64_t stride = m3_agg_cell_bytes(&p);
    if (stride > sizeof cellmem || m3_agg_cell_init((uint8_t *)cellmem, stride, &p))
        abort();
    if (m3_fwd_table_init((uint8_t *)tablemem, sizeof tablemem, NSRC, stride))
        abort();
    /* copy into 8-byte aligned memory, as lanes and batches are */
    uint8_t *buf = malloc(size + 8);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    size_t off = 0;
    while (off + sizeof(m3_rec) <= size && off % 8 == 0) {
        const m3_rec *r = (const m3_rec *)(buf + off);
        if (m3_rollup_check(r, size - off, 16, NSRC) != M3_OK)
            break;
        for (int k = 0; k < 2; k++) {
            size_t nout = 0;
            int rc = m3_rollup_apply((uint8_t *)tablemem, r, (uint8_t *)cellmem, stride, 1, 0,
                                     10000, out, OUT_CAP, &nout);
            if (rc < 0 && rc != M3_EINVAL)
                abort(); /* a checked record applies, or is refused for this cell's policy */
            if (k == 1 && rc == 1)
                abort(); /* the same record twice: the second must be a duplicate */
        }
        off += r->len;
    }
    size_t nout = 0;
    uint32_t next = 0;
    m3_agg_finalise((uint8_t *)cellmem, stride, 1, 0, INT64_MAX, out, OUT_CAP, &nout, &next);
    free(buf);
    return 0;
}
