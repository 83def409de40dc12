# cython: language_level=3, boundscheck=False, wraparound=False
"""The floor under an exact pyiso8583 decode: only build (and drop) its output objects.

bench/codec_floor.py compiles this and feeds it one message with every field's offsets precomputed,
so nothing is parsed or checked: each variant creates the 21 str, 21 data bytes, the length-prefix
bytes, 21 {"len", "data"} dicts and the two outer dicts of pyiso8583's (doc_dec, doc_enc), returns
them, and drops them at the next call, as a caller of decode() does. No decoder that returns that
result can be faster than the cheapest variant on the same interpreter.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_Copy, PyDict_New, PyDict_Next, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject
from libc.string cimport memcpy
import time

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object o)
    object _PyDict_NewPresized(Py_ssize_t minused)
    object PyByteArray_FromStringAndSize(const char* s, Py_ssize_t n)
    int _PyDict_SetItem_KnownHash(object d, object k, object v, Py_hash_t h) except -1
    void PyObject_GC_Track(object o)

cdef extern from *:
    """
    /* CPython 3.11's dict-keys layout, as in _speedups/codec.pyx (see there). */
    typedef struct {
        Py_ssize_t dk_refcnt; uint8_t dk_log2_size; uint8_t dk_log2_index_bytes; uint8_t dk_kind;
        uint32_t dk_version; Py_ssize_t dk_usable; Py_ssize_t dk_nentries; char dk_indices[];
    } fl_keys;
    typedef struct { PyObject *me_key; PyObject *me_value; } fl_entry;
    static inline fl_entry* fl_entries(PyObject* d) {
        fl_keys* k = (fl_keys*)((PyDictObject*)d)->ma_keys;
        return (fl_entry*)(k->dk_indices + ((size_t)1 << k->dk_log2_index_bytes));
    }
    static inline void fl_put(fl_entry* e, Py_ssize_t i, PyObject* v) {
        PyObject* old = e[i].me_value; Py_INCREF(v); e[i].me_value = v; Py_DECREF(old);
    }
    """
    ctypedef struct fl_entry:
        pass
    fl_entry* fl_entries(object d)
    void fl_put(fl_entry* e, Py_ssize_t i, PyObject* v)

DEF MAX_ENTRIES = 64

cdef const char* HEX = b"0123456789ABCDEF"
cdef unsigned char HEX_PAIR[512]
for _b in range(256):
    HEX_PAIR[2 * _b] = HEX[_b >> 4]
    HEX_PAIR[2 * _b + 1] = HEX[_b & 15]
cdef object K_LEN = "len"
cdef object K_DATA = "data"
cdef Py_hash_t H_LEN = hash(K_LEN)
cdef Py_hash_t H_DATA = hash(K_DATA)
cdef bytes EMPTY = b""

cdef int count = 0
cdef PyObject* keys[MAX_ENTRIES]
cdef Py_hash_t hashes[MAX_ENTRIES]
cdef Py_ssize_t len_at[MAX_ENTRIES]
cdef Py_ssize_t len_size[MAX_ENTRIES]
cdef Py_ssize_t data_at[MAX_ENTRIES]
cdef Py_ssize_t data_size[MAX_ENTRIES]
cdef bint as_hex[MAX_ENTRIES]
cdef bint left_pad[MAX_ENTRIES]
cdef list keep = []
cdef object template_dec = None, template_enc = None
cdef bytes message = b""
cdef list prefixes = []
cdef object K_P = "p"


def setup(bytes raw, list layout):
    """layout: one (key, len_at, len_size, data_at, data_size, as_hex, left_pad) per entry, in
    pyiso8583's order (left_pad: an odd number of BCD digits, the first nibble is padding)."""
    global count, template_dec, template_enc, message
    if len(layout) > MAX_ENTRIES:
        raise ValueError("too many entries")
    message = raw
    count = len(layout)
    keep.clear()
    for i, (key, la, ls, da, ds, hx, lp) in enumerate(layout):
        key = intern(key)
        keep.append(key)
        keys[i] = <PyObject*>key
        hashes[i] = hash(key)
        len_at[i], len_size[i], data_at[i], data_size[i], as_hex[i], left_pad[i] = la, ls, da, ds, hx, lp
    prefixes[:] = [raw[la:la + ls] for _, la, ls, *_ in layout]  # shared, as switch.codec does
    template_dec = dict.fromkeys([k for k, *_ in layout], "")
    template_enc = dict.fromkeys([k for k, *_ in layout])


cdef inline object text(const unsigned char* p, Py_ssize_t n, bint hx, bint lp):
    cdef object out
    cdef char* o
    cdef Py_ssize_t i
    if lp:
        out = PyUnicode_New(2 * n - 1, 127)
        o = <char*>PyUnicode_DATA(out)
        o[0] = HEX[p[0] & 15]
        for i in range(1, n):
            memcpy(o + 2 * i - 1, HEX_PAIR + 2 * p[i], 2)
        return out
    if hx:
        out = PyUnicode_New(2 * n, 127)
        o = <char*>PyUnicode_DATA(out)
        for i in range(n):
            memcpy(o + 2 * i, HEX_PAIR + 2 * p[i], 2)
        return out
    out = PyUnicode_New(n, 127)
    memcpy(PyUnicode_DATA(out), p, n)
    return out


cdef inline object prefix(const char* b, int i):
    return EMPTY if len_size[i] == 0 else PyBytes_FromStringAndSize(b + len_at[i], len_size[i])


