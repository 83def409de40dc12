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
from cpython.dict cimport PyDict_Copy, PyDict_DelItem, PyDict_GetItem, PyDict_New, PyDict_Next, PyDict_SetItem
from cpython.mem cimport PyMem_Calloc, PyMem_Free
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

# Filling a fresh dict in place. A decoded/encoded dict is a PyDict_Copy of a per-bitmap template that
# has the message's keys in pyiso8583's order; PyDict_SetItem on it costs a hash-table probe per key
# (~20 ns, ~40% of building pyiso8583's result). On CPython 3.11 the copy is a "combined, unicode-keys"
# table whose entry i is the template's key i, so the value can be stored at entry i directly. That is
# CPython's private layout (Include/internal/pycore_dict.h), hence the guards: compiled only for 3.11,
# a per-copy check of the table kind/size/ownership, the key of every entry compared by identity before
# it is written, a self-test at import, and the public PyDict_SetItem path whenever any of it fails.
cdef extern from *:
    """
    #if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000 && !defined(Py_LIMITED_API) && !defined(PYPY_VERSION)
    #define SW_DICT_FILL 1
    /* Mirror of struct _dictkeysobject (CPython 3.11 Include/internal/pycore_dict.h). */
    typedef struct {
        Py_ssize_t dk_refcnt;
        uint8_t dk_log2_size;
        uint8_t dk_log2_index_bytes;
        uint8_t dk_kind;
        uint32_t dk_version;
        Py_ssize_t dk_usable;
        Py_ssize_t dk_nentries;
        char dk_indices[];
    } sw_dictkeys;
    #define SW_DICT_KEYS_UNICODE 1
    #else
    #define SW_DICT_FILL 0
    #endif
    typedef struct { PyObject *me_key; PyObject *me_value; } sw_entry;

    #if defined(__SSE2__)
    #include <emmintrin.h>
    /* 16 hex digits (either case) at s -> 8 bytes at d, or 0 (d untouched) if any is not a hex digit. */
    static inline int sw_unhex16(const unsigned char* s, unsigned char* d) {
        const __m128i c = _mm_loadu_si128((const __m128i*)s);
        /* Signed compares: bytes >= 0x80 are negative and fall outside both ranges. */
        const __m128i digit = _mm_and_si128(_mm_cmpgt_epi8(c, _mm_set1_epi8('0' - 1)),
                                            _mm_cmplt_epi8(c, _mm_set1_epi8('9' + 1)));
        const __m128i lower = _mm_or_si128(c, _mm_set1_epi8(0x20));
        const __m128i letter = _mm_and_si128(_mm_cmpgt_epi8(lower, _mm_set1_epi8('a' - 1)),
                                             _mm_cmplt_epi8(lower, _mm_set1_epi8('f' + 1)));
        __m128i nib, lane;
        if (_mm_movemask_epi8(_mm_or_si128(digit, letter)) != 0xFFFF) return 0;
        nib = _mm_add_epi8(_mm_and_si128(c, _mm_set1_epi8(0x0F)), _mm_and_si128(letter, _mm_set1_epi8(9)));
        /* 16-bit lane k holds digits 2k (low byte) and 2k+1 (high byte): byte k = d[2k] << 4 | d[2k+1]. */
        lane = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(nib, _mm_set1_epi16(0x00FF)), 4),
                            _mm_srli_epi16(nib, 8));
        _mm_storel_epi64((__m128i*)d, _mm_packus_epi16(lane, lane));
        return 1;
    }
    /* 8 bytes at p -> their 16 upper-case hex digits at o. */
    static inline int sw_hex8(const unsigned char* p, unsigned char* o) {
        const __m128i b = _mm_loadl_epi64((const __m128i*)p);
        const __m128i n = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F)),
                                            _mm_and_si128(b, _mm_set1_epi8(0x0F)));
        const __m128i letter = _mm_and_si128(_mm_cmpgt_epi8(n, _mm_set1_epi8(9)), _mm_set1_epi8('A' - '0' - 10));
        _mm_storeu_si128((__m128i*)o, _mm_add_epi8(n, _mm_add_epi8(_mm_set1_epi8('0'), letter)));
        return 1;
    }
    #else
    static inline int sw_unhex16(const unsigned char* s, unsigned char* d) { (void)s; (void)d; return 0; }
    static inline int sw_hex8(const unsigned char* p, unsigned char* o) { (void)p; (void)o; return 0; }
    #endif

    /* 8 hex digits (either case) at s -> 4 bytes at d, or 0 if any is not a hex digit. SWAR on
       little-endian machines (~25 operations instead of 8 table look-ups and branches). */
    static inline int sw_unhex8(const unsigned char* s, unsigned char* d) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
        uint64_t w, lw, digit, letter, nib, t;
        uint32_t out;
        memcpy(&w, s, 8);
        if (w & high) return 0;
        /* For bytes below 0x80: byte >= c exactly when bit 7 of (byte + 0x80 - c) is set. */
        digit = (w + ones * (0x80 - '0')) & ~(w + ones * (0x80 - '9' - 1)) & high;
        lw = w | (ones * 0x20);
        letter = (lw + ones * (0x80 - 'a')) & ~(lw + ones * (0x80 - 'f' - 1)) & high;
        if ((digit | letter) != high) return 0;
        nib = (w & (ones * 0x0F)) + (letter >> 7) * 9;
        t = ((nib & 0x000F000F000F000FULL) << 4) | ((nib >> 8) & 0x000F000F000F000FULL);
        t = (t | (t >> 8)) & 0x0000FFFF0000FFFFULL;
        t = (t | (t >> 16)) & 0x00000000FFFFFFFFULL;
        out = (uint32_t)t;
        memcpy(d, &out, 4);
        return 1;
    #else
        (void)s; (void)d;
        return 0;  /* the caller's table loop does it */
    #endif
    }

    /* n bytes s -> d (non-overlapping). Encode copies ~45 pieces of 1-20 bytes per message; a libc
       memcpy call costs ~40 instructions for those, two overlapping word moves ~6. */
    static inline void sw_copy(unsigned char* d, const unsigned char* s, Py_ssize_t n) {
        if (n >= 8 && n <= 16) {
            uint64_t a, b;
            memcpy(&a, s, 8); memcpy(&b, s + n - 8, 8);
            memcpy(d, &a, 8); memcpy(d + n - 8, &b, 8);
        } else if (n >= 4 && n < 8) {
            uint32_t a, b;
            memcpy(&a, s, 4); memcpy(&b, s + n - 4, 4);
            memcpy(d, &a, 4); memcpy(d + n - 4, &b, 4);
        } else if (n > 0 && n < 4) {
            d[0] = s[0]; d[n >> 1] = s[n >> 1]; d[n - 1] = s[n - 1];
        } else if (n > 16) {
            memcpy(d, s, (size_t)n);
        }
    }

    /* The entries of `d` if it is a combined unicode-keys table of exactly n live entries that no one
       else shares (what PyDict_Copy makes of our templates), else NULL. */
    static inline sw_entry* sw_entries(PyObject* d, Py_ssize_t n) {
    #if SW_DICT_FILL
        PyDictObject* mp = (PyDictObject*)d;
        sw_dictkeys* k = (sw_dictkeys*)mp->ma_keys;
        if (mp->ma_values != NULL || mp->ma_used != n || k->dk_refcnt != 1
                || k->dk_kind != SW_DICT_KEYS_UNICODE || k->dk_nentries != n)
            return NULL;
        return (sw_entry*)(k->dk_indices + ((size_t)1 << k->dk_log2_index_bytes));
    #else
        (void)d; (void)n;
        return NULL;
    #endif
    }

    /* Store value (a new reference is taken) at entry i, whose key must be `key`: 0 on success,
       -1 (nothing changed) if the key differs. The old value is one of the template's constants, so
       dropping it never runs a destructor. */
    /* The cached hash of an exact str (-1 when not computed yet). */
    static inline Py_hash_t sw_str_hash(PyObject* o) {
        return PyUnicode_CheckExact(o) ? ((PyASCIIObject*)o)->hash : -1;
    }

    static inline int sw_put(sw_entry* e, Py_ssize_t i, PyObject* key, PyObject* value) {
        PyObject* old = e[i].me_value;
        if (e[i].me_key != key) return -1;
        Py_INCREF(value);
        e[i].me_value = value;
        Py_DECREF(old);
        return 0;
    }
    """
    ctypedef struct sw_entry:
        PyObject* me_key
        PyObject* me_value
    sw_entry* sw_entries(object d, Py_ssize_t n)
    int sw_put(sw_entry* e, Py_ssize_t i, PyObject* key, PyObject* value)
    void sw_copy(unsigned char* d, const unsigned char* s, Py_ssize_t n)
    Py_hash_t sw_str_hash(PyObject* o)
    int sw_unhex8(const unsigned char* s, unsigned char* d)
    int sw_unhex16(const unsigned char* s, unsigned char* d)
    int sw_hex8(const unsigned char* p, unsigned char* o)
    int SW_DICT_FILL
    int PyObject_GC_IsTracked(object o)
    void PyObject_GC_Track(object o)
    int _PyDict_SetItem_KnownHash(object d, object key, object value, Py_hash_t hash) except -1
    void Py_XDECREF(PyObject* o)
    void Py_INCREF(PyObject* o)

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
    # Open-addressed table of the plan's own field keys "1".."192" by hash (power of two, < 40% full).
    KEY_SLOTS = 512
    # Length prefixes of values below this are shared bytes objects, one per (field, length).
    LEN_CACHE_SIZE = 256

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
    # What encoding a field reads comes first (one or two cache lines per field, not three).
    PyObject* key
    # Length prefix bytes by length value (< len_cache_size), filled on first use; NULL until then.
    PyObject** len_cache
    Py_ssize_t len_cache_size
    unsigned char digit_byte[10]
    unsigned char digit_val[256]

