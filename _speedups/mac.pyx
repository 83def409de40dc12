# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Single DES in C for ISO 9797-1 CBC-MAC (algorithm 1) and the retail MAC (algorithm 3, ANSI X9.19).

Why: `cryptography` has no single DES, so a DES MAC on it runs as 3DES(K,K,K), three times the work,
plus an object per call. Two MACs per authorisation make that visible. This is the classic SP-table
DES (Outerbridge's d3des layout), with the tables generated at import from the FIPS 46-3 definitions
below instead of pasted hex, so every table can be checked against the standard by reading it.

Layout: a 64-bit block is a big-endian integer (FIPS bit 1 = most significant). Both halves are kept
rotated left by one bit through the rounds, which lets the eight 6-bit S-box inputs of the E expansion
be read from two words with plain shifts. CBC chaining happens inside the IP domain:
IP(x XOR c) = IP(x) XOR IP(c) and IP(c) is the previous block's pre-output, so a MAC pays for one initial
permutation per block and one final permutation per message.

Key schedules are computed once per key (`DesKey`) and never per message. `DesKey` has no repr of its
bytes and cannot be pickled.
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

# ---- FIPS 46-3 tables (1-based bit numbers, bit 1 = most significant) ----
_IP = (
    58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
    62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
    57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
    61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7,
)
_P = (
    16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
    2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25,
)
_PC1 = (
    57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18,
    10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36,
    63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22,
    14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4,
)
_PC2 = (
    14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10,
    23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2,
    41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48,
    44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32,
)
_SHIFTS = (1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1)
_SBOX = (
    (14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7,
     0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
     4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0,
     15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13),
    (15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10,
     3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
     0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15,
     13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9),
    (10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8,
     13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
     13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7,
     1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12),
    (7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15,
     13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
     10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4,
     3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14),
    (2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9,
     14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
     4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14,
     11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3),
    (12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11,
     10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
     9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6,
     4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13),
    (4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1,
     13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
     1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2,
     6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12),
    (13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7,
     1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
     7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8,
     2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11),
)

#: S-box i and P combined, output rotated left by one (the round function works on rotated halves).
cdef uint32_t SP[8][64]
#: IP as eight byte lookups; each 32-bit half of the result is already rotated left by one.
cdef uint64_t IPT[8][256]
#: FP (IP inverse) as eight byte lookups on the un-rotated pre-output R16 || L16.
cdef uint64_t FPT[8][256]
#: PC1 as eight byte lookups into the 56-bit C||D register.
cdef uint64_t PC1T[8][256]
#: PC2 as nibble lookups from C (bits 1-28) and D (bits 29-56) into the two subkey words.
cdef uint32_t PC2A[7][16]
cdef uint32_t PC2B[7][16]
cdef uint32_t PC2A_D[7][16]
cdef uint32_t PC2B_D[7][16]
cdef int SHIFTS[16]


cdef inline uint32_t rotl32(uint32_t x, int n) noexcept nogil:
    return (x << n) | (x >> (32 - n))


cdef inline uint32_t rotr32(uint32_t x, int n) noexcept nogil:
    return (x >> n) | (x << (32 - n))


def _permute(value, table, in_bits):
    """FIPS permutation of an int: output bit i (1-based, MSB first) = input bit table[i]."""
    out = 0
    for src in table:
        out = (out << 1) | ((value >> (in_bits - src)) & 1)
    return out


def _rot_halves(v):
    hi = (v >> 32) & 0xFFFFFFFF
    lo = v & 0xFFFFFFFF
    hi = ((hi << 1) | (hi >> 31)) & 0xFFFFFFFF
    lo = ((lo << 1) | (lo >> 31)) & 0xFFFFFFFF
    return (hi << 32) | lo


def _subkey_words(k48):
    """Split a 48-bit subkey into the two words the round reads: chunks 0,2,4,6 and 1,3,5,7."""
    c = [(k48 >> (42 - 6 * i)) & 0x3F for i in range(8)]
    a = (c[0] << 24) | (c[2] << 16) | (c[4] << 8) | c[6]
    b = (c[1] << 24) | (c[3] << 16) | (c[5] << 8) | c[7]
    return a, b


def _init_tables():
    fp = [0] * 64
    for out_pos, src in enumerate(_IP, 1):
        fp[src - 1] = out_pos
    for i in range(8):
        for x in range(64):
            row = ((x >> 4) & 2) | (x & 1)
            col = (x >> 1) & 0xF
            s = _SBOX[i][row * 16 + col]
            p = _permute(s << (28 - 4 * i), _P, 32)
            SP[i][x] = ((p << 1) | (p >> 31)) & 0xFFFFFFFF
    for j in range(8):
        for v in range(256):
            block = v << (56 - 8 * j)
            IPT[j][v] = _rot_halves(_permute(block, _IP, 64))
            FPT[j][v] = _permute(block, fp, 64)
            PC1T[j][v] = _permute(block, _PC1, 64)
    # PC2 is a bit selection, so it distributes over OR: look each 28-bit half up in seven nibbles.
    for j in range(7):
        for v in range(16):
            part = v << (24 - 4 * j)  # nibble j of a 28-bit half
            ka, kb = _subkey_words(_permute(part << 28, _PC2, 56))
            PC2A[j][v] = ka
            PC2B[j][v] = kb
            ka, kb = _subkey_words(_permute(part, _PC2, 56))
            PC2A_D[j][v] = ka
            PC2B_D[j][v] = kb
    for i in range(16):
        SHIFTS[i] = _SHIFTS[i]


_init_tables()


cdef inline void des_rounds(uint32_t *pl, uint32_t *pr, const uint32_t *ks) noexcept nogil:
    """Sixteen rounds on rotated halves; leaves (r, l) as the un-swapped pre-output R16 || L16."""
    cdef uint32_t l = pl[0], r = pr[0], w, f
    cdef int i
    for i in range(0, 32, 4):
        w = rotr32(r, 4) ^ ks[i]
        f = SP[6][w & 0x3F] | SP[4][(w >> 8) & 0x3F] | SP[2][(w >> 16) & 0x3F] | SP[0][(w >> 24) & 0x3F]
        w = r ^ ks[i + 1]
        f |= SP[7][w & 0x3F] | SP[5][(w >> 8) & 0x3F] | SP[3][(w >> 16) & 0x3F] | SP[1][(w >> 24) & 0x3F]
        l ^= f
        w = rotr32(l, 4) ^ ks[i + 2]
        f = SP[6][w & 0x3F] | SP[4][(w >> 8) & 0x3F] | SP[2][(w >> 16) & 0x3F] | SP[0][(w >> 24) & 0x3F]
        w = l ^ ks[i + 3]
        f |= SP[7][w & 0x3F] | SP[5][(w >> 8) & 0x3F] | SP[3][(w >> 16) & 0x3F] | SP[1][(w >> 24) & 0x3F]
        r ^= f
    pl[0] = l
    pr[0] = r


cdef inline uint64_t ip_block(const unsigned char *p) noexcept nogil:
    return (IPT[0][p[0]] | IPT[1][p[1]] | IPT[2][p[2]] | IPT[3][p[3]]
            | IPT[4][p[4]] | IPT[5][p[5]] | IPT[6][p[6]] | IPT[7][p[7]])


cdef inline void fp_out(uint32_t l, uint32_t r, unsigned char *out) noexcept nogil:
    """Final permutation of the pre-output (rotated halves r, l) into 8 big-endian bytes."""
    cdef uint64_t pre = (<uint64_t>rotr32(r, 1) << 32) | rotr32(l, 1)
    cdef uint64_t c = 0
    cdef int j
    for j in range(8):
        c |= FPT[j][(pre >> (56 - 8 * j)) & 0xFF]
    for j in range(8):
        out[j] = (c >> (56 - 8 * j)) & 0xFF


cdef inline void cbc_absorb(uint32_t *pl, uint32_t *pr, const unsigned char *block,
                            const uint32_t *ks) noexcept nogil:
    """One CBC step in the IP domain: the state (pl, pr) is the previous block's pre-output."""
    cdef uint64_t x = ip_block(block)
    cdef uint32_t l = <uint32_t>(x >> 32) ^ pr[0]
    cdef uint32_t r = <uint32_t>x ^ pl[0]
    des_rounds(&l, &r, ks)
    pl[0] = l
    pr[0] = r


cdef int cbc_core(const unsigned char *data, Py_ssize_t n, int padding, const uint32_t *ks,
                  uint32_t *pl, uint32_t *pr) noexcept nogil:
    """CBC-MAC chain with IV 0 over the padded data, padded on the fly (no copy of the message).
    Leaves the last block's rotated halves in (pl, pr). Returns -1 for an unknown padding method."""
    cdef unsigned char tail[8]
    cdef Py_ssize_t full = n // 8
    cdef Py_ssize_t rem = n - full * 8
    cdef Py_ssize_t i
    cdef bint tail_block
    if padding == 1:
        tail_block = rem != 0 or n == 0
        memset(tail, 0, 8)
        if tail_block:
            memcpy(tail, data + full * 8, rem)
    elif padding == 2:
        tail_block = True
        memset(tail, 0, 8)
        memcpy(tail, data + full * 8, rem)
        tail[rem] = 0x80
    else:
        return -1
    if not tail_block:
        # The last full data block is the final block.
        full -= 1
        memcpy(tail, data + full * 8, 8)
    pl[0] = 0
    pr[0] = 0
    for i in range(full):
        cbc_absorb(pl, pr, data + i * 8, ks)
    cbc_absorb(pl, pr, tail, ks)
    return 0


cdef class DesKey:
    """A single-DES key schedule (encrypt and decrypt order), computed once. Key bytes are not kept."""

    cdef uint32_t enc[32]
    cdef uint32_t dec[32]

    def __cinit__(self, key):
        cdef const unsigned char[::1] k = key
        cdef uint64_t reg = 0, cd
        cdef uint32_t c, d, a, b
        cdef int i, j, total = 0
        if k.shape[0] != 8:
            raise ValueError(f"DES key must be 8 bytes, got {k.shape[0]}")
        for j in range(8):
            reg |= PC1T[j][k[j]]
        c = <uint32_t>(reg >> 28) & 0x0FFFFFFF
        d = <uint32_t>reg & 0x0FFFFFFF
        for i in range(16):
            total = SHIFTS[i]
            c = ((c << total) | (c >> (28 - total))) & 0x0FFFFFFF
            d = ((d << total) | (d >> (28 - total))) & 0x0FFFFFFF
            a = 0
            b = 0
            for j in range(7):
                a |= PC2A[j][(c >> (24 - 4 * j)) & 0xF]
                b |= PC2B[j][(c >> (24 - 4 * j)) & 0xF]
            for j in range(7):
                a |= PC2A_D[j][(d >> (24 - 4 * j)) & 0xF]
                b |= PC2B_D[j][(d >> (24 - 4 * j)) & 0xF]
            self.enc[2 * i] = a
            self.enc[2 * i + 1] = b
        for i in range(16):
            j = 15 - i
            self.dec[2 * i] = self.enc[2 * j]
            self.dec[2 * i + 1] = self.enc[2 * j + 1]

    def __dealloc__(self):
        # Wipe the schedules so freed memory does not keep them (they are never copied elsewhere).
        memset(self.enc, 0, sizeof(self.enc))
        memset(self.dec, 0, sizeof(self.dec))

    def __repr__(self):
        return "<DesKey>"

    def __reduce__(self):
        raise TypeError("DES key schedules cannot be pickled")

    def encrypt_block(self, block):
        """E_K(block) for one 8-byte block (tests and KCVs; MACs use the chained paths)."""
        cdef const unsigned char[::1] b = block
        cdef unsigned char out[8]
        cdef uint64_t x
        cdef uint32_t l, r
        if b.shape[0] != 8:
            raise ValueError(f"DES block must be 8 bytes, got {b.shape[0]}")
        x = ip_block(&b[0])
        l = <uint32_t>(x >> 32)
        r = <uint32_t>x
        des_rounds(&l, &r, self.enc)
        fp_out(l, r, out)
        return PyBytes_FromStringAndSize(<char *>out, 8)


def cbc_mac(DesKey key not None, data, int padding=1):
    """ISO 9797-1 MAC algorithm 1 (single DES, IV 0), full 8-byte output."""
    cdef Py_ssize_t n
    cdef const unsigned char[::1] view
    cdef const unsigned char *p
    cdef uint32_t l, r
    cdef unsigned char out[8]
    if type(data) is bytes:
        n = PyBytes_GET_SIZE(data)
        p = <const unsigned char *>PyBytes_AS_STRING(data)
    else:
        view = data
        n = view.shape[0]
        p = &view[0] if n else <const unsigned char *>b""
    if cbc_core(p, n, padding, key.enc, &l, &r) != 0:
        raise ValueError(f"unknown MAC padding method {padding} (use 1 or 2)")
    fp_out(l, r, out)
    return PyBytes_FromStringAndSize(<char *>out, 8)


def retail_mac(DesKey k1 not None, DesKey k2 not None, data, int padding=1):
    """ISO 9797-1 MAC algorithm 3 / ANSI X9.19: CBC with K1, final block 3DES (K1, K2, K1)."""
    cdef Py_ssize_t n
    cdef const unsigned char[::1] view
    cdef const unsigned char *p
    cdef uint32_t l, r, t
    cdef unsigned char out[8]
    if type(data) is bytes:
        n = PyBytes_GET_SIZE(data)
        p = <const unsigned char *>PyBytes_AS_STRING(data)
    else:
        view = data
        n = view.shape[0]
        p = &view[0] if n else <const unsigned char *>b""
    if cbc_core(p, n, padding, k1.enc, &l, &r) != 0:
        raise ValueError(f"unknown MAC padding method {padding} (use 1 or 2)")
    # Output transformation E_K1(D_K2(H_q)) in the IP domain: each stage's input is the swapped
    # pre-output of the previous one, so no permutation runs between stages.
    t = l
    l = r
    r = t
    des_rounds(&l, &r, k2.dec)
    t = l
    l = r
    r = t
    des_rounds(&l, &r, k1.enc)
    fp_out(l, r, out)
    return PyBytes_FromStringAndSize(<char *>out, 8)

