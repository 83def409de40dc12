# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fast ISO 8583 encode/decode that returns exactly what pyiso8583 returns.

The spec is compiled once (switch.codec.plan) into a `Plan`: a C array of per-field records. `decode`
and `encode` walk the bitmap and the fields with that array and build pyiso8583's two dicts directly
with the C API. Whenever the input is anything but well formed for the plan (short data, a bad length
digit, a non-ASCII byte in an ASCII field, an unknown key...), or a field's spec uses a feature marked
KIND_BAIL, the fast path gives up *without side effects* and the whole call goes to pyiso8583, which
then returns its result or raises its error. So errors are pyiso8583's own, and the fast path only ever
has to be right about well-formed messages, which the differential tests check byte for byte.

Nothing here mutates the caller's dict until the encoding is known to succeed: pyiso8583 fills in "p"
and "1" (and drops "65") as a side effect, and so do we, in the same order, at the very end.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Copy, PyDict_DelItem, PyDict_GetItem, PyDict_Next, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t
from libc.string cimport memcpy, memset

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)
    bint PyUnicode_IS_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    object PyUnicode_Decode(const char* s, Py_ssize_t size, const char* encoding, const char* errors)
    object PyUnicode_DecodeLatin1(const char* s, Py_ssize_t size, const char* errors)
    object PyUnicode_AsEncodedString(object unicode, const char* encoding, const char* errors)
    object PyUnicode_AsLatin1String(object unicode)
    object _PyDict_NewPresized(Py_ssize_t minused)
    char* PyByteArray_AS_STRING(object o)
    object PyByteArray_FromStringAndSize(const char* s, Py_ssize_t n)
    int __builtin_clzll(unsigned long long x)

# Keep these equal to switch/codec/plan.py (tests/codec/test_codec_plan.py checks).
cdef enum:
    KIND_FIELD = 1
    DATA_BIN = 0
    DATA_ASCII = 1
    DATA_LATIN1 = 2
    LEN_FIXED = 0
    LEN_BIN = 1
    LEN_BCD = 2
    LEN_TEXT = 3
    PAD_NONE = -1
    PAD_INVALID = -2
    MAX_FIELD = 192
    MAX_PIECES = 2 * (192 + 4)
    TEMPLATE_SLOTS = 64

cdef struct Op:
    int kind
    int data
    int length
    int len_type
    long long max_len
    int nibbles
    int left_pad
    int right_pad
    const char* codec
    unsigned char digit_val[256]
    unsigned char digit_byte[10]
    PyObject* key

cdef const char* HEX_UPPER = b"0123456789ABCDEF"
cdef unsigned char HEX_VAL[256]
memset(HEX_VAL, 255, 256)
for _i in range(10):
    HEX_VAL[48 + _i] = _i
for _i in range(6):
    HEX_VAL[65 + _i] = 10 + _i
    HEX_VAL[97 + _i] = 10 + _i

cdef object K_LEN = "len"
cdef object K_DATA = "data"
cdef object K_H = "h"
cdef object K_T = "t"
cdef object K_P = "p"
cdef object K_1 = "1"
cdef object K_65 = "65"
cdef bytes EMPTY = b""