cdef const char* HEX_UPPER = b"0123456789ABCDEF"
cdef unsigned char HEX_VAL[256]
# The two upper-case hex digits of each byte value, so a byte is converted with one 2-byte copy.
cdef unsigned char HEX_PAIR[512]
for _i in range(256):
    HEX_PAIR[2 * _i] = HEX_UPPER[_i >> 4]
    HEX_PAIR[2 * _i + 1] = HEX_UPPER[_i & 15]
memset(HEX_VAL, 255, 256)
for _i in range(10):
    HEX_VAL[48 + _i] = _i
for _i in range(6):
    HEX_VAL[65 + _i] = 10 + _i
    HEX_VAL[97 + _i] = 10 + _i

# Interned, so the templates' keys are these very objects (sw_put compares keys by identity).
cdef object K_LEN = intern("len")
cdef object K_DATA = intern("data")
cdef Py_hash_t H_LEN = hash(K_LEN)
cdef Py_hash_t H_DATA = hash(K_DATA)
cdef object K_H = intern("h")
cdef object K_T = intern("t")
cdef object K_P = intern("p")
cdef object K_1 = intern("1")
cdef object K_65 = intern("65")
cdef bytes EMPTY = b""

#: Fill fresh dicts in place (see sw_entries); False after a failed self-test or set_dict_fill(False).
cdef bint _dict_fill = False


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
    #: Field number by key object: the caller's keys are most often these very interned strings
    #: (literals, or keys of a dict the codec decoded), found with one hash probe and an identity
    #: compare instead of parsing the digits. Anything else is parsed (_field_number).
    cdef PyObject* kslot_key[KEY_SLOTS]
    cdef int kslot_num[KEY_SLOTS]

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
        self._fill_key_slots()

    cdef void _fill_key_slots(self):
        cdef int i
        cdef Py_ssize_t slot
        cdef Py_hash_t h
        memset(self.kslot_key, 0, sizeof(self.kslot_key))
        for i in range(1, MAX_FIELD + 1):
            h = hash(<object>self.ops[i].key)
            slot = h & (KEY_SLOTS - 1)
            while self.kslot_key[slot] != NULL:
                slot = (slot + 1) & (KEY_SLOTS - 1)
            self.kslot_key[slot] = self.ops[i].key
            self.kslot_num[slot] = i

    cdef tuple template(self, uint64_t b0, uint64_t b1, uint64_t b2):
        cdef uint64_t h = (b0 * 0x9E3779B97F4A7C15ULL) ^ (b1 * 0xC2B2AE3D27D4EB4FULL) ^ (b2 * 0x165667B19E3779F9ULL)
        cdef int slot = <int>(h >> 58)
        cdef object entry = <object>PyList_GET_ITEM(self.templates, slot)
        cdef int i, lz
        cdef uint64_t word
        if (entry is not None and self.tkeys[3 * slot] == b0 and self.tkeys[3 * slot + 1] == b1
                and self.tkeys[3 * slot + 2] == b2):
            return <tuple>entry
        keys = [K_H] if self.has_header else []
        keys += [K_T, K_P]
        if b0 >> 63:
            keys.append(K_1)
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

    def __dealloc__(self):
        self._free_len_cache(&self.h)
        self._free_len_cache(&self.t)
        self._free_len_cache(&self.p)
        self._free_len_cache(&self.s)
        for i in range(MAX_FIELD + 1):
            self._free_len_cache(&self.ops[i])

    cdef void _free_len_cache(self, Op* op):
        cdef Py_ssize_t i
        if op.len_cache == NULL:
            return
        for i in range(op.len_cache_size):
            Py_XDECREF(op.len_cache[i])
        PyMem_Free(op.len_cache)
        op.len_cache = NULL

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
        if op.kind == KIND_FIELD and op.len_type > 0 and op.max_len >= 0:
            op.len_cache_size = min(op.max_len + 1, LEN_CACHE_SIZE)
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
    cdef Py_ssize_t i = 0
    while i + 8 <= n and sw_hex8(p + i, <unsigned char*>o + 2 * i):  # SSE2: 8 bytes at a time
        i += 8
    while i < n:
        memcpy(o + 2 * i, HEX_PAIR + 2 * p[i], 2)
        i += 1
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


