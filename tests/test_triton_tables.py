"""The device tables of the Triton multi-tensor kernels (mixprec_ops.triton_kernels.tables): their contents, the
cache that keeps them between calls (hits, LRU eviction, captured tables kept), and on a GPU the streams recorded on
a table's buffer. The kernels that read them are tested against the reference in test_unscale.py and test_adam.py;
these tests pin what a wrong cache would break silently (a stale row, a table freed under a running kernel)."""

import pytest
import torch
from conftest import HAS_CUDA

tables = pytest.importorskip("mixprec_ops.triton_kernels.tables", reason="triton is not importable",
                             exc_type=ImportError)


@pytest.fixture(autouse=True)
def fresh_cache():
    tables.clear_table_cache()
    yield
    tables.clear_table_cache()


def test_rows_and_program_map():
    """One row per non-empty tensor, [address of each list's tensor..., numel, original index]; then one
    (row, chunk) pair per program, covering every chunk of every tensor once; the map starts at an even offset."""
    a = [torch.randn(n) for n in (5, 0, 9, 4)]
    b = [torch.randn(n) for n in (5, 0, 9, 4)]
    rows, prog, n = tables.get_tables([a, b], torch.device("cpu"), 4, "test")
    want_rows = [[x.data_ptr(), y.data_ptr(), x.numel(), i] for i, (x, y) in enumerate(zip(a, b)) if x.numel()]
    assert rows[: 4 * len(want_rows)].view(-1, 4).tolist() == want_rows
    assert rows.numel() % 2 == 0 and rows.numel() >= 4 * len(want_rows)
    want_prog = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)]  # numels 5, 9, 4 in chunks of 4
    assert n == len(want_prog) and prog.view(-1, 2).tolist() == [list(p) for p in want_prog]
    rows1, prog1, n1 = tables.get_tables([a], torch.device("cpu"), 8, "test")  # 3 rows of 3: padded to 10
    assert rows1.numel() == 10 and rows1[:9].view(3, 3)[:, 1:].tolist() == [[5, 0], [9, 2], [4, 3]]
    assert n1 == 4 and prog1.view(-1, 2).tolist() == [[0, 0], [1, 0], [1, 1], [2, 0]]