cdef class Plan:
    """A compiled spec (see switch.codec.plan.SpecPlan); immutable once built."""

    cdef Op ops[MAX_FIELD + 1]
    cdef Op h
    cdef Op t
    cdef Op p
    cdef Op s
    cdef readonly bint has_header
    cdef readonly bint all_bail
    cdef list _keep
    #: Entries in the last decoded/encoded message: new dicts are presized to it (no regrowth).
    cdef Py_ssize_t size_hint
    #: Direct-mapped cache: bitmap words -> (decoded, encoded) dicts with that message's keys in
    #: pyiso8583's order. Copying one (a memcpy in CPython) beats growing two dicts key by key.
    cdef uint64_t tkeys[TEMPLATE_SLOTS * 3]
    cdef list templates

    def __cinit__(self, spec_plan):
        self._keep = []
        self.size_hint = 24
        self.templates = [None] * TEMPLATE_SLOTS
        self.all_bail = bool(spec_plan.all_bail)
        self.has_header = bool(spec_plan.has_header)
        self._fill(&self.h, spec_plan.header, "h")
        self._fill(&self.t, spec_plan.mti, "t")
        self._fill(&self.p, spec_plan.primary, "p")
        self._fill(&self.s, spec_plan.secondary, "1")
        if len(spec_plan.fields) != MAX_FIELD + 1:
            raise ValueError("plan must describe fields 0..192")
        for i in range(MAX_FIELD + 1):
            self._fill(&self.ops[i], spec_plan.fields[i], str(i))

    cdef tuple template(self, uint64_t b0, uint64_t b1, uint64_t b2):
        cdef uint64_t h = (b0 * 0x9E3779B97F4A7C15ULL) ^ (b1 * 0xC2B2AE3D27D4EB4FULL) ^ (b2 * 0x165667B19E3779F9ULL)
        cdef int slot = <int>(h >> 58)
        cdef object entry = <object>PyList_GET_ITEM(self.templates, slot)
        cdef int i, lz
        cdef uint64_t word
        if (entry is not None and self.tkeys[3 * slot] == b0 and self.tkeys[3 * slot + 1] == b1
                and self.tkeys[3 * slot + 2] == b2):
            return <tuple>entry
        keys = ["h"] if self.has_header else []
        keys += ["t", "p"]
        if b0 >> 63:
            keys.append("1")
        for i in range(3):
            word = b0 if i == 0 else (b1 if i == 1 else b2)
            if i < 2:
                word &= ~((<uint64_t>1) << 63)
            while word:
                lz = __builtin_clzll(word)
                word &= ~((<uint64_t>1) << (63 - lz))
                keys.append(<object>self.ops[64 * i + lz + 1].key)
        entry = (dict.fromkeys(keys, ""), dict.fromkeys(keys))
        self.templates[slot] = entry
        self.tkeys[3 * slot] = b0
        self.tkeys[3 * slot + 1] = b1
        self.tkeys[3 * slot + 2] = b2
        return <tuple>entry

    cdef _fill(self, Op* op, fp, str key):
        memset(op, 0, sizeof(Op))
        op.kind = fp.kind
        op.data = fp.data
        op.length = fp.length
        op.len_type = fp.len_type
        op.max_len = fp.max_len
        op.nibbles = fp.nibbles
        op.left_pad = fp.left_pad
        op.right_pad = fp.right_pad
        codec = fp.codec.encode("ascii")
        self._keep.append(codec)
        op.codec = PyBytes_AS_STRING(codec)
        key = intern(key)
        self._keep.append(key)
        op.key = <PyObject*>key
        memset(op.digit_val, 255, 256)
        digits = fp.digits
        for d in range(len(digits)):
            op.digit_val[digits[d]] = d
            op.digit_byte[d] = digits[d]


# ---------------------------------------------------------------------------------------------------
# Small builders
# ---------------------------------------------------------------------------------------------------

cdef inline object _hex(const unsigned char* p, Py_ssize_t n):
    """Upper-case hex of n bytes (bytes.hex().upper())."""
    cdef object out = PyUnicode_New(2 * n, 127)
    cdef char* o = <char*>PyUnicode_DATA(out)
    cdef Py_ssize_t i
    for i in range(n):
        o[2 * i] = HEX_UPPER[p[i] >> 4]
        o[2 * i + 1] = HEX_UPPER[p[i] & 15]
    return out


cdef inline object _hex_nibbles(const unsigned char* p, Py_ssize_t first, Py_ssize_t count):
    """`count` upper-case hex digits starting at nibble `first` (odd-length BCD without its pad)."""
    cdef object out = PyUnicode_New(count, 127)
    cdef char* o = <char*>PyUnicode_DATA(out)
    cdef Py_ssize_t i, k
    for i in range(count):
        k = first + i
        if k & 1:
            o[i] = HEX_UPPER[p[k >> 1] & 15]
        else:
            o[i] = HEX_UPPER[p[k >> 1] >> 4]
    return out


cdef inline object _ascii(const unsigned char* p, Py_ssize_t n):
    """bytes.decode('ascii'), or None if a byte is not ASCII."""
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        if w & 0x8080808080808080ULL:
            return None
        i += 8
    while i < n:
        if p[i] & 0x80:
            return None
        i += 1
    cdef object out = PyUnicode_New(n, 127)
    if n:
        memcpy(PyUnicode_DATA(out), p, n)
    return out


cdef object _text(Op* op, const unsigned char* p, Py_ssize_t n):
    """Decode n bytes as the op's data encoding; None when that would raise."""
    if op.data == DATA_BIN:
        return _hex(p, n)
    if op.data == DATA_ASCII:
        return _ascii(p, n)
    if op.data == DATA_LATIN1:
        return PyUnicode_DecodeLatin1(<const char*>p, n, NULL)
    try:
        return PyUnicode_Decode(<const char*>p, n, op.codec, NULL)
    except Exception:
        return None


