/*
 * remote_read.c -- the per-sample parts of Prometheus remote read responses, encoded in C so
 * no Python runs per sample: Prometheus' XOR chunks (tsdb/chunkenc/xor.go) for
 * STREAMED_XOR_CHUNKS, and the repeated `Sample` field of a TimeSeries for SAMPLES.
 * Encoders only: m3shm never reads these back. Format reference: docs/formats/remote-read.md.
 *
 * XOR chunk:
 * A chunk: a 2-byte big-endian sample count, then a bit stream written most significant
 * bit first:
 *   sample 0   t as a signed (zigzag) varint, v as 64 raw bits
 *   sample 1   t - t0 as an unsigned varint, v XOR-encoded against v0
 *   sample i   dod = (t_i - t_{i-1}) - (t_{i-1} - t_{i-2}):
 *                '0' (dod 0) | '10' + 14 bits | '110' + 17 bits | '1110' + 20 bits |
 *                '1111' + 64 bits, each field the two's complement of dod in that width,
 *                chosen when -(2^(w-1) - 1) <= dod <= 2^(w-1);
 *              v XOR-encoded: x = bits(v) ^ bits(prev); '0' if x == 0; else '1' then
 *                '0' + the bits of x inside the previous window when it fits (and a window
 *                exists), or '1' + leading zeros (5 bits, capped at 31) + significant bit
 *                count (6 bits, 64 written as 0) + those bits, which becomes the window.
 * The last byte is padded with zero bits. Callers cut series into chunks of at most
 * PROMXOR_MAX_SAMPLES (Prometheus' own chunks hold 120), well below the 2-byte count.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <pthread.h>

#include "m3shm.h"

typedef struct pbw {
    uint8_t *buf;
    size_t cap;
    uint64_t nbits;
    int overflow;
} pbw;

static void pbw_bit(pbw *w, unsigned bit)
{
    size_t byte = w->nbits >> 3;
    if (byte >= w->cap) {
        w->overflow = 1;
        return;
    }
    if ((w->nbits & 7) == 0)
        w->buf[byte] = 0;
    if (bit)
        w->buf[byte] |= (uint8_t)(0x80u >> (w->nbits & 7));
    w->nbits++;
}

static void pbw_bits(pbw *w, uint64_t v, unsigned n)
{
    while (n--)
        pbw_bit(w, (unsigned)((v >> n) & 1));
}

static void pbw_uvarint(pbw *w, uint64_t u)
{
    while (u >= 0x80) {
        pbw_bits(w, (u & 0x7f) | 0x80, 8);
        u >>= 7;
    }
    pbw_bits(w, u, 8);
}

static int fits(int64_t dod, unsigned nbits)
{
    int64_t lim = (int64_t)1 << (nbits - 1);
    return -(lim - 1) <= dod && dod <= lim;
}

int64_t m3_promxor_encode(const int64_t *ts, const double *v, size_t n, uint8_t *out,
                          size_t cap)
{
    if (!ts || !v || !out || n > 0xffff || cap < 2)
        return M3_EINVAL;
    out[0] = (uint8_t)(n >> 8);
    out[1] = (uint8_t)n;
    pbw w = {out + 2, cap - 2, 0, 0};
    uint64_t prev_bits = 0, prev_delta = 0;
    int64_t prev_t = 0;
    unsigned lead = 0xff, trail = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t bits;
        memcpy(&bits, &v[i], 8);
        if (i == 0) {
            uint64_t zz = ((uint64_t)ts[0] << 1) ^ (uint64_t)(ts[0] >> 63);
            pbw_uvarint(&w, zz);
            pbw_bits(&w, bits, 64);
        } else {
            uint64_t delta = (uint64_t)ts[i] - (uint64_t)prev_t;
            if (i == 1) {
                pbw_uvarint(&w, delta);
            } else {
                int64_t dod = (int64_t)(delta - prev_delta);
                if (dod == 0) {
                    pbw_bit(&w, 0);
                } else if (fits(dod, 14)) {
                    pbw_bits(&w, 0x2, 2);
                    pbw_bits(&w, (uint64_t)dod, 14);
                } else if (fits(dod, 17)) {
                    pbw_bits(&w, 0x6, 3);
                    pbw_bits(&w, (uint64_t)dod, 17);
                } else if (fits(dod, 20)) {
                    pbw_bits(&w, 0xe, 4);
                    pbw_bits(&w, (uint64_t)dod, 20);
                } else {
                    pbw_bits(&w, 0xf, 4);
                    pbw_bits(&w, (uint64_t)dod, 64);
                }
            }
            prev_delta = delta;
            uint64_t x = bits ^ prev_bits;
            if (x == 0) {
                pbw_bit(&w, 0);
            } else {
                pbw_bit(&w, 1);
                unsigned l = (unsigned)__builtin_clzll(x), t = (unsigned)__builtin_ctzll(x);
                if (l >= 32)
                    l = 31;
                if (lead != 0xff && l >= lead && t >= trail) {
                    pbw_bit(&w, 0);
                    pbw_bits(&w, x >> trail, 64 - lead - trail);
                } else {
                    lead = l;
                    trail = t;
                    unsigned sig = 64 - l - t;
                    pbw_bit(&w, 1);
                    pbw_bits(&w, l, 5);
                    pbw_bits(&w, sig & 63, 6); /* 64 significant bits are written as 0 */
                    pbw_bits(&w, x >> t, sig);
                }
            }
        }
        prev_t = ts[i];
        prev_bits = bits;
    }
    if (w.overflow)
        return M3_ENOSPC;
    return (int64_t)(2 + (w.nbits + 7) / 8);
}