cdef inline object _text(Op* op, const unsigned char* p, Py_ssize_t n):
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


cdef dict PAIR_TEMPLATE = {K_LEN: EMPTY, K_DATA: EMPTY}  # never handed out


cdef inline dict _pair(object len_bytes, object data_bytes):
    """pyiso8583's {"len": ..., "data": ...}: a copy of a template filled in place (3-6% faster per
    decode/encode than two inserts into a new dict, measured), else two stores with known hashes."""
    cdef sw_entry* e
    cdef dict d
    if _dict_fill:
        d = PyDict_Copy(PAIR_TEMPLATE)
        e = sw_entries(d, 2)
        if (e != NULL and sw_put(e, 0, <PyObject*>K_LEN, <PyObject*>len_bytes) == 0
                and sw_put(e, 1, <PyObject*>K_DATA, <PyObject*>data_bytes) == 0):
            return d
    d = PyDict_New()
    _PyDict_SetItem_KnownHash(d, K_LEN, len_bytes, H_LEN)
    _PyDict_SetItem_KnownHash(d, K_DATA, data_bytes, H_DATA)
    return d


cdef struct Sink:
    # Where decoded entries go: dd (and de unless only the decoded dict is built, then NULL). With
    # ed/ee set, entry i of the template copies is written in place; else PyDict_SetItem.
    PyObject* dd
    PyObject* de
    sw_entry* ed
    sw_entry* ee
    Py_ssize_t i