cdef inline dict _pair(object len_bytes, object data_bytes):
    cdef dict d = _PyDict_NewPresized(2)
    PyDict_SetItem(d, K_LEN, len_bytes)
    PyDict_SetItem(d, K_DATA, data_bytes)
    return d


cdef inline uint64_t _be64(const unsigned char* p):
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


# ---------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------

cdef Py_ssize_t _dec_field(Op* op, const unsigned char* buf, Py_ssize_t n, Py_ssize_t idx,
                           dict dd, dict de) except -2:
    """One regular field (pyiso8583 _decode_field). Returns the next index, or -1 to bail."""
    cdef int lt = op.len_type
    cdef unsigned long long length = 0
    cdef Py_ssize_t blen, i
    cdef unsigned char c
    cdef object len_bytes = EMPTY
    cdef object text
    if op.kind != KIND_FIELD or lt > n - idx:
        return -1
    if lt == 0:
        length = <unsigned long long>op.max_len
    else:
        if op.length == LEN_BIN:
            for i in range(lt):
                length = (length << 8) | buf[idx + i]
        elif op.length == LEN_BCD:
            for i in range(lt):
                c = buf[idx + i]
                if (c >> 4) > 9 or (c & 15) > 9:
                    return -1
                length = length * 100 + (c >> 4) * 10 + (c & 15)
        elif op.length == LEN_TEXT:
            for i in range(lt):
                c = op.digit_val[buf[idx + i]]
                if c > 9:
                    return -1
                length = length * 10 + c
        else:
            return -1
        if op.max_len < 0 or length > <unsigned long long>op.max_len:
            return -1
        if de is not None:
            len_bytes = PyBytes_FromStringAndSize(<const char*>buf + idx, lt)
        idx += lt
    cdef object key = <object>op.key
    if length == 0:
        PyDict_SetItem(dd, key, "")
        if de is not None:
            PyDict_SetItem(de, key, _pair(len_bytes, EMPTY))
        return idx
    if op.nibbles:
        blen = <Py_ssize_t>((length + 1) >> 1)
    else:
        blen = <Py_ssize_t>length
    if blen > n - idx:
        return -1
    cdef const unsigned char* p = buf + idx
    if op.data == DATA_BIN and op.nibbles and (length & 1):
        # pyiso8583 _remove_pad_field: left pad first, then right pad, else an error.
        if op.left_pad == PAD_INVALID:
            return -1
        if op.left_pad >= 0 and HEX_UPPER[p[0] >> 4] == op.left_pad:
            text = _hex_nibbles(p, 1, 2 * blen - 1)
        elif op.right_pad == PAD_INVALID:
            return -1
        elif op.right_pad >= 0 and HEX_UPPER[p[blen - 1] & 15] == op.right_pad:
            text = _hex_nibbles(p, 0, 2 * blen - 1)
        else:
            return -1
    else:
        text = _text(op, p, blen)
        if text is None:
            return -1
    PyDict_SetItem(dd, key, text)
    if de is not None:
        PyDict_SetItem(de, key, _pair(len_bytes, PyBytes_FromStringAndSize(<const char*>p, blen)))
    return idx + blen


cdef Py_ssize_t _dec_bitmap(Op* op, const unsigned char* buf, Py_ssize_t n, Py_ssize_t idx,
                            dict dd, dict de, object key, bint extended, uint64_t* out) except -2:
    """A primary/secondary/tertiary bitmap (pyiso8583 _decode_bitmap). Next index or -1."""
    cdef Py_ssize_t width = 8 if op.data == DATA_BIN else 16
    cdef Py_ssize_t i
    cdef uint64_t bm = 0
    cdef unsigned char v
    cdef const unsigned char* hx
    if op.kind != KIND_FIELD or width > n - idx:
        return -1
    raw = PyBytes_FromStringAndSize(<const char*>buf + idx, width)
    if op.data == DATA_BIN:
        bm = _be64(buf + idx)
        text = _hex(buf + idx, 8)
    else:
        text = _text(op, buf + idx, 16)
        # bytes.fromhex would also take spaces or fewer digits: leave anything but 16 hex digits to it.
        if text is None or PyUnicode_GET_LENGTH(text) != 16 or not PyUnicode_IS_ASCII(text):
            return -1
        hx = <const unsigned char*>PyUnicode_DATA(text)
        for i in range(16):
            v = HEX_VAL[hx[i]]
            if v > 15:
                return -1
            bm = (bm << 4) | v
    if extended:
        PyDict_SetItem(dd, key, <object>PyDict_GetItem(dd, key) + text)
        if de is not None:
            entry = <object>PyDict_GetItem(de, key)
            PyDict_SetItem(entry, K_DATA, <object>PyDict_GetItem(entry, K_DATA) + raw)
    else:
        PyDict_SetItem(dd, key, text)
        if de is not None:
            PyDict_SetItem(de, key, _pair(EMPTY, raw))
    out[0] = bm
    return idx + width