size_t m3_promxor_bound(size_t n)
{
    /* first sample <= 10 + 8 bytes; every later one <= 68 + 77 bits < 19 bytes */
    return 2 + 18 + n * 19;
}

/* ---- SAMPLES: `repeated Sample samples = 2` of prometheus.TimeSeries ------------------- */

static size_t put_uvarint(uint8_t *p, uint64_t u)
{
    size_t k = 0;
    while (u >= 0x80) {
        p[k++] = (uint8_t)(u | 0x80);
        u >>= 7;
    }
    p[k++] = (uint8_t)u;
    return k;
}

int64_t m3_pb_samples(const int64_t *ts, const double *v, size_t n, uint8_t *out, size_t cap)
{
    if ((n && (!ts || !v)) || !out)
        return M3_EINVAL;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        /* field 2 (LEN) { 1: double value (I64), 2: int64 timestamp (VARINT) }; proto3
           omits zero-valued fields, which decoders read as 0 anyway, so always writing both
           is still a valid encoding. A message is at most 1 + 8 + 1 + 10 = 20 bytes. */
        if (o + 22 > cap)
            return M3_ENOSPC;
        uint8_t msg[20];
        size_t m = 0;
        msg[m++] = 0x09;
        memcpy(msg + m, &v[i], 8); /* little-endian machines only (asserted in codec.c) */
        m += 8;
        msg[m++] = 0x10;
        m += put_uvarint(msg + m, (uint64_t)ts[i]);
        out[o++] = 0x12;
        out[o++] = (uint8_t)m;
        memcpy(out + o, msg, m);
        o += m;
    }
    return (int64_t)o;
}

/* ---- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the frame checksum of
   streamed remote read responses. The table is built once (pthread_once orders its writes
   before every use, in any thread); frames are about 1 MiB, so byte-at-a-time is enough. -- */

static uint32_t crc32c_table[256];
static pthread_once_t crc32c_once = PTHREAD_ONCE_INIT;

static void crc32c_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_table[i] = c;
    }
}

uint32_t m3_crc32c(uint32_t crc, const uint8_t *p, size_t n)
{
    pthread_once(&crc32c_once, crc32c_init);
    crc = ~crc;
    for (size_t i = 0; i < n; i++)
        crc = crc32c_table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}