cdef inline int _put(Sink* s, object key, object text, object pair) except -1:
    """Store the next entry (pair is ignored without de). 1 when stored, 0 to bail."""
    if s.ed != NULL:
        if sw_put(s.ed, s.i, <PyObject*>key, <PyObject*>text) < 0:
            return 0
        if s.ee != NULL and sw_put(s.ee, s.i, <PyObject*>key, <PyObject*>pair) < 0:
            return 0
    else:
        PyDict_SetItem(<object>s.dd, key, text)
        if s.de != NULL:
            PyDict_SetItem(<object>s.de, key, pair)
    s.i += 1
    return 1


cdef inline uint64_t _be64(const unsigned char* p):
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


# ---------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------

cdef inline int _read_length(Op* op, const unsigned char* buf, Py_ssize_t n, Py_ssize_t idx,
                             unsigned long long* out) noexcept:
    """A field's length from its prefix at idx (its fixed length when it has none) into *out: 0, or
    -1 when the prefix is malformed or over max_len (the callers then bail to pyiso8583). One parse for
    the decoder and the bitmap finder."""
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
    out[0] = length
    return 0


cdef Py_ssize_t _dec_field(Op* op, const unsigned char* buf, Py_ssize_t n, Py_ssize_t idx,
                           Sink* sink) except -2:
    """One regular field (pyiso8583 _decode_field). Returns the next index, or -1 to bail."""
    cdef int lt = op.len_type
    cdef unsigned long long length = 0
    cdef Py_ssize_t blen, i
    cdef unsigned char c
    cdef object len_bytes = EMPTY
    cdef object text
    if _read_length(op, buf, n, idx, &length) < 0:
        return -1
    if lt != 0:
        if sink.de != NULL:
            if length < <unsigned long long>op.len_cache_size:
                # The same bytes as the wire's: a length has exactly one spelling per field.
                len_bytes = _len_obj(op, length)
            else:
                len_bytes = PyBytes_FromStringAndSize(<const char*>buf + idx, lt)
        idx += lt
    cdef object key = <object>op.key
    if length == 0:
        if not _put(sink, key, "", _pair(len_bytes, EMPTY) if sink.de != NULL else None):
            return -1
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
    if sink.de != NULL:
        if not _put(sink, key, text, _pair(len_bytes, PyBytes_FromStringAndSize(<const char*>p, blen))):
            return -1
    elif not _put(sink, key, text, None):
        return -1
    return idx + blen