cdef Py_ssize_t _dec_fields(Plan plan, uint64_t bm, int base, const unsigned char* buf, Py_ssize_t n,
                            Py_ssize_t idx, dict dd, dict de) except -2:
    """Every field whose bit is set in one bitmap word, in ascending order."""
    cdef int lz
    while bm:
        lz = __builtin_clzll(bm)
        bm &= ~((<uint64_t>1) << (63 - lz))
        idx = _dec_field(&plan.ops[base + lz + 1], buf, n, idx, dd, de)
        if idx < 0:
            return -1
    return idx


cdef Py_ssize_t _field_end(Op* op, const unsigned char* buf, Py_ssize_t n, Py_ssize_t idx):
    """Where a field ends, from its length prefix alone (-1 when unsure): used to find the bitmap."""
    cdef int lt = op.len_type
    cdef unsigned long long length = 0
    cdef unsigned char c
    cdef int i
    if op.kind != KIND_FIELD or lt > n - idx:
        return -1
    if lt == 0:
        length = <unsigned long long>op.max_len
    elif op.length == LEN_BIN:
        for i in range(lt):
            length = (length << 8) | buf[idx + i]
    elif op.length == LEN_BCD:
        for i in range(lt):
            c = buf[idx + i]
            if (c >> 4) > 9 or (c & 15) > 9:
                return -1
            length = length * 100 + (c >> 4) * 10 + (c & 15)
    elif op.length == LEN_TEXT:
        for i in range(lt):
            c = op.digit_val[buf[idx + i]]
            if c > 9:
                return -1
            length = length * 10 + c
    else:
        return -1
    if op.max_len < 0 or length > <unsigned long long>op.max_len:
        return -1
    if op.nibbles:
        length = (length + 1) >> 1
    if length > <unsigned long long>(n - idx - lt):
        return -1
    return idx + lt + <Py_ssize_t>length


cdef Py_ssize_t _scan_bitmap(Op* op, const unsigned char* buf, Py_ssize_t n, Py_ssize_t idx,
                             uint64_t* out):
    """A bitmap word read straight from the bytes (binary, or ASCII hex digits); -1 when unsure."""
    cdef uint64_t bm = 0
    cdef unsigned char v
    cdef int i
    if op.kind != KIND_FIELD:
        return -1
    if op.data == DATA_BIN:
        if 8 > n - idx:
            return -1
        out[0] = _be64(buf + idx)
        return idx + 8
    if op.data != DATA_ASCII and op.data != DATA_LATIN1:
        return -1
    if 16 > n - idx:
        return -1
    for i in range(16):
        v = HEX_VAL[buf[idx + i]]
        if v > 15:
            return -1
        bm = (bm << 4) | v
    out[0] = bm
    return idx + 16


cdef bint _prescan(Plan plan, const unsigned char* buf, Py_ssize_t n, uint64_t* bm):
    """The bitmap words of a message before decoding it, so its dicts can come from a template."""
    cdef Py_ssize_t idx = 0
    bm[0] = bm[1] = bm[2] = 0
    if plan.has_header:
        idx = _field_end(&plan.h, buf, n, idx)
        if idx < 0:
            return False
    idx += 2 if plan.t.data == DATA_BIN else 4
    if idx > n:
        return False
    idx = _scan_bitmap(&plan.p, buf, n, idx, &bm[0])
    if idx < 0:
        return False
    if bm[0] >> 63:
        idx = _scan_bitmap(&plan.s, buf, n, idx, &bm[1])
        if idx < 0:
            return False
        if bm[1] >> 63:
            idx = _scan_bitmap(&plan.s, buf, n, idx, &bm[2])
            if idx < 0:
                return False
    return True


