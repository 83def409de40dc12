# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The ledger's per-entry loops in C: draft validation on the caller's side, leaf hashing + Merkle
right edge + row tuples + balance fold on the writer's side.

Why: at 50,000 durable entries/s the whole process has ~20 us of CPU per entry, and SQLite needs ~8 of
them; the same loops in Python cost ~4 us (`prepare`'s checks) and ~3 us (`_rows`) per entry, mostly
interpreter overhead around a few comparisons and two SHA-256 calls.

Contract: both functions are pure accelerations of `switch.ledger.codec.prepare` and
`switch.ledger.writer._rows_py`; tests/ledger/test_fast_path.py holds them equal on random input.
`prepare_body` never raises for a bad draft: it returns None whenever it is not certain the draft is
valid (wrong or unusual types, any failed check), and the caller then runs the Python `prepare`,
which raises the precise error. So the fast path can only be stricter, never more lenient.
SHA-256 is OpenSSL's: called directly through libcrypto's SHA256_* functions when the build found
its headers (`OPENSSL_SHA256`; ~0.2 us per leaf instead of ~0.9 us through a hashlib object, on the
GIL), else through hashlib. Nothing here implements a hash.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.unicode cimport PyUnicode_GET_LENGTH, PyUnicode_READ, PyUnicode_KIND, PyUnicode_DATA
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from libc.string cimport memcpy

cdef extern from *:
    """
    #ifdef SWITCH_OPENSSL_SHA256
    #ifndef OPENSSL_SUPPRESS_DEPRECATED
    #define OPENSSL_SUPPRESS_DEPRECATED
    #endif
    #include <openssl/sha.h>
    /* SHA-256 of a || b into md[32]: 1, or 0 when it failed (the caller then uses hashlib). The
       SHA256_* calls reach OpenSSL's block function directly; the one-shot SHA256() of OpenSSL 3
       fetches the algorithm on every call and costs more than twice as much. */
    static int switch_sha256_2(const unsigned char *a, size_t na, const unsigned char *b, size_t nb,
                               unsigned char *md) {
        SHA256_CTX c;
        return SHA256_Init(&c) && SHA256_Update(&c, a, na) && SHA256_Update(&c, b, nb)
               && SHA256_Final(md, &c);
    }
    #define SWITCH_HAVE_OPENSSL_SHA256 1
    #else
    static int switch_sha256_2(const unsigned char *a, size_t na, const unsigned char *b, size_t nb,
                               unsigned char *md) { return 0; }
    #define SWITCH_HAVE_OPENSSL_SHA256 0
    #endif
    """
    int switch_sha256_2(const unsigned char *a, size_t na, const unsigned char *b, size_t nb,
                        unsigned char *md) nogil
    int SWITCH_HAVE_OPENSSL_SHA256

#: True when SHA-256 goes straight to libcrypto (the build found OpenSSL's headers), else hashlib.
OPENSSL_SHA256 = bool(SWITCH_HAVE_OPENSSL_SHA256)

# Configured once by switch.ledger.fast (the Python objects the checks compare against).
cdef object _EntryDraft = None
cdef object _EntryKind = None
cdef object _Side = None
cdef object _Posting = None
cdef object _DECLINE = None
cdef object _DEBIT = None
cdef object _encode = None
cdef object _astuple = None
cdef object _sha256 = None
cdef dict _kind_value = {}
cdef long long _max_amount = 0
cdef Py_ssize_t _max_key = 0, _max_text = 0, _max_memo = 0, _max_postings = 0
cdef bint _ready = False

#: EntryDraft's field order this module indexes by (configure refuses any other).
FIELDS = ("idempotency_key", "kind", "rrn", "at_ms", "response_code", "merchant_id", "terminal_id",
          "pan_masked", "pan_hash", "amount_minor", "currency", "original_rrn", "postings", "memo")


def configure(draft_cls, kind_cls, side_cls, posting_cls, field_names, encode, astuple, sha256,
              long long max_amount, Py_ssize_t max_key, Py_ssize_t max_text, Py_ssize_t max_memo,
              Py_ssize_t max_postings):
    """Bind the model classes and limits; returns False (fast path off) if EntryDraft's fields are
    not the ones this module was written for."""
    global _EntryDraft, _EntryKind, _Side, _Posting, _DECLINE, _DEBIT, _encode, _astuple, _sha256
    global _kind_value, _max_amount, _max_key, _max_text, _max_memo, _max_postings, _ready
    _ready = False
    if tuple(field_names) != FIELDS:
        return False
    _EntryDraft, _EntryKind, _Side, _Posting = draft_cls, kind_cls, side_cls, posting_cls
    _DECLINE = kind_cls("decline")
    _DEBIT = side_cls("D")
    _encode, _astuple, _sha256 = encode, astuple, sha256
    _kind_value = {k: k.value for k in kind_cls}
    _max_amount, _max_key, _max_text, _max_memo, _max_postings = (
        max_amount, max_key, max_text, max_memo, max_postings)
    _ready = True
    return True


cdef inline bint _is_digit(Py_UCS4 c) noexcept:
    return 0x30 <= c <= 0x39


cdef bint _currency_ok(str s) noexcept:
    """[0-9]{3} or [A-Z]{3}."""
    if PyUnicode_GET_LENGTH(s) != 3:
        return False
    cdef int kind = PyUnicode_KIND(s)
    cdef void *data = PyUnicode_DATA(s)
    cdef Py_UCS4 a = PyUnicode_READ(kind, data, 0)
    cdef Py_UCS4 b = PyUnicode_READ(kind, data, 1)
    cdef Py_UCS4 c = PyUnicode_READ(kind, data, 2)
    if _is_digit(a) and _is_digit(b) and _is_digit(c):
        return True
    return 0x41 <= a <= 0x5A and 0x41 <= b <= 0x5A and 0x41 <= c <= 0x5A


cdef bint _pan_hash_ok(str s) noexcept:
    """[0-9a-f]{64}."""
    if PyUnicode_GET_LENGTH(s) != 64:
        return False
    cdef int kind = PyUnicode_KIND(s)
    cdef void *data = PyUnicode_DATA(s)
    cdef Py_ssize_t i
    cdef Py_UCS4 c
    for i in range(64):
        c = PyUnicode_READ(kind, data, i)
        if not (_is_digit(c) or 0x61 <= c <= 0x66):
            return False
    return True


cdef bint _pan_masked_ok(str s) noexcept:
    """[0-9]{0,6}\\**[0-9]{0,4} (full match), as the Python regex decides it."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s), i = 0, lead = 0, stars = 0, tail = 0
    cdef int kind = PyUnicode_KIND(s)
    cdef void *data = PyUnicode_DATA(s)
    while i < n and _is_digit(PyUnicode_READ(kind, data, i)):
        i += 1
        lead += 1
    while i < n and PyUnicode_READ(kind, data, i) == 0x2A:
        i += 1
        stars += 1
    while i < n and _is_digit(PyUnicode_READ(kind, data, i)):
        i += 1
        tail += 1
    if i != n:
        return False
    if stars == 0:
        return lead <= 10  # digits only: split as 6 + 4
    return lead <= 6 and tail <= 4


cdef inline bint _amount(object v, long long *out) noexcept:
    """An exact int in 0..max_amount into *out; False otherwise (bool, other types, out of range)."""
    cdef int overflow = 0
    cdef long long x
    if type(v) is not int:
        return False
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow or x < 0 or x > _max_amount:
        return False
    out[0] = x
    return True


def prepare_body(draft):
    """The canonical body of a valid draft, or None (then run the Python `prepare` for the error)."""
    if not _ready or type(draft) is not _EntryDraft:
        return None
    cdef tuple t = _astuple(draft)
    cdef object o
    cdef Py_ssize_t i
    cdef long long amount, pamount, net = 0
    # every text field an exact str; kind an EntryKind; at_ms an exact int (range: the encoder's)
    for i in (0, 2, 4, 5, 6, 7, 8, 10, 11, 13):
        if type(t[i]) is not str:
            return None
    if type(t[1]) is not _EntryKind or type(t[3]) is not int or type(t[12]) is not tuple:
        return None
    cdef str key = t[0]
    cdef Py_ssize_t key_len = PyUnicode_GET_LENGTH(key)
    if key_len == 0 or key_len > _max_key or PyUnicode_GET_LENGTH(<str>t[2]) == 0:
        return None
    for i in (2, 11, 4, 5, 6, 7):
        if PyUnicode_GET_LENGTH(<str>t[i]) > _max_text:
            return None
    if PyUnicode_GET_LENGTH(<str>t[13]) > _max_memo:
        return None
    if PyUnicode_GET_LENGTH(<str>t[7]) and not _pan_masked_ok(<str>t[7]):
        return None
    if PyUnicode_GET_LENGTH(<str>t[8]) and not _pan_hash_ok(<str>t[8]):
        return None
    if not _amount(t[9], &amount):
        return None
    if PyUnicode_GET_LENGTH(<str>t[10]) and not _currency_ok(<str>t[10]):
        return None
    cdef tuple postings = t[12]
    if len(postings) > _max_postings or (postings and t[1] is _DECLINE):
        return None
    cdef str currency0 = None
    cdef str account
    cdef object side
    for o in postings:
        if type(o) is not _Posting:
            return None
        account = o.account if type(o.account) is str else None
        if account is None or PyUnicode_GET_LENGTH(account) == 0 or PyUnicode_GET_LENGTH(account) > _max_key:
            return None
        side = o.side
        if type(side) is not _Side or type(o.currency) is not str or not _amount(o.amount_minor, &pamount):
            return None
        if pamount == 0 or not _currency_ok(<str>o.currency):
            return None
        if currency0 is None:
            currency0 = o.currency
        elif o.currency != currency0:
            return None  # several currencies: the Python path nets them per currency
        net += pamount if side is _DEBIT else -pamount
    if net != 0:
        return None
    try:
        return _encode(t)
    except Exception:
        return None


cdef bytes _leaf(unsigned long long seq, bytes body):
    """H(0x00 (leaf) || 0x01 (entry format) || seq as 8 bytes big-endian || body)."""
    cdef unsigned char prefix[10]
    cdef unsigned char md[32]
    cdef int i
    prefix[0] = 0
    prefix[1] = 1
    for i in range(8):
        prefix[9 - i] = (seq >> (8 * i)) & 0xFF
    if switch_sha256_2(prefix, 10, <const unsigned char *>PyBytes_AS_STRING(body),
                       <size_t>PyBytes_GET_SIZE(body), md):
        return PyBytes_FromStringAndSize(<char *>md, 32)
    return _sha256(PyBytes_FromStringAndSize(<char *>prefix, 10) + body).digest()


cdef bytes _node(bytes left, bytes right):
    """H(0x01 || left || right)."""
    cdef unsigned char buf[65]
    cdef unsigned char md[32]
    buf[0] = 1
    memcpy(buf + 1, PyBytes_AS_STRING(left), 32)
    memcpy(buf + 33, PyBytes_AS_STRING(right), 32)
    if switch_sha256_2(buf, 65, buf, 0, md):
        return PyBytes_FromStringAndSize(<char *>md, 32)
    return _sha256(PyBytes_FromStringAndSize(<char *>buf, 65)).digest()


def build_rows(frontier, list new, list entries, list nodes, dict keyed, list rrns, dict running,
               dict first_seq, dict last_seq, dict cache, load_balance):
    """The writer's `_rows` loop: for each (seq, draft, body) in `new` append its entries row, append
    its leaf to `frontier` (closed subtrees at level >= frontier.min_level go to `nodes`), map its
    idempotency key to (seq, body) in `keyed`, append its rrn and original_rrn (when set) to `rrns`,
    and fold its postings into `running` (starting from `cache`, else `load_balance(account,
    currency)`)."""
    cdef list levels = frontier.levels
    cdef list hashes = frontier.hashes
    cdef long long size = frontier.size
    cdef long long min_level = frontier.min_level
    cdef long long seq, level, idx
    cdef bytes leaf, h
    cdef object d, p, k, bal, rrn
    cdef bytes body
    cdef tuple item, pt
    for item in new:
        seq = item[0]
        d = item[1]
        body = item[2]
        if seq != size:
            raise ValueError(f"entry seq {seq} is not the next leaf index {size}")
        leaf = _leaf(<unsigned long long>seq, body)
        # Frontier.append
        level = 0
        h = leaf
        while levels and <long long>levels[len(levels) - 1] == level:
            levels.pop()
            h = _node(<bytes>hashes.pop(), h)
            level += 1
            if level >= min_level:
                nodes.append((level, seq >> level, h))
        levels.append(level)
        hashes.append(h)
        size += 1
        # The blobs as bytearray: Python's sqlite3 binds a bytearray directly but sends every bytes
        # parameter through its adapter lookup first (~0.3 us each, on the GIL); psycopg takes both.
        entries.append((seq, d.idempotency_key, _kind_value[d.kind], d.rrn, d.original_rrn, d.at_ms,
                        d.merchant_id, d.amount_minor, d.currency,
                        PyByteArray_FromStringAndSize(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body)),
                        PyByteArray_FromStringAndSize(PyBytes_AS_STRING(leaf), 32)))
        keyed[d.idempotency_key] = (seq, body)
        rrn = d.rrn
        if rrn:
            rrns.append(rrn)
        rrn = d.original_rrn
        if rrn:
            rrns.append(rrn)
        for p in d.postings:
            pt = _astuple(p)
            k = (pt[0], pt[3])
            bal = running.get(k)
            if bal is None:
                bal = cache.get(k)
                if bal is None:
                    bal = load_balance(pt[0], pt[3])
                first_seq[k] = seq
            running[k] = bal + pt[2] if pt[1] is _DEBIT else bal - pt[2]
            last_seq[k] = seq
    frontier.size = size


# --- idempotency key filter ------------------------------------------------------------------------
from libc.stdlib cimport calloc, free


cdef class KeyFilterStage:
    """One Bloom filter stage of switch.ledger.keyfilter (the pure `_PyStage` is its reference: same
    probes, same bits). Probes come from the key's str hash (SipHash, cached in the str object, already
    computed by the writer's dict lookups): h1 = low 32 bits, h2 = high 32 bits | 1, probe i at
    (h1 + i * h2) mod bits."""

    cdef unsigned char *_bits
    cdef unsigned long long _mask
    cdef int _probes
    cdef public Py_ssize_t capacity
    cdef public Py_ssize_t count

    def __cinit__(self, Py_ssize_t capacity, int bits_per_key, int probes):
        cdef unsigned long long nbits = 64
        while nbits < <unsigned long long>capacity * bits_per_key:
            nbits <<= 1
        self._bits = <unsigned char *>calloc(nbits // 8, 1)
        if self._bits == NULL:
            raise MemoryError()
        self._mask = nbits - 1
        self._probes = probes
        self.capacity = capacity
        self.count = 0

    def __dealloc__(self):
        free(self._bits)

    @property
    def nbits(self):
        return self._mask + 1

    cdef inline unsigned long long _probe(self, unsigned long long h, int i) noexcept:
        """Bit index of probe i of a key whose str hash is h: (low 32 + i * (high 32 | 1)) mod bits."""
        return ((h & 0xFFFFFFFFULL) + <unsigned long long>i * ((h >> 32) | 1ULL)) & self._mask

    cdef inline void _add(self, object key):
        cdef unsigned long long h = <unsigned long long>hash(key), p
        cdef int i
        for i in range(self._probes):
            p = self._probe(h, i)
            self._bits[p >> 3] |= <unsigned char>(1 << (p & 7))
        self.count += 1

    cdef inline bint _has(self, object key):
        cdef unsigned long long h = <unsigned long long>hash(key), p
        cdef int i
        for i in range(self._probes):
            p = self._probe(h, i)
            if not (self._bits[p >> 3] >> (p & 7)) & 1:
                return False
        return True

    def add(self, key):
        self._add(key)

    def add_all(self, keys):
        """Add keys of the iterable until it ends or the stage is full (checked after each add, so no
        key taken from the iterator is dropped); returns how many were added."""
        cdef Py_ssize_t n = 0
        for key in keys:
            self._add(key)
            n += 1
            if self.count >= self.capacity:
                break
        return n

    def may_contain(self, key):
        return self._has(key)

    def filter(self, list keys):
        """The keys of `keys` this stage may contain, in order."""
        cdef list out = []
        for key in keys:
            if self._has(key):
                out.append(key)
        return out



# --- SQLite batch commits without the GIL -----------------------------------------------------------
# Why: Python's sqlite3 binds every parameter with the GIL held and releases and retakes it around
# every statement step. With the commit pipeline (switch.ledger.writer, "Pipeline") the committer's
# retakes wait behind the writer thread's Python for up to a GIL switch interval (5 ms) each, so a
# batch's commit started ~5 ms after it was handed over and its ~13 statements stretched it further
# (traced: 19 ms per 1,000-entry cycle, of which the write itself 12). `SqliteBatchWriter` copies
# the rows' values under the GIL -- integers into an array, the bytes of every text (UTF-8) and blob
# into one buffer owned by the call, so nothing bound points into a Python object -- then runs BEGIN,
# one prepared single-row INSERT per row and COMMIT in C with the GIL released: one release per
# batch; the statements' bindings are cleared before the buffer is freed. It is a connection of its
# own to the same file, through the very libsqlite3 the _sqlite3 extension module uses: the
# functions are looked up through a handle of _sqlite3 itself (dlopen RTLD_NOLOAD of its file, so
# dlsym searches it and its dependencies, as its own calls resolve), never a second copy of SQLite
# in the process (whose POSIX locks would not see each other's), and the library's version must be
# the one the sqlite3 module reports.

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport strncpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flag)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_NOLOAD

ctypedef int (*_f_open_v2)(const char *, void **, int, const char *) noexcept nogil
ctypedef int (*_f_db)(void *) noexcept nogil
ctypedef int (*_f_exec)(void *, const char *, void *, void *, char **) noexcept nogil
ctypedef int (*_f_prepare)(void *, const char *, int, void **, const char **) noexcept nogil
ctypedef int (*_f_bind_int64)(void *, int, long long) noexcept nogil
ctypedef int (*_f_bind_ptr)(void *, int, const char *, int, void *) noexcept nogil
ctypedef int (*_f_bind_null)(void *, int) noexcept nogil
ctypedef int (*_f_stmt)(void *) noexcept nogil
ctypedef const char *(*_f_errmsg)(void *) noexcept nogil
ctypedef int (*_f_busy)(void *, int) noexcept nogil
ctypedef int (*_f_version)() noexcept nogil
ctypedef const unsigned char *(*_f_column_text)(void *, int) noexcept nogil

cdef _f_open_v2 _sq_open = NULL
cdef _f_db _sq_close = NULL
cdef _f_exec _sq_exec = NULL
cdef _f_prepare _sq_prepare = NULL
cdef _f_bind_int64 _sq_bind_int64 = NULL
cdef _f_bind_ptr _sq_bind_text = NULL
cdef _f_bind_ptr _sq_bind_blob = NULL
cdef _f_bind_null _sq_bind_null = NULL
cdef _f_stmt _sq_step = NULL
cdef _f_stmt _sq_reset = NULL
cdef _f_stmt _sq_clear_bindings = NULL
cdef _f_stmt _sq_bind_parameter_count = NULL
cdef _f_stmt _sq_finalize = NULL
cdef _f_db _sq_get_autocommit = NULL
cdef _f_errmsg _sq_errmsg = NULL
cdef _f_busy _sq_busy_timeout = NULL
cdef _f_version _sq_version = NULL
cdef _f_column_text _sq_column_text = NULL
cdef int _sq_state = 0  # 0 not looked up, 1 found and the sqlite3 module's version, -1 unavailable

DEF _SQLITE_OK = 0
DEF _SQLITE_ROW = 100
DEF _SQLITE_DONE = 101
DEF _SQLITE_OPEN_READWRITE = 0x2
DEF _ERR_LEN = 512


def sqlite_batch_writes():
    """Whether `SqliteBatchWriter` can run: the _sqlite3 extension module is loaded (never loaded
    here), every function the writer calls resolves through it (the libsqlite3 it uses), and that
    library's version is the one the sqlite3 module reports (sqlite3.sqlite_version_info)."""
    global _sq_open, _sq_close, _sq_exec, _sq_prepare, _sq_bind_int64, _sq_bind_text, _sq_bind_blob
    global _sq_bind_null, _sq_step, _sq_reset, _sq_clear_bindings, _sq_bind_parameter_count
    global _sq_finalize, _sq_get_autocommit, _sq_errmsg, _sq_busy_timeout, _sq_version
    global _sq_column_text, _sq_state
    if _sq_state != 0:
        return _sq_state == 1
    _sq_state = -1
    import sqlite3
    import _sqlite3
    cdef bytes module_file = _sqlite3.__file__.encode() if getattr(_sqlite3, "__file__", None) else b""
    if not module_file:
        return False  # built into the interpreter: no file to take a handle of
    cdef void *lib = dlopen(module_file, RTLD_NOW | RTLD_NOLOAD)
    if lib == NULL:
        return False
    _sq_open = <_f_open_v2>dlsym(lib, "sqlite3_open_v2")
    _sq_close = <_f_db>dlsym(lib, "sqlite3_close_v2")
    _sq_exec = <_f_exec>dlsym(lib, "sqlite3_exec")
    _sq_prepare = <_f_prepare>dlsym(lib, "sqlite3_prepare_v2")
    _sq_bind_int64 = <_f_bind_int64>dlsym(lib, "sqlite3_bind_int64")
    _sq_bind_text = <_f_bind_ptr>dlsym(lib, "sqlite3_bind_text")
    _sq_bind_blob = <_f_bind_ptr>dlsym(lib, "sqlite3_bind_blob")
    _sq_bind_null = <_f_bind_null>dlsym(lib, "sqlite3_bind_null")
    _sq_step = <_f_stmt>dlsym(lib, "sqlite3_step")
    _sq_reset = <_f_stmt>dlsym(lib, "sqlite3_reset")
    _sq_clear_bindings = <_f_stmt>dlsym(lib, "sqlite3_clear_bindings")
    _sq_bind_parameter_count = <_f_stmt>dlsym(lib, "sqlite3_bind_parameter_count")
    _sq_finalize = <_f_stmt>dlsym(lib, "sqlite3_finalize")
    _sq_get_autocommit = <_f_db>dlsym(lib, "sqlite3_get_autocommit")
    _sq_errmsg = <_f_errmsg>dlsym(lib, "sqlite3_errmsg")
    _sq_busy_timeout = <_f_busy>dlsym(lib, "sqlite3_busy_timeout")
    _sq_version = <_f_version>dlsym(lib, "sqlite3_libversion_number")
    _sq_column_text = <_f_column_text>dlsym(lib, "sqlite3_column_text")
    if (_sq_open == NULL or _sq_close == NULL or _sq_exec == NULL or _sq_prepare == NULL
            or _sq_bind_int64 == NULL or _sq_bind_text == NULL or _sq_bind_blob == NULL
            or _sq_bind_null == NULL or _sq_step == NULL or _sq_reset == NULL
            or _sq_clear_bindings == NULL or _sq_bind_parameter_count == NULL
            or _sq_finalize == NULL or _sq_get_autocommit == NULL or _sq_errmsg == NULL
            or _sq_busy_timeout == NULL or _sq_version == NULL or _sq_column_text == NULL):
        return False
    major, minor, patch = sqlite3.sqlite_version_info
    if _sq_version() != major * 1_000_000 + minor * 1_000 + patch:
        return False
    _sq_state = 1
    return True


cdef struct _Val:
    int kind  # 0 NULL, 1 integer, 2 text, 3 blob
    long long i  # the integer; for text and blob, the offset of the bytes in the call's buffer
    Py_ssize_t n


cdef struct _Buf:
    char *p
    size_t n
    size_t cap


cdef int _append(_Buf *b, const char *p, Py_ssize_t n) except -1:
    cdef size_t cap
    cdef char *grown
    if b.n + <size_t>n > b.cap:
        cap = b.cap * 2 if b.cap else 4096
        while cap < b.n + <size_t>n:
            cap *= 2
        grown = <char *>realloc(b.p, cap)
        if grown == NULL:
            raise MemoryError()
        b.p = grown
        b.cap = cap
    if n:
        memcpy(b.p + b.n, p, n)
    b.n += n
    return 0


cdef int _fill(_Val *v, object x, _Buf *b) except -1:
    """Copy one value: integers into `v`, the bytes of text and blobs into `b` (at offset v.i)."""
    cdef int overflow = 0
    cdef Py_ssize_t n = 0
    cdef const char *p = NULL
    v.n = 0
    if x is None:
        v.kind = 0
        return 0
    elif isinstance(x, int):
        v.kind = 1
        v.i = PyLong_AsLongLongAndOverflow(x, &overflow)
        if overflow:
            raise OverflowError("ledger: integer does not fit 64 bits")
        return 0
    elif isinstance(x, str):
        v.kind = 2
        p = PyUnicode_AsUTF8AndSize(x, &n)
    elif isinstance(x, bytearray):
        v.kind = 3
        p = PyByteArray_AS_STRING(x)
        n = PyByteArray_GET_SIZE(x)
    elif isinstance(x, bytes):
        v.kind = 3
        p = PyBytes_AS_STRING(x)
        n = PyBytes_GET_SIZE(x)
    else:
        raise TypeError(f"ledger: cannot bind a {type(x).__name__}")
    if n > 0x7FFFFFFF:
        raise OverflowError("ledger: value too long to bind")
    v.i = <long long>b.n
    v.n = n
    _append(b, p, n)
    return 0


cdef class SqliteBatchWriter:
    """One SQLite connection that writes whole batches with the GIL released (see above). `inserts`:
    the INSERT statement of each table, one row of parameters each; `write` takes (statement
    number, rows) pairs and commits them in ONE transaction, or raises (nothing of it visible).

    Single-threaded: one call at a time. A call made while another is under way (another thread's
    `write` in its commit, or one re-entered from a row iterator) raises RuntimeError and does
    nothing. After a ROLLBACK that SQLite could not complete the writer is broken: every later call
    raises (close it and open another)."""

    cdef void *_db
    cdef void **_stmts
    cdef int *_ncols
    #: Nanoseconds spent with the GIL released (BEGIN .. COMMIT), summed over every batch: with the
    #: time around `write`, it tells storage work from waiting for the GIL (bench/ledger.py).
    cdef public long long released_ns
    cdef int _nstmts
    cdef bint _busy
    cdef bint _broken
    cdef readonly str path

    def __cinit__(self):
        self._db = NULL
        self._stmts = NULL
        self._ncols = NULL
        self._nstmts = 0
        self._busy = False
        self._broken = False

    def __init__(self, str path, int busy_timeout_ms, inserts, pragmas=()):
        if not sqlite_batch_writes():
            raise RuntimeError("ledger: SQLite batch writes are unavailable (the sqlite3 module's "
                               "libsqlite3 was not found through _sqlite3, or its version differs)")
        if self._db != NULL or self._busy:
            raise RuntimeError("ledger: batch writer already open")
        import os
        self.path = os.path.abspath(path)  # the file is the same whatever the cwd is later
        cdef bytes bpath = self.path.encode()
        cdef int rc = _sq_open(bpath, &self._db, _SQLITE_OPEN_READWRITE, NULL)
        if rc != _SQLITE_OK:
            msg = self._error()
            self._close()
            raise RuntimeError(f"cannot open {self.path}: {msg}")
        _sq_busy_timeout(self._db, busy_timeout_ms)
        for pragma in pragmas:
            self.execute(pragma)
        inserts = list(inserts)
        self._stmts = <void **>malloc((len(inserts) + 1) * sizeof(void *))
        self._ncols = <int *>malloc((len(inserts) + 1) * sizeof(int))
        if self._stmts == NULL or self._ncols == NULL:
            self._close()
            raise MemoryError()
        cdef bytes bsql
        cdef int nparams
        for sql in inserts:
            bsql = sql.encode()
            self._stmts[self._nstmts] = NULL
            rc = _sq_prepare(self._db, bsql, <int>len(bsql), &self._stmts[self._nstmts], NULL)
            if rc != _SQLITE_OK or self._stmts[self._nstmts] == NULL:
                msg = self._error() if rc != _SQLITE_OK else "no statement"
                self._close()
                raise RuntimeError(f"cannot prepare {sql!r}: {msg}")
            nparams = _sq_bind_parameter_count(self._stmts[self._nstmts])
            self._nstmts += 1
            if nparams != sql.count("?"):
                self._close()
                raise RuntimeError(f"{sql!r}: SQLite counts {nparams} parameters, not {sql.count('?')}")
            self._ncols[self._nstmts - 1] = nparams

    cdef str _error(self):
        if self._db == NULL:
            return "out of memory"
        return (<bytes>_sq_errmsg(self._db)).decode("utf-8", "replace")

    cdef int _usable(self) except -1:
        if self._busy:
            raise RuntimeError("ledger: batch writer in use by another call (single-threaded)")
        if self._db == NULL:
            raise RuntimeError("ledger: batch writer is closed")
        if self._broken:
            raise RuntimeError("ledger: batch writer is broken (a rollback failed); reopen it")
        return 0

    def execute(self, str sql):
        """Run statements that return nothing of interest (PRAGMAs), with the GIL held."""
        self._usable()
        cdef bytes bsql = sql.encode()
        if _sq_exec(self._db, bsql, NULL, NULL, NULL) != _SQLITE_OK:
            raise RuntimeError(f"{sql}: {self._error()}")

    def pragma(self, str name):
        """The value of `PRAGMA name` on this connection (first column of its first row) as text,
        or None when it returns no row: e.g. pragma("journal_mode") == "wal"."""
        self._usable()
        if not name.replace(".", "_").isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        cdef bytes bsql = f"PRAGMA {name}".encode()
        cdef void *stmt = NULL
        cdef const unsigned char *text
        cdef int rc
        if _sq_prepare(self._db, bsql, <int>len(bsql), &stmt, NULL) != _SQLITE_OK:
            raise RuntimeError(f"PRAGMA {name}: {self._error()}")
        try:
            rc = _sq_step(stmt)
            if rc == _SQLITE_DONE:
                return None
            if rc != _SQLITE_ROW:
                raise RuntimeError(f"PRAGMA {name}: {self._error()}")
            text = _sq_column_text(stmt, 0)
            return None if text == NULL else (<bytes>text).decode("utf-8", "replace")
        finally:
            _sq_finalize(stmt)

    def write(self, list tables):
        """Insert every (statement number, rows) of `tables` in ONE transaction with the GIL
        released; raises RuntimeError with SQLite's message if anything failed (rolled back), and
        ValueError/TypeError/OverflowError for rows it cannot bind (nothing written)."""
        self._usable()
        cdef _Val *vals = NULL
        cdef int *plan = NULL
        cdef _Buf buf
        buf.p = NULL
        buf.n = 0
        buf.cap = 0
        cdef tuple snapshot
        cdef Py_ssize_t total = 0, k = 0, r, c, ncols, seen
        cdef int which
        cdef tuple row
        cdef int nplan = 0, rc = _SQLITE_OK, t, nrows, col, rcode, i
        cdef void *stmt
        cdef char err[_ERR_LEN]
        cdef timespec t0, t1
        cdef _Val *v
        cdef bint rolled_back = True
        err[0] = 0
        self._busy = True  # under the GIL, and no Python ran since the check: one call at a time
        try:
            snapshot = tuple(tables)  # the pairs themselves cannot change between the two passes
            for which, rows in snapshot:
                if which < 0 or which >= self._nstmts:
                    raise ValueError(f"no statement {which}")
                total += len(rows) * <Py_ssize_t>self._ncols[which]
            vals = <_Val *>malloc((total + 1) * sizeof(_Val))
            plan = <int *>malloc((2 * len(snapshot) + 1) * sizeof(int))  # (statement, rows) pairs
            if vals == NULL or plan == NULL:
                raise MemoryError()
            for which, rows in snapshot:
                ncols = self._ncols[which]
                seen = 0
                for row in rows:
                    if len(row) != ncols:
                        raise ValueError(f"a row of {len(row)} values for {ncols} columns")
                    if k + ncols > total:
                        raise ValueError("ledger: the rows changed while being copied (more than counted)")
                    for c in range(ncols):
                        _fill(&vals[k], row[c], &buf)
                        k += 1
                    seen += 1
                if seen > 0x7FFFFFFF:
                    raise OverflowError("ledger: too many rows")
                plan[2 * nplan] = which
                plan[2 * nplan + 1] = <int>seen
                nplan += 1
            if k != total:
                raise ValueError("ledger: the rows changed while being copied (fewer than counted)")
            with nogil:
                clock_gettime(CLOCK_MONOTONIC, &t0)
                rc = _sq_exec(self._db, "BEGIN", NULL, NULL, NULL)
                v = vals
                t = 0
                while rc == _SQLITE_OK and t < nplan:
                    stmt = self._stmts[plan[2 * t]]
                    nrows = plan[2 * t + 1]
                    r = 0
                    while rc == _SQLITE_OK and r < nrows:
                        col = 1
                        while rc == _SQLITE_OK and col <= self._ncols[plan[2 * t]]:
                            # Text and blobs point into `buf` (SQLITE_STATIC): it outlives the
                            # bindings, which are cleared below before it is freed.
                            if v.kind == 1:
                                rc = _sq_bind_int64(stmt, col, v.i)
                            elif v.kind == 2:
                                rc = _sq_bind_text(stmt, col, buf.p + v.i, <int>v.n, NULL)
                            elif v.kind == 3:
                                rc = _sq_bind_blob(stmt, col, buf.p + v.i, <int>v.n, NULL)
                            else:
                                rc = _sq_bind_null(stmt, col)
                            v += 1
                            col += 1
                        if rc == _SQLITE_OK:
                            rcode = _sq_step(stmt)
                            if rcode != _SQLITE_DONE:
                                rc = rcode if rcode != _SQLITE_OK else 1
                        if rc != _SQLITE_OK:
                            strncpy(err, _sq_errmsg(self._db), _ERR_LEN - 1)
                            err[_ERR_LEN - 1] = 0
                        _sq_reset(stmt)
                        r += 1
                    t += 1
                if rc == _SQLITE_OK:
                    rc = _sq_exec(self._db, "COMMIT", NULL, NULL, NULL)
                    if rc != _SQLITE_OK:
                        strncpy(err, _sq_errmsg(self._db), _ERR_LEN - 1)
                        err[_ERR_LEN - 1] = 0
                elif err[0] == 0:
                    strncpy(err, _sq_errmsg(self._db), _ERR_LEN - 1)
                    err[_ERR_LEN - 1] = 0
                if rc != _SQLITE_OK:
                    _sq_exec(self._db, "ROLLBACK", NULL, NULL, NULL)  # fails harmlessly if none open
                    rolled_back = _sq_get_autocommit(self._db) != 0
                for i in range(self._nstmts):
                    _sq_clear_bindings(self._stmts[i])
                clock_gettime(CLOCK_MONOTONIC, &t1)
            self.released_ns += (t1.tv_sec - t0.tv_sec) * 1_000_000_000 + (t1.tv_nsec - t0.tv_nsec)
        finally:
            free(vals)
            free(plan)
            free(buf.p)
            self._busy = False
        if not rolled_back:
            self._broken = True
            raise RuntimeError(f"SQLite error {rc}: {(<bytes>err).decode('utf-8', 'replace')}; "
                               "the rollback did not end the transaction (batch writer broken)")
        if rc != _SQLITE_OK:
            raise RuntimeError(f"SQLite error {rc}: {(<bytes>err).decode('utf-8', 'replace')}")

    def close(self):
        if self._busy:
            raise RuntimeError("ledger: batch writer in use by another call (single-threaded)")
        self._close()

    cdef void _close(self) noexcept:
        cdef int i
        if self._stmts != NULL:
            for i in range(self._nstmts):
                if self._stmts[i] != NULL:
                    _sq_finalize(self._stmts[i])
            free(self._stmts)
            self._stmts = NULL
            self._nstmts = 0
        if self._ncols != NULL:
            free(self._ncols)
            self._ncols = NULL
        if self._db != NULL:
            _sq_close(self._db)
            self._db = NULL

    def __dealloc__(self):
        if not self._busy:  # a call under way holds a reference: never the case, but never free it
            self._close()