cdef Py_ssize_t _dec_bitmap(Op* op, const unsigned char* buf, Py_ssize_t n, Py_ssize_t idx,
                            Sink* sink, object key, bint extended, uint64_t* out) except -2:
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
        # The tertiary bitmap is appended to "1", already stored (the dicts are valid at all times).
        dd = <object>sink.dd
        PyDict_SetItem(dd, key, <object>PyDict_GetItem(dd, key) + text)
        if sink.de != NULL:
            entry = <object>PyDict_GetItem(<object>sink.de, key)
            PyDict_SetItem(entry, K_DATA, <object>PyDict_GetItem(entry, K_DATA) + raw)
    elif not _put(sink, key, text, _pair(EMPTY, raw) if sink.de != NULL else None):
        return -1
    out[0] = bm
    return idx + width


cdef Py_ssize_t _dec_fields(Plan plan, uint64_t bm, int base, const unsigned char* buf, Py_ssize_t n,
                            Py_ssize_t idx, Sink* sink) except -2:
    """Every field whose bit is set in one bitmap word, in ascending order."""
    cdef int lz
    while bm:
        lz = __builtin_clzll(bm)
        bm &= ~((<uint64_t>1) << (63 - lz))
        idx = _dec_field(&plan.ops[base + lz + 1], buf, n, idx, sink)
        if idx < 0:
            return -1
    return idx


cdef Py_ssize_t _field_end(Op* op, const unsigned char* buf, Py_ssize_t n, Py_ssize_t idx):
    """Where a field ends, from its length prefix alone (-1 when unsure): used to find the bitmap."""
    cdef int lt = op.len_type
    cdef unsigned long long length = 0
    if _read_length(op, buf, n, idx, &length) < 0:
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
    cdef Py_ssize_t expected = -1
    cdef uint64_t bm0 = 0, bm1 = 0, bm2 = 0
    cdef uint64_t scan[3]
    cdef object dd, de = None
    cdef Sink sink
    sink.ed = sink.ee = NULL
    sink.i = 0
    if _prescan(plan, buf, n, scan):
        tpl = plan.template(scan[0], scan[1], scan[2])
        expected = len(<dict>PyTuple_GET_ITEM(tpl, 0))
        dd = PyDict_Copy(<object>PyTuple_GET_ITEM(tpl, 0))
        if not lean:
            de = PyDict_Copy(<object>PyTuple_GET_ITEM(tpl, 1))
        if _dict_fill:
            sink.ed = sw_entries(dd, expected)
            if not lean:
                sink.ee = sw_entries(de, expected)
                if sink.ee == NULL:
                    sink.ed = NULL
                elif not PyObject_GC_IsTracked(de):
                    PyObject_GC_Track(de)  # it will hold dicts
    else:
        dd = _PyDict_NewPresized(plan.size_hint)
        if not lean:
            de = _PyDict_NewPresized(plan.size_hint)
    sink.dd = <PyObject*>dd
    sink.de = NULL if lean else <PyObject*>de
    if plan.has_header:
        idx = _dec_field(&plan.h, buf, n, idx, &sink)
        if idx < 0:
            return None
    width = 2 if plan.t.data == DATA_BIN else 4
    if width > n - idx:
        return None
    text = _text(&plan.t, buf + idx, width)
    if text is None:
        return None
    if not _put(&sink, K_T, text,
                None if lean else _pair(EMPTY, PyBytes_FromStringAndSize(<const char*>buf + idx, width))):
        return None
    idx += width
    idx = _dec_bitmap(&plan.p, buf, n, idx, &sink, K_P, False, &bm0)
    if idx < 0:
        return None
    if bm0 >> 63:
        idx = _dec_bitmap(&plan.s, buf, n, idx, &sink, K_1, False, &bm1)
        if idx < 0:
            return None
        if bm1 >> 63:
            # Bit 65 announces a tertiary bitmap, which pyiso8583 appends to field "1".
            idx = _dec_bitmap(&plan.s, buf, n, idx, &sink, K_1, True, &bm2)
            if idx < 0:
                return None
    # Bits 1 and 65 are bitmap indicators, never fields.
    idx = _dec_fields(plan, bm0 & ~((<uint64_t>1) << 63), 0, buf, n, idx, &sink)
    if idx < 0:
        return None
    if bm1:
        idx = _dec_fields(plan, bm1 & ~((<uint64_t>1) << 63), 64, buf, n, idx, &sink)
        if idx < 0:
            return None
    if bm2:
        idx = _dec_fields(plan, bm2, 128, buf, n, idx, &sink)
        if idx < 0:
            return None
    # A template copy must have had every one of its entries replaced (else one still holds a blank).
    if idx != n or (expected >= 0 and sink.i != expected):
        return None
    plan.size_hint = sink.i
    return dd if lean else (dd, de)