cdef object _decode_fast(Plan plan, bytes s, bint lean):
    cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(s)
    cdef Py_ssize_t idx = 0
    cdef Py_ssize_t width
    cdef uint64_t bm0 = 0, bm1 = 0, bm2 = 0
    cdef uint64_t scan[3]
    cdef dict dd, de
    if _prescan(plan, buf, n, scan):
        tpl = plan.template(scan[0], scan[1], scan[2])
        dd = PyDict_Copy(<object>PyTuple_GET_ITEM(tpl, 0))
        de = None if lean else PyDict_Copy(<object>PyTuple_GET_ITEM(tpl, 1))
    else:
        dd = _PyDict_NewPresized(plan.size_hint)
        de = None if lean else _PyDict_NewPresized(plan.size_hint)
    if plan.has_header:
        idx = _dec_field(&plan.h, buf, n, idx, dd, de)
        if idx < 0:
            return None
    width = 2 if plan.t.data == DATA_BIN else 4
    if width > n - idx:
        return None
    text = _text(&plan.t, buf + idx, width)
    if text is None:
        return None
    PyDict_SetItem(dd, K_T, text)
    if de is not None:
        PyDict_SetItem(de, K_T, _pair(EMPTY, PyBytes_FromStringAndSize(<const char*>buf + idx, width)))
    idx += width
    idx = _dec_bitmap(&plan.p, buf, n, idx, dd, de, K_P, False, &bm0)
    if idx < 0:
        return None
    if bm0 >> 63:
        idx = _dec_bitmap(&plan.s, buf, n, idx, dd, de, K_1, False, &bm1)
        if idx < 0:
            return None
        if bm1 >> 63:
            # Bit 65 announces a tertiary bitmap, which pyiso8583 appends to field "1".
            idx = _dec_bitmap(&plan.s, buf, n, idx, dd, de, K_1, True, &bm2)
            if idx < 0:
                return None
    # Bits 1 and 65 are bitmap indicators, never fields.
    idx = _dec_fields(plan, bm0 & ~((<uint64_t>1) << 63), 0, buf, n, idx, dd, de)
    if idx < 0:
        return None
    if bm1:
        idx = _dec_fields(plan, bm1 & ~((<uint64_t>1) << 63), 64, buf, n, idx, dd, de)
        if idx < 0:
            return None
    if bm2:
        idx = _dec_fields(plan, bm2, 128, buf, n, idx, dd, de)
        if idx < 0:
            return None
    if idx != n:
        return None
    plan.size_hint = len(dd)
    return dd if lean else (dd, de)


# ---------------------------------------------------------------------------------------------------
# Encode
# ---------------------------------------------------------------------------------------------------

cdef object _enc_data(Op* op, object value, long long* enc_len):
    """The data bytes of one value (pyiso8583 _encode_bindary_field/_encode_text_field) or None."""
    cdef Py_ssize_t nchars, nbytes, i, k
    cdef const unsigned char* src
    cdef unsigned char* dst
    cdef int pad = -1
    cdef bint pad_left = False
    cdef unsigned char hi, lo
    if type(value) is not str:
        return None
    if op.data == DATA_BIN:
        if not PyUnicode_IS_ASCII(value):
            return None
        nchars = PyUnicode_GET_LENGTH(value)
        src = <const unsigned char*>PyUnicode_DATA(value)
        if nchars & 1:
            if not op.nibbles:
                return None
            if op.left_pad == PAD_INVALID:
                return None
            if op.left_pad >= 0:
                pad, pad_left = op.left_pad, True
            elif op.right_pad == PAD_INVALID:
                return None
            elif op.right_pad >= 0:
                pad = op.right_pad
            else:
                return None
            if pad > 127 or HEX_VAL[pad] > 15:
                return None
        nbytes = (nchars + 1) >> 1
        out = PyBytes_FromStringAndSize(NULL, nbytes)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        k = 0
        for i in range(nbytes):
            if pad_left and i == 0:
                hi = HEX_VAL[pad]
            else:
                hi = HEX_VAL[src[k]]
                k += 1
            if pad >= 0 and not pad_left and i == nbytes - 1:
                lo = HEX_VAL[pad]
            else:
                lo = HEX_VAL[src[k]]
                k += 1
            if hi > 15 or lo > 15:
                return None
            dst[i] = (hi << 4) | lo
        enc_len[0] = nchars if op.nibbles else nbytes
        return out
    if op.data == DATA_ASCII:
        if not PyUnicode_IS_ASCII(value):
            return None
        nbytes = PyUnicode_GET_LENGTH(value)
        out = PyBytes_FromStringAndSize(<const char*>PyUnicode_DATA(value), nbytes)
    else:
        try:
            if op.data == DATA_LATIN1:
                out = PyUnicode_AsLatin1String(value)
            else:
                out = PyUnicode_AsEncodedString(value, op.codec, NULL)
        except Exception:
            return None
        if type(out) is not bytes:
            return None
        nbytes = PyBytes_GET_SIZE(out)
    enc_len[0] = 2 * nbytes if op.nibbles else nbytes
    return out