cdef object objects_only():
    cdef const char* b = PyBytes_AS_STRING(message)
    cdef object s, d, l
    for i in range(count):
        s = text(<const unsigned char*>b + data_at[i], data_size[i], as_hex[i], left_pad[i])
        l = prefix(b, i)
        d = PyBytes_FromStringAndSize(b + data_at[i], data_size[i])
    return None


cdef inline dict pair_known_hash(object l, object d):
    cdef dict p = PyDict_New()
    _PyDict_SetItem_KnownHash(p, K_LEN, l, H_LEN)
    _PyDict_SetItem_KnownHash(p, K_DATA, d, H_DATA)
    return p


cdef dict PAIR_TEMPLATE = {K_LEN: EMPTY, K_DATA: EMPTY}


cdef inline object pair_in_place(object l, object d):
    cdef object p = PyDict_Copy(PAIR_TEMPLATE)
    cdef fl_entry* e = fl_entries(p)
    fl_put(e, 0, <PyObject*>l)
    fl_put(e, 1, <PyObject*>d)
    return p


cdef inline dict pair_set_item(object l, object d):
    cdef dict p = _PyDict_NewPresized(2)
    PyDict_SetItem(p, K_LEN, l)
    PyDict_SetItem(p, K_DATA, d)
    return p


cdef object public_api():
    """The cheapest public-API way found: presized outer dicts, every store with a known hash."""
    cdef const char* b = PyBytes_AS_STRING(message)
    cdef dict dd = _PyDict_NewPresized(count), de = _PyDict_NewPresized(count)
    for i in range(count):
        key = <object>keys[i]
        s = text(<const unsigned char*>b + data_at[i], data_size[i], as_hex[i], left_pad[i])
        p = pair_known_hash(prefix(b, i), PyBytes_FromStringAndSize(b + data_at[i], data_size[i]))
        _PyDict_SetItem_KnownHash(dd, key, s, hashes[i])
        _PyDict_SetItem_KnownHash(de, key, p, hashes[i])
    return dd, de


cdef object template_set_item():
    """How switch.codec built the result before in-place filling: template copies + PyDict_SetItem."""
    cdef const char* b = PyBytes_AS_STRING(message)
    cdef dict dd = PyDict_Copy(template_dec), de = PyDict_Copy(template_enc)
    for i in range(count):
        key = <object>keys[i]
        s = text(<const unsigned char*>b + data_at[i], data_size[i], as_hex[i], left_pad[i])
        p = pair_set_item(prefix(b, i), PyBytes_FromStringAndSize(b + data_at[i], data_size[i]))
        PyDict_SetItem(dd, key, s)
        PyDict_SetItem(de, key, p)
    return dd, de


cdef object in_place():
    """switch.codec today: template copies (outer dicts and pairs) with values replaced in place."""
    cdef const char* b = PyBytes_AS_STRING(message)
    cdef object dd = PyDict_Copy(template_dec), de = PyDict_Copy(template_enc)
    cdef fl_entry* ed = fl_entries(dd)
    cdef fl_entry* ee = fl_entries(de)
    PyObject_GC_Track(de)
    for i in range(count):
        s = text(<const unsigned char*>b + data_at[i], data_size[i], as_hex[i], left_pad[i])
        p = pair_in_place(prefix(b, i), PyBytes_FromStringAndSize(b + data_at[i], data_size[i]))
        fl_put(ed, i, <PyObject*>s)
        fl_put(ee, i, <PyObject*>p)
    return dd, de


cdef object encode_in_place(dict fields):
    """The least an exact encode must do: read the caller's values, build doc_enc (template copy and
    pairs filled in place, shared prefixes, data bytes), the output bytearray, and set "p"."""
    cdef const char* b = PyBytes_AS_STRING(message)
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef Py_ssize_t seen = 0
    cdef char* o
    cdef int i
    while PyDict_Next(fields, &pos, &k, &v):
        seen += 1
    de = PyDict_Copy(template_enc)
    cdef fl_entry* ee = fl_entries(de)
    PyObject_GC_Track(de)
    for i in range(count):
        p = pair_in_place(<object>PyList_GET_ITEM(prefixes, i),
                          PyBytes_FromStringAndSize(b + data_at[i], data_size[i]))
        fl_put(ee, i, <PyObject*>p)
    out = PyByteArray_FromStringAndSize(b, len(message))
    bitmap = PyUnicode_New(16, 127)
    o = <char*>PyUnicode_DATA(bitmap)
    for i in range(8):
        memcpy(o + 2 * i, HEX_PAIR + 2 * (<const unsigned char*>b)[data_at[1] + i], 2)
    PyDict_SetItem(fields, K_P, bitmap)
    return out, de


def encode_result(dict fields):
    return encode_in_place(fields)


def encode_cpu_ns_per_message(dict fields, long n):
    """CPU time per encode floor of a fresh copy of fields (copies made outside the timing)."""
    copies = [dict(fields) for _ in range(n)]
    cdef object r = None
    start = time.thread_time_ns()
    for c in copies:
        r = encode_in_place(<dict>c)
    return (time.thread_time_ns() - start) / n


VARIANTS = ("objects_only", "public_api", "template_set_item", "in_place")


cdef object build(int variant):
    if variant == 0:
        return objects_only()
    if variant == 1:
        return public_api()
    if variant == 2:
        return template_set_item()
    return in_place()


def result(str variant):
    """One output of a variant (to check it equals pyiso8583's)."""
    return build(VARIANTS.index(variant))


def cpu_ns_per_message(str variant, long n):
    """CPU time of this thread per built-and-dropped result, over n results."""
    cdef int v = VARIANTS.index(variant)
    cdef object r = None
    start = time.thread_time_ns()
    for _ in range(n):
        r = build(v)
    return (time.thread_time_ns() - start) / n