# ---------------------------------------------------------------------------------------------------
# Encode
# ---------------------------------------------------------------------------------------------------

cdef inline object _enc_data(Op* op, object value, long long* enc_len):
    """The data bytes of one value (pyiso8583 _encode_bindary_field/_encode_text_field) or None."""
    cdef Py_ssize_t nchars, nbytes, i, k
    cdef const unsigned char* src
    cdef unsigned char* dst
    cdef int pad = -1
    cdef bint pad_left = False
    cdef unsigned char hi, lo, bad
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
        # HEX_VAL is 255 for a non-hex character, so one OR over all digits tells if any was bad.
        bad = 0
        if pad < 0:
            i = 0
            while i + 8 <= nbytes and sw_unhex16(src + 2 * i, dst + i):
                i += 8
            while i + 4 <= nbytes and sw_unhex8(src + 2 * i, dst + i):
                i += 4
            while i < nbytes:
                hi = HEX_VAL[src[2 * i]]
                lo = HEX_VAL[src[2 * i + 1]]
                bad |= hi | lo
                dst[i] = <unsigned char>((hi << 4) | lo)
                i += 1
        elif pad_left:
            lo = HEX_VAL[src[0]]
            bad |= lo
            dst[0] = <unsigned char>((HEX_VAL[pad] << 4) | lo)
            for i in range(1, nbytes):
                hi = HEX_VAL[src[2 * i - 1]]
                lo = HEX_VAL[src[2 * i]]
                bad |= hi | lo
                dst[i] = <unsigned char>((hi << 4) | lo)
        else:
            for i in range(nbytes - 1):
                hi = HEX_VAL[src[2 * i]]
                lo = HEX_VAL[src[2 * i + 1]]
                bad |= hi | lo
                dst[i] = <unsigned char>((hi << 4) | lo)
            hi = HEX_VAL[src[nchars - 1]]
            bad |= hi
            dst[nbytes - 1] = <unsigned char>((hi << 4) | HEX_VAL[pad])
        if bad > 15:
            return None
        enc_len[0] = nchars if op.nibbles else nbytes
        return out
    if op.data == DATA_ASCII:
        if not PyUnicode_IS_ASCII(value):
            return None
        nbytes = PyUnicode_GET_LENGTH(value)
        out = PyBytes_FromStringAndSize(NULL, nbytes)
        sw_copy(<unsigned char*>PyBytes_AS_STRING(out), <const unsigned char*>PyUnicode_DATA(value), nbytes)
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


cdef object _enc_len(Op* op, unsigned long long v):
    """The length prefix of a variable field (pyiso8583 _encode_field), or None if it cannot be."""
    cdef int lt = op.len_type
    cdef int i
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


cdef object _len_obj(Op* op, unsigned long long v):
    """_enc_len, shared per (field, length) for lengths below the op's cache size.

    Why: a length prefix is 1-3 bytes drawn from a few hundred values per field; bytes are immutable
    and compare by value, so one object per value serves every message (like CPython's 1-byte cache).
    The cache is keyed by the length, never by message content, and holds at most LEN_CACHE_SIZE
    objects per variable field.
    """
    cdef PyObject* hit
    if v >= <unsigned long long>op.len_cache_size:
        return _enc_len(op, v)
    if op.len_cache == NULL:
        # No Python code runs between the test and the store, so threads cannot race here.
        op.len_cache = <PyObject**>PyMem_Calloc(op.len_cache_size, sizeof(PyObject*))
        if op.len_cache == NULL:
            return _enc_len(op, v)
    hit = op.len_cache[v]
    if hit != NULL:
        return <object>hit
    out = _enc_len(op, v)
    # Re-read: allocating may run the collector, and a finalizer may let another thread fill the slot.
    if out is not None and op.len_cache[v] == NULL:
        Py_INCREF(<PyObject*>out)
        op.len_cache[v] = <PyObject*>out
    return out


cdef struct EncState:
    # Values of the caller's dict by field number (new references, for the bits set in held[]), the
    # pieces of the output (new references), and the encoded dict being filled (see Sink).
    PyObject* vals[MAX_FIELD + 1]
    uint64_t held[3]
    PyObject* pieces[MAX_PIECES]
    int npieces
    Py_ssize_t total
    PyObject* de
    sw_entry* ee
    Py_ssize_t i
    # The pieces are borrowed from the encoded dict's pairs (set when there is one), else owned.
    bint borrowed