cdef object _enc_len(Op* op, long long length):
    """The length prefix of a variable field (pyiso8583 _encode_field), or None if it cannot be."""
    cdef int lt = op.len_type
    cdef int i
    cdef unsigned long long v = <unsigned long long>length
    cdef unsigned char* dst
    if op.length == LEN_BIN:
        if lt < 8 and (v >> (8 * lt)) != 0:
            return None
        out = PyBytes_FromStringAndSize(NULL, lt)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        for i in range(lt - 1, -1, -1):
            dst[i] = v & 0xFF
            v >>= 8
        return out
    if op.length == LEN_BCD:
        out = PyBytes_FromStringAndSize(NULL, lt)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        for i in range(lt - 1, -1, -1):
            dst[i] = <unsigned char>(((v / 10) % 10) << 4 | (v % 10))
            v /= 100
        return None if v else out
    if op.length == LEN_TEXT:
        out = PyBytes_FromStringAndSize(NULL, lt)
        dst = <unsigned char*>PyBytes_AS_STRING(out)
        for i in range(lt - 1, -1, -1):
            dst[i] = op.digit_byte[v % 10]
            v /= 10
        return None if v else out
    return None


cdef object _enc_field(Op* op, object value, dict de, list keep, object key, PyObject** pieces,
                       int* npieces, Py_ssize_t* total):
    """Encode one field into de[key] (or `keep`, which holds the pieces alive) and the piece list."""
    cdef long long enc_len = 0
    if op.kind != KIND_FIELD:
        return False
    data = _enc_data(op, value, &enc_len)
    if data is None:
        return False
    if op.len_type == 0:
        if enc_len != op.max_len:
            return False
        len_bytes = EMPTY
    else:
        if enc_len > op.max_len:
            return False
        len_bytes = _enc_len(op, enc_len)
        if len_bytes is None:
            return False
    if de is not None:
        PyDict_SetItem(de, key, _pair(len_bytes, data))
    else:
        keep.append(len_bytes)
        keep.append(data)
    pieces[npieces[0]] = <PyObject*>len_bytes
    pieces[npieces[0] + 1] = <PyObject*>data
    npieces[0] += 2
    total[0] += PyBytes_GET_SIZE(len_bytes) + PyBytes_GET_SIZE(data)
    return True


cdef inline int _field_number(object key):
    """1..192 for a canonical numeric key, 0 for a key pyiso8583 ignores, -1 for one it chokes on."""
    cdef Py_ssize_t n, i
    cdef const unsigned char* p
    cdef int v = 0
    if type(key) is not str:
        return -1
    if not PyUnicode_IS_ASCII(key):
        return -1 if key.isnumeric() else 0
    n = PyUnicode_GET_LENGTH(key)
    p = <const unsigned char*>PyUnicode_DATA(key)
    if n == 0:
        return 0
    for i in range(n):
        if p[i] < 48 or p[i] > 57:
            return 0
    if n > 3 or p[0] == 48:
        return -1
    for i in range(n):
        v = v * 10 + (p[i] - 48)
    return v if v <= MAX_FIELD else -1


cdef object _bitmap_hex(uint64_t bm):
    """Upper-case hex of one bitmap word (what pyiso8583 stores in "p" / "1")."""
    cdef unsigned char raw[8]
    cdef int i
    for i in range(8):
        raw[i] = (bm >> (56 - 8 * i)) & 0xFF
    return _hex(raw, 8)


cdef object _bitmap_bytes(Op* op, uint64_t bm, object text):
    """Wire bytes of one bitmap word per the bitmap's encoding (text is its hex), or None."""
    cdef unsigned char raw[8]
    cdef int i
    if op.data == DATA_BIN:
        for i in range(8):
            raw[i] = (bm >> (56 - 8 * i)) & 0xFF
        return PyBytes_FromStringAndSize(<const char*>raw, 8)
    if op.data == DATA_ASCII:
        return PyBytes_FromStringAndSize(<const char*>PyUnicode_DATA(text), 16)
    try:
        if op.data == DATA_LATIN1:
            out = PyUnicode_AsLatin1String(text)
        else:
            out = PyUnicode_AsEncodedString(text, op.codec, NULL)
    except Exception:
        return None
    return out if type(out) is bytes else None