def _tables_by_loop(lists, chunk):
    """The tables as the first version built them, one tensor at a time (the oracle of the vectorized builder)."""
    rows, prog = [], []
    for i in range(len(lists[0])):
        numel = lists[0][i].numel()
        if numel:
            rows.append([lst[i].data_ptr() for lst in lists] + [numel, i])
            prog += [(len(rows) - 1, c) for c in range(-(-numel // chunk))]
    flat = [x for r in rows for x in r]
    return flat + [0] * (len(flat) % 2), [x for p in prog for x in p], len(prog)


@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_tables_match_a_per_tensor_loop(depth, chunk):
    """Random sizes (empty ones, ones spanning many chunks, exact multiples), in 1, 2 and 5 parallel lists; an
    empty list of tensors and a list of only empty tensors."""
    g = torch.Generator().manual_seed(depth * 100 + chunk)
    for count in (0, 1, 3, 57):
        sizes = torch.randint(0, 200, (count,), generator=g).tolist()
        sizes = [0 if k % 5 == 1 else (3 * chunk if k % 7 == 2 else n) for k, n in enumerate(sizes)]
        lists = [[torch.empty(n) for n in sizes] for _ in range(depth)]
        rows, prog, n = tables.get_tables(lists, torch.device("cpu"), chunk, "test")
        want_rows, want_prog, want_n = _tables_by_loop(lists, chunk)
        assert rows.dtype == prog.dtype == torch.int64
        assert (rows.tolist(), prog.tolist(), n) == (want_rows, want_prog, want_n)
    empties = [[torch.empty(0), torch.empty(0)]]
    assert [x.tolist() for x in tables.get_tables(empties, torch.device("cpu"), chunk, "test")[:2]] == [[], []]
    # built on the host under another default device (torch.set_default_device; on a GPU the table was made
    # there and then failed to pin)
    lists = [[torch.empty(n) for n in (3, 0, 2 * chunk + 1)] for _ in range(depth)]
    tables.clear_table_cache()
    with torch.device("meta"):
        rows, prog, n = tables.get_tables(lists, torch.device("cpu"), chunk, "test")
    assert rows.device.type == "cpu" and (rows.tolist(), prog.tolist(), n) == _tables_by_loop(lists, chunk)


def test_cache_hits_misses_and_eviction(monkeypatch):
    """The same tensors (addresses and sizes) hit: the very same buffers, nothing rebuilt. Another address, another
    numel at the same address, or another op miss. Beyond TABLE_CACHE_SIZE the least recently used goes first."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(tables, "TABLE_CACHE_SIZE", 2)
    x, y, z = torch.randn(8), torch.randn(8), torch.randn(8)
    first = tables.get_tables([[x]], cpu, 4, "op")
    assert tables.get_tables([[x]], cpu, 4, "op") is first
    assert tables.get_tables([[x[:4]]], cpu, 4, "op") is not first  # same address, another numel
    assert tables.get_tables([[x]], cpu, 4, "other") is not first
    tables.clear_table_cache()
    tx = tables.get_tables([[x]], cpu, 4, "op")
    ty = tables.get_tables([[y]], cpu, 4, "op")
    assert tables.get_tables([[x]], cpu, 4, "op") is tx  # x is now the most recently used
    tables.get_tables([[z]], cpu, 4, "op")  # evicts y's, the least recently used
    assert tables.get_tables([[x]], cpu, 4, "op") is tx
    assert tables.get_tables([[y]], cpu, 4, "op") is not ty


def test_new_addresses_each_step_stay_within_the_byte_budget(monkeypatch):
    """zero_grad(set_to_none=True) gives new grads every step; where their addresses differ each step, each call
    built one more table of the same bucket, kept up to TABLE_CACHE_SIZE (256). The cached tables now stay within
    TABLE_CACHE_BYTES (or 8x the largest table), least recently used out first; the newest still hit."""
    cpu = torch.device("cpu")
    tables.clear_table_cache()
    monkeypatch.setattr(tables, "TABLE_CACHE_BYTES", 1000)
    made = []
    for _ in range(40):
        grads = [torch.randn(8), torch.randn(5)]  # the same numels at new addresses
        made.append((grads, tables.get_tables([grads], cpu, 4, "op")))
    size = tables._nbytes[next(iter(tables._tables))]
    assert len(tables._tables) == 1000 // size < 40 and sum(tables._nbytes.values()) <= 1000
    for grads, entry in made[-3:]:
        assert tables.get_tables([grads], cpu, 4, "op") is entry
    tables.clear_table_cache()


def test_identical_buckets_at_stable_addresses_all_stay():
    """Buckets alike in size (a param group per identical layer) are all live: with grads kept in place every step
    hits, none is rebuilt (a per-size cap evicted them in turn, every step, and broke CUDA graph capture)."""
    cpu = torch.device("cpu")
    tables.clear_table_cache()
    buckets = [[torch.randn(8), torch.randn(5)] for _ in range(12)]
    first = [tables.get_tables([b], cpu, 4, "op") for b in buckets]
    for _ in range(3):
        assert all(tables.get_tables([b], cpu, 4, "op") is t for b, t in zip(buckets, first, strict=True))
    tables.clear_table_cache()


def test_tables_read_by_a_captured_graph_are_never_evicted(monkeypatch):
    """A table hit while a CUDA graph is captured is read by every replay: eviction skips it, whatever else comes.
    (The capture is simulated: tables._capturing is what get_tables asks.)"""
    cpu = torch.device("cpu")
    monkeypatch.setattr(tables, "TABLE_CACHE_SIZE", 1)
    x = torch.randn(8)
    kept = tables.get_tables([[x]], cpu, 4, "op")
    monkeypatch.setattr(tables, "_capturing", lambda device: True)
    assert tables.get_tables([[x]], cpu, 4, "op") is kept
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
        tables.get_tables([[torch.randn(8)]], cpu, 4, "op")
    monkeypatch.setattr(tables, "_capturing", lambda device: False)
    others = [torch.randn(8) for _ in range(3)]
    for t in others:
        tables.get_tables([[t]], cpu, 4, "op")
    assert tables.get_tables([[x]], cpu, 4, "op") is kept


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (runs in bench/gpu_check)")
def test_cuda_table_read_on_another_stream_is_not_overwritten_before_that_stream_is_done():
    """A table built on the default stream, then read by a kernel on a side stream that is still busy (a spin
    before it), then evicted: new allocations on the default stream, written at once, must not change what the side
    stream reads. Without the reader's record_stream the caching allocator hands the freed block straight to the
    next allocation of its size on the default stream, whose write runs while the side stream still spins.
    (What is checked is the data the reader sees, not the addresses: on the H200 of 2026-11-30, torch 2.11, the
    evicted table's address came back to the next allocation, which a stream-ordered allocator may do safely, since
    it orders that memory's reuse after the recorded streams.)"""
    dev = torch.device("cuda")
    x = [torch.randn(1000, device=dev) for _ in range(3)]
    rows, _, _ = tables.get_tables([x], dev, 256, "op")
    expected = rows.cpu()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of ms: still running when the cache is cleared below
        hit, _, _ = tables.get_tables([x], dev, 256, "op")
        assert hit is rows
        seen = hit.clone()  # the side stream's read of the table, after the spin
    nbytes = rows.untyped_storage().nbytes()
    del rows, hit
    tables.clear_table_cache()
    taken = [torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(0xA5) for _ in range(4)]
    torch.cuda.synchronize()
    assert torch.equal(seen.cpu(), expected), "a new allocation overwrote the table while a stream still read it"
    assert all(bool((t == 0xA5).all()) for t in taken)