cdef inline int _enc_put(EncState* st, object key, object len_bytes, object data) except -1:
    """Append one field's pieces and, when building it, its {"len", "data"} pair. 1, or 0 to bail."""
    if st.de != NULL:
        pair = _pair(len_bytes, data)
        if st.ee != NULL:
            if sw_put(st.ee, st.i, <PyObject*>key, <PyObject*>pair) < 0:
                return 0
        else:
            PyDict_SetItem(<object>st.de, key, pair)
        st.i += 1
    # Without the encoded dict to keep them alive, the pieces are held here (released by the caller).
    if PyBytes_GET_SIZE(len_bytes):
        if st.de == NULL:
            Py_INCREF(<PyObject*>len_bytes)
        st.pieces[st.npieces] = <PyObject*>len_bytes
        st.npieces += 1
    if st.de == NULL:
        Py_INCREF(<PyObject*>data)
    st.pieces[st.npieces] = <PyObject*>data
    st.npieces += 1
    st.total += PyBytes_GET_SIZE(len_bytes) + PyBytes_GET_SIZE(data)
    return 1


cdef int _enc_put_fixed(EncState* st, object key, object data) except -1:
    """_enc_put for the MTI and bitmaps (no length prefix), out of line: with one call site left,
    gcc inlines _enc_put into the per-field loop."""
    return _enc_put(st, key, EMPTY, data)


cdef inline int _enc_field(Op* op, object value, object key, EncState* st) except -1:
    """Encode one regular field (or the header). 1, or 0 to bail."""
    cdef long long enc_len = 0
    if op.kind != KIND_FIELD:
        return 0
    data = _enc_data(op, value, &enc_len)
    if data is None:
        return 0
    if op.len_type == 0:
        if enc_len != op.max_len:
            return 0
        len_bytes = EMPTY
    else:
        if enc_len > op.max_len:
            return 0
        len_bytes = _len_obj(op, <unsigned long long>enc_len)
        if len_bytes is None:
            return 0
    return _enc_put(st, key, len_bytes, data)


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


cdef inline int _key_number(Plan plan, PyObject* key):
    """_field_number, by identity with the plan's own key objects when the key is one of them."""
    cdef Py_hash_t h = sw_str_hash(key)
    cdef Py_ssize_t slot
    if h != -1:
        slot = h & (KEY_SLOTS - 1)
        while plan.kslot_key[slot] != NULL:
            if plan.kslot_key[slot] == key:
                return plan.kslot_num[slot]
            slot = (slot + 1) & (KEY_SLOTS - 1)
    return _field_number(<object>key)


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
    cdef EncState st
    cdef int i, lz
    cdef uint64_t word
    st.held[0] = st.held[1] = st.held[2] = 0
    st.npieces = 0
    st.total = 0
    st.de = NULL
    st.ee = NULL
    st.i = 0
    st.borrowed = not lean
    try:
        return _encode_body(plan, dd, lean, &st)
    finally:
        for i in range(3):
            word = st.held[i]
            while word:
                lz = __builtin_clzll(word)
                word &= ~((<uint64_t>1) << (63 - lz))
                Py_XDECREF(st.vals[64 * i + lz + 1])
        if not st.borrowed:
            for i in range(st.npieces):
                Py_XDECREF(st.pieces[i])