cdef object _encode_fast(Plan plan, dict dd, bint lean):
    cdef PyObject* pieces[MAX_PIECES]
    cdef int npieces = 0
    cdef Py_ssize_t total = 0
    cdef long long enc_len = 0
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef PyObject* item
    cdef int num, i, lz, base
    cdef uint64_t bm[3]
    cdef uint64_t word
    cdef dict de
    cdef list keep
    cdef object hex0 = None, hex1 = None, hex2 = None
    cdef char* dst
    bm[0] = bm[1] = bm[2] = 0

    while PyDict_Next(dd, &pos, &k, &v):
        num = _field_number(<object>k)
        if num < 0:
            return None
        if num == 0 or num == 1 or num == 65:  # "1" and "65" are dropped, bitmaps are recomputed
            continue
        bm[(num - 1) >> 6] |= (<uint64_t>1) << (63 - ((num - 1) & 63))
    if bm[2]:
        bm[1] |= (<uint64_t>1) << 63
    if bm[1]:
        bm[0] |= (<uint64_t>1) << 63
    # Pieces are borrowed from de's pairs, or from `keep` when there is no de to build.
    keep = [] if lean else None
    de = None if lean else PyDict_Copy(<object>PyTuple_GET_ITEM(plan.template(bm[0], bm[1], bm[2]), 1))

    if plan.has_header:
        item = PyDict_GetItem(dd, K_H)
        if item == NULL or not _enc_field(&plan.h, <object>item, de, keep, K_H, pieces, &npieces, &total):
            return None
    item = PyDict_GetItem(dd, K_T)
    if item == NULL or plan.t.kind != KIND_FIELD:
        return None
    mti = _enc_data(&plan.t, <object>item, &enc_len)
    if mti is None or PyBytes_GET_SIZE(mti) != (2 if plan.t.data == DATA_BIN else 4):
        return None
    if de is not None:
        PyDict_SetItem(de, K_T, _pair(EMPTY, mti))
    pieces[npieces] = <PyObject*>mti
    npieces += 1
    total += PyBytes_GET_SIZE(mti)

    if plan.p.kind != KIND_FIELD:
        return None
    hex0 = _bitmap_hex(bm[0])
    prim = _bitmap_bytes(&plan.p, bm[0], hex0)
    if prim is None:
        return None
    if de is not None:
        PyDict_SetItem(de, K_P, _pair(EMPTY, prim))
    pieces[npieces] = <PyObject*>prim
    npieces += 1
    total += PyBytes_GET_SIZE(prim)
    if bm[1]:
        if plan.s.kind != KIND_FIELD:
            return None
        hex1 = _bitmap_hex(bm[1])
        sec = _bitmap_bytes(&plan.s, bm[1], hex1)
        if sec is None:
            return None
        if bm[2]:
            hex2 = _bitmap_hex(bm[2])
            ter = _bitmap_bytes(&plan.s, bm[2], hex2)
            if ter is None:
                return None
            sec = sec + ter
            hex1 = hex1 + hex2
        if de is not None:
            PyDict_SetItem(de, K_1, _pair(EMPTY, sec))
        pieces[npieces] = <PyObject*>sec
        npieces += 1
        total += PyBytes_GET_SIZE(sec)

    for i in range(3):
        word = bm[i]
        if i < 2:
            word &= ~((<uint64_t>1) << 63)
        base = 64 * i
        while word:
            lz = __builtin_clzll(word)
            word &= ~((<uint64_t>1) << (63 - lz))
            key = <object>plan.ops[base + lz + 1].key
            item = PyDict_GetItem(dd, key)
            if item == NULL:
                return None
            if not _enc_field(&plan.ops[base + lz + 1], <object>item, de, keep, key, pieces, &npieces, &total):
                return None

    out = PyByteArray_FromStringAndSize(NULL, total)
    dst = PyByteArray_AS_STRING(out)
    for i in range(npieces):
        memcpy(dst, PyBytes_AS_STRING(<object>pieces[i]), PyBytes_GET_SIZE(<object>pieces[i]))
        dst += PyBytes_GET_SIZE(<object>pieces[i])

    if lean:
        return out
    # Success is certain: now the side effects pyiso8583 has on the caller's dict, in its order.
    if PyDict_GetItem(dd, K_1) != NULL:
        PyDict_DelItem(dd, K_1)
    if PyDict_GetItem(dd, K_65) != NULL:
        PyDict_DelItem(dd, K_65)
    PyDict_SetItem(dd, K_P, hex0)
    if bm[1]:
        PyDict_SetItem(dd, K_1, hex1)
    return out, de


