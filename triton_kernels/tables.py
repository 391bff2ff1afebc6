"""Device tables for the multi-tensor Triton kernels (unscale_, adam_step_), cached between calls.

A bucket's table is one int64 buffer: per non-empty tensor a row [address of each list's tensor..., numel,
original index], then per program a pair [row, chunk]. The kernel reads its tensors' addresses from its row, so one
launch covers every tensor of the bucket. Tables are cached by what they hold (device, every address, every numel),
so a steady-state training step does no host-to-device copy at all: it stays free of host syncs and can be captured
in a CUDA graph once one warm-up call has built the table.

Capture therefore needs the very tensors of the warm-up call: grads kept in place (zero_grad(set_to_none=False),
the usual whole-step capture recipe of torch.cuda.graphs allocates new grads inside the capture instead) and no
per-step temporaries (grads of another dtype than their param, non-contiguous grads). Otherwise the table misses
and the call raises; the CUDA backend (what "auto" picks when the extension is built) passes addresses as kernel
parameters and has no such limit. A table is written on the stream current at its first call; a later call on
another stream reads it after whatever ordering the caller gives that stream against the first one (the same
ordering its in-place update of those tensors needs). Every other stream that reads a table is recorded on its
buffer (Tensor.record_stream, once per stream), so that evicting the table never hands its memory to a new
allocation while a kernel on that stream may still read it.
"""

import collections

import torch

TABLE_CACHE_SIZE = 256  # recent buckets whose device tables are kept (one per dtype bucket of each param group)
# and at most this many bytes of them, or 8x the largest table if more: with zero_grad(set_to_none=True) the grads
# are new tensors each step, and where the allocator does not hand back the same addresses, every step made one
# more table for the same bucket (16 bytes per program: ~1.7 MB for 7e9 at unscale_'s 65536 elements a program;
# AdamW's 1024 a program is capped at 2**20 programs, 16 MB, by raising its chunk past ~1e9 elements), up to
# TABLE_CACHE_SIZE of them. A budget in bytes, not per bucket size: the buckets of identical layers (a param group
# per layer) are alike in size but all live, and must all stay.
TABLE_CACHE_BYTES = 64 << 20
# key -> ((rows, prog_map, n_programs), the chunk the table was built with); least recently used first
_tables = collections.OrderedDict()
_nbytes = {}  # key -> its buffer's bytes
_readers = {}  # key -> the CUDA streams recorded on the table's buffer (its creation stream included)
_captured = set()  # keys whose tables a captured CUDA graph reads: never evicted (the graph keeps their addresses)


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


def get_tables(lists, device, chunk, op):
    """(rows, prog_map, n_programs) for parallel `lists` of tensors (lists[0][i], lists[1][i], ... share numel),
    each program covering `chunk` elements of one tensor. Rows are len(lists) + 2 int64 wide."""
    return get_tables_capped(lists, device, chunk, op, None)[0]


def get_tables_capped(lists, device, chunk, op, max_programs):
    """((rows, prog_map, n_programs), chunk used): as get_tables, but where `chunk` would make more than
    `max_programs` programs (None: no cap), each program covers chunk * 2**k elements, the smallest such that they
    do not. Decided when the table is built (from the numels, which the cache key reads anyway) and kept with it:
    a hit costs nothing more. The launcher passes the chunk used to its kernel."""
    # (map over the unbound methods: the sweeps run in C, ~2x faster than generator expressions over 10,000 tensors)
    ptrs = tuple(tuple(map(_data_ptr, lst)) for lst in lists)
    numels = tuple(map(_numel, lists[0]))
    key = (op, device, chunk, ptrs, numels)
    capturing = _capturing(device)
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        if capturing:
            _captured.add(key)
        if device.type == "cuda":
            _note_reader(key, hit[0][0])
        return hit
    if capturing:
        raise RuntimeError(f"mixprec_ops {op} (triton): a new set of tensors while a CUDA graph is being captured; "
                           "run one call with the same tensors before capturing (it builds the device table that "
                           "the captured kernel reads): keep grads in place (zero_grad(set_to_none=False)), or use "
                           "backend='cuda', which needs no table")
    used = chunk
    if max_programs is not None:
        total = sum(numels)
        while total > used * max_programs:  # (programs <= total / used + tensors: a bound, near enough)
            used *= 2
    host, off, n_programs = _build(ptrs, numels, used)
    buf = host.pin_memory().to(device, non_blocking=True) if device.type != "cpu" else host
    entry = (buf[:off], buf[off:], n_programs)
    _tables[key] = (entry, used)
    if device.type == "cuda":
        _readers[key] = {torch.cuda.current_stream(device)}  # the allocator already orders its own stream
    _nbytes[key] = buf.numel() * buf.element_size()
    total = sum(_nbytes.values())
    limit = max(TABLE_CACHE_BYTES, 8 * max(_nbytes.values())) + sum(_nbytes[k] for k in _captured)
    while len(_tables) > TABLE_CACHE_SIZE + len(_captured) or total > limit:
        old = next((k for k in _tables if k not in _captured and k != key), None)
        if old is None:
            break
        del _tables[old]
        _readers.pop(old, None)
        total -= _nbytes.pop(old)
    return entry, used


def _build(ptrs, numels, chunk):
    """(host int64 buffer, offset of the program map, programs): the rows of the non-empty tensors, padded to an
    even length (the map starts 16-byte aligned), then the (row, chunk) pairs, made with tensor ops on the whole
    lists. (A Python loop over the tensors took ~5 us each, 10 ms at 2,000 grads: every step where
    zero_grad(set_to_none=True) gave the grads new addresses.)"""
    on = {"dtype": torch.int64, "device": "cpu"}  # (host tensors whatever the default device)
    numel = torch.tensor(numels, **on)
    idx = torch.nonzero(numel).squeeze(1)  # the non-empty tensors, in order
    kept = numel[idx]
    rows = torch.stack([*(torch.tensor(p, **on)[idx] for p in ptrs), kept, idx], dim=1).flatten()
    per = (kept + (chunk - 1)).div(chunk, rounding_mode="floor")  # programs of each row
    row_of = torch.repeat_interleave(torch.arange(idx.numel(), **on), per)
    chunk_of = torch.arange(row_of.numel(), **on) - torch.repeat_interleave(per.cumsum(0) - per, per)
    pad = rows.new_zeros(rows.numel() % 2)
    host = torch.cat([rows, pad, torch.stack([row_of, chunk_of], dim=1).flatten()])
    return host, rows.numel() + pad.numel(), row_of.numel()


def _note_reader(key, rows):
    """Record the current stream on the table's buffer the first time that stream reads it (rows is a view of the
    buffer: record_stream marks the whole block). One current_stream lookup per call; record_stream only for a
    stream new to this table, which a steady training loop never is."""
    stream = torch.cuda.current_stream(rows.device)
    seen = _readers.setdefault(key, set())
    if stream not in seen:
        rows.record_stream(stream)
        seen.add(stream)


def clear_table_cache():
    """Drop the cached tables (also those of captured graphs: only when no such graph will be replayed)."""
    _tables.clear()
    _captured.clear()
    _readers.clear()
    _nbytes.clear()