cdef object _encode_body(Plan plan, dict dd, bint lean, EncState* st):
    cdef long long enc_len = 0
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t expected = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef PyObject* item
    cdef int num, i, lz, base
    cdef uint64_t bm[3]
    cdef uint64_t word, bit
    cdef bint drops = False
    cdef object de = None
    cdef object hex0 = None, hex1 = None, hex2 = None
    cdef char* dst
    cdef Py_ssize_t piece_len

    # One pass over the caller's dict: the bitmap, and each field's value held by number (no second
    # lookup per field). Keys pyiso8583 would choke on send the whole call to it.
    while PyDict_Next(dd, &pos, &k, &v):
        num = _key_number(plan, k)
        if num < 0:
            return None
        if num == 0 or num == 1 or num == 65:  # "1" and "65" are dropped, bitmaps are recomputed
            if num:
                drops = True
            continue
        bit = (<uint64_t>1) << (63 - ((num - 1) & 63))
        Py_INCREF(v)
        st.vals[num] = v
        st.held[(num - 1) >> 6] |= bit
    bm[0], bm[1], bm[2] = st.held[0], st.held[1], st.held[2]
    if bm[2]:
        bm[1] |= (<uint64_t>1) << 63
    if bm[1]:
        bm[0] |= (<uint64_t>1) << 63
    if not lean:
        tde = <object>PyTuple_GET_ITEM(plan.template(bm[0], bm[1], bm[2]), 1)
        expected = len(<dict>tde)
        de = PyDict_Copy(tde)
        st.de = <PyObject*>de
        if _dict_fill:
            st.ee = sw_entries(de, expected)
            if st.ee != NULL and not PyObject_GC_IsTracked(de):
                PyObject_GC_Track(de)  # it will hold dicts

    if plan.has_header:
        item = PyDict_GetItem(dd, K_H)
        if item == NULL or not _enc_field(&plan.h, <object>item, K_H, st):
            return None
    item = PyDict_GetItem(dd, K_T)
    if item == NULL or plan.t.kind != KIND_FIELD:
        return None
    mti = _enc_data(&plan.t, <object>item, &enc_len)
    if mti is None or PyBytes_GET_SIZE(mti) != (2 if plan.t.data == DATA_BIN else 4):
        return None
    if not _enc_put_fixed(st, K_T, mti):
        return None

    if plan.p.kind != KIND_FIELD:
        return None
    hex0 = _bitmap_hex(bm[0])
    prim = _bitmap_bytes(&plan.p, bm[0], hex0)
    if prim is None or not _enc_put_fixed(st, K_P, prim):
        return None
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
        if not _enc_put_fixed(st, K_1, sec):
            return None

    for i in range(3):
        word = st.held[i]
        base = 64 * i
        while word:
            lz = __builtin_clzll(word)
            word &= ~((<uint64_t>1) << (63 - lz))
            if not _enc_field(&plan.ops[base + lz + 1], <object>st.vals[base + lz + 1],
                              <object>plan.ops[base + lz + 1].key, st):
                return None
    if not lean and st.i != expected:
        return None

    out = PyByteArray_FromStringAndSize(NULL, st.total)
    dst = PyByteArray_AS_STRING(out)
    for i in range(st.npieces):
        piece_len = PyBytes_GET_SIZE(<object>st.pieces[i])
        sw_copy(<unsigned char*>dst, <const unsigned char*>PyBytes_AS_STRING(<object>st.pieces[i]), piece_len)
        dst += piece_len

    if lean:
        return out
    # Success is certain: now the side effects pyiso8583 has on the caller's dict, in its order.
    if drops:
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


cdef bint _dict_fill_works() except -1:
    """Build dicts in place the way decode does and check CPython sees exactly what was meant."""
    cdef sw_entry* e
    cdef Py_ssize_t i
    if not SW_DICT_FILL:
        return False
    keys = [K_T, K_P, K_1] + [intern(str(i)) for i in range(2, 40)]
    values = [f"value {i}" for i in range(len(keys))]
    template = dict.fromkeys(keys, "")
    d = PyDict_Copy(template)
    e = sw_entries(d, len(keys))
    if e == NULL:
        return False
    for i in range(len(keys)):
        if e[i].me_key != <PyObject*>keys[i] or <object>e[i].me_value is not "":
            return False
    for i in range(len(keys)):
        if sw_put(e, i, <PyObject*>keys[i], <PyObject*>values[i]) < 0:
            return False
    if sw_put(e, 0, <PyObject*>K_65, <PyObject*>values[0]) == 0:  # a foreign key must be refused
        return False
    if list(d.items()) != list(zip(keys, values)) or any(d[k] is not v for k, v in zip(keys, values)):
        return False
    if list(template.items()) != [(k, "") for k in keys]:
        return False
    d[K_65] = "added"
    del d[K_P]
    if not (d.get(K_65) == "added" and K_P not in d and d[K_T] is values[0] and len(d) == len(keys)):
        return False
    pair = PyDict_Copy(PAIR_TEMPLATE)  # the smallest table (8 slots) as well
    e = sw_entries(pair, 2)
    if e == NULL or sw_put(e, 0, <PyObject*>K_LEN, <PyObject*>b"12") < 0:
        return False
    if sw_put(e, 1, <PyObject*>K_DATA, <PyObject*>b"ab") < 0:
        return False
    return list(pair.items()) == [("len", b"12"), ("data", b"ab")] and PAIR_TEMPLATE == {"len": b"", "data": b""}


def dict_fill_available():
    """True when dicts can be filled in place on this interpreter (CPython 3.11, self-test passed)."""
    return _DICT_FILL_OK


def set_dict_fill(bint enabled):
    """Fill result dicts in place (default where available) or through PyDict_SetItem (tests compare
    both). Returns the previous setting."""
    global _dict_fill
    if enabled and not _DICT_FILL_OK:
        raise RuntimeError("in-place dict filling is not available on this interpreter")
    previous = _dict_fill
    _dict_fill = enabled
    return previous


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


_DICT_FILL_OK = _dict_fill_works()
_dict_fill = _DICT_FILL_OK