# ---------------------------------------------------------------------------------------------------
# Public entry points and the plan cache
# ---------------------------------------------------------------------------------------------------

cdef object _fallback_decode = None
cdef object _fallback_encode = None
cdef object _compile = None
cdef bint _enabled = False
cdef dict _plans = {}
cdef tuple _last = (None, None)
cdef Py_ssize_t _max_plans = 64


def configure(fallback_decode, fallback_encode, compile_plan, Py_ssize_t max_plans=64):
    """Wire the reference path and the spec compiler (switch.codec calls this once)."""
    global _fallback_decode, _fallback_encode, _compile, _max_plans, _enabled
    if max_plans < 1:
        raise ValueError("max_plans must be >= 1")
    _fallback_decode = fallback_decode
    _fallback_encode = fallback_encode
    _compile = compile_plan
    _max_plans = max_plans
    _enabled = True


def set_enabled(bint enabled):
    """False sends every call to the reference path (tests, SWITCH_CODEC_PURE)."""
    global _enabled
    if enabled and _compile is None:
        raise RuntimeError("configure() first")
    _enabled = enabled


def is_enabled():
    return _enabled


def forget(spec=None):
    """Drop the cached plan of one spec (after editing it), or of all specs."""
    global _last
    _last = (None, None)
    if spec is None:
        _plans.clear()
    else:
        _plans.pop(id(spec), None)


def cached_plans():
    return len(_plans)


cdef Plan _plan_for(object spec):
    """The compiled plan of this spec object (cached by identity), or None if it cannot compile."""
    global _last
    if _last[0] is spec:
        return <Plan>_last[1]
    key = id(spec)
    entry = _plans.get(key)
    if entry is not None and (<tuple>entry)[0] is spec:
        plan = <Plan>(<tuple>entry)[1]
    else:
        try:
            plan = _compile(spec)
        except Exception:
            return None
        while len(_plans) >= _max_plans:
            del _plans[next(iter(_plans))]
        # The entry holds the spec itself so its id cannot be reused while the plan is cached.
        _plans[key] = (spec, plan)
    _last = (spec, plan)
    return plan


def decode(s, spec):
    """pyiso8583.decode(s, spec), fast when possible; see the module docstring."""
    if not _enabled:
        return _fallback_decode(s, spec)
    plan = _plan_for(spec)
    if plan is None or plan.all_bail:
        return _fallback_decode(s, spec)
    if type(s) is bytes:
        result = _decode_fast(plan, <bytes>s, False)
    elif type(s) is bytearray:
        # A snapshot: a codec callback can never change the bytes under our pointer.
        result = _decode_fast(plan, bytes(s), False)
    else:
        result = None
    if result is None:
        return _fallback_decode(s, spec)
    return result


def decode_fields(s, spec):
    """decode(s, spec)[0] without building the encoded dict (the switch's hot path)."""
    if not _enabled:
        return _fallback_decode(s, spec)[0]
    plan = _plan_for(spec)
    if plan is None or plan.all_bail:
        return _fallback_decode(s, spec)[0]
    if type(s) is bytes:
        result = _decode_fast(plan, <bytes>s, True)
    elif type(s) is bytearray:
        result = _decode_fast(plan, bytes(s), True)
    else:
        result = None
    if result is None:
        return _fallback_decode(s, spec)[0]
    return result


def encode(doc_dec, spec):
    """pyiso8583.encode(doc_dec, spec), fast when possible; see the module docstring."""
    if not _enabled or type(doc_dec) is not dict:
        return _fallback_encode(doc_dec, spec)
    plan = _plan_for(spec)
    if plan is None or plan.all_bail:
        return _fallback_encode(doc_dec, spec)
    result = _encode_fast(plan, <dict>doc_dec, False)
    if result is None:
        return _fallback_encode(doc_dec, spec)
    return result


def encode_bytes(doc_dec, spec):
    """encode(doc_dec, spec)[0] without the encoded dict and without touching doc_dec."""
    if not _enabled or type(doc_dec) is not dict:
        return _fallback_encode(_copy_if_dict(doc_dec), spec)[0]
    plan = _plan_for(spec)
    if plan is None or plan.all_bail:
        return _fallback_encode(dict(doc_dec), spec)[0]
    result = _encode_fast(plan, <dict>doc_dec, True)
    if result is None:
        return _fallback_encode(dict(doc_dec), spec)[0]
    return result


cdef object _copy_if_dict(object doc_dec):
    return doc_dec.copy() if isinstance(doc_dec, dict) else doc_dec
