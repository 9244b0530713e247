"""Pallas Mosaic GPU (Hopper: wgmma + TMA) kernel bodies of the chunked Mamba-2 SSD scan.

Kernel bodies only; `ops_mgpu.py` owns shapes, grids, padding and the `custom_vjp`. The math and
notation are those of `kernel.py` (the Triton kernels) and `reference.py`: per (batch b, chunk c, head m),
chunk positions l, s in [0, L):

  cum_l     = sum_{i <= l} a_i,  a = dt A                     chunk-local cumsum
  W_ls      = [s <= l][doc_l == doc_s] exp(cum_l - cum_s)     decay mask
  S         = C B^T                                           [L, L]
  y_l       = sum_s (S o W)_ls dt_s x_s + e_l C_l . h_in + D x_l
  e_l       = exp(cum_l) [doc_l == doc of the previous chunk's last token]   (carry)
  w_s       = W_{L-1,s}                                       (decay to the chunk end)
  state     = sum_s w_s dt_s x_s B_s^T                        chunk-end state [P, Q]
  h_in[c+1] = g_c h_in[c] + state[c],  g_c = e_{L-1}(c)       state passing

What changes from the Triton kernels is how a program reaches the tensor cores: each program is one
warpgroup; its tiles (x, B, C, states) are loaded by TMA into swizzled shared memory, every product is
a `wgmma` on shared-memory operands (transposed views where the math needs A^T or B^T), and operands the
kernel computes (decay-scaled x or scores) are staged back into shared memory in the input dtype
(`_mgpu.stage`), as mamba_ssm feeds bf16 operands to its products. Accumulation is f32. Three habits
run through the kernels:
  * heads of one B/C group share a program where they share work (the group's B / C tile, C B^T, the
    sum of their dB / dC); their own tiles stream through `emit_pipeline`, one head ahead;
  * [L, L] work runs in 64-row blocks of the chunk (a warpgroup's wgmma M), and only left of the
    diagonal, where W is nonzero. Its elementwise part (decay, masks, the scores' scaling) runs in
    64-column pieces: [64, 64] f32 tiles, 32 registers per thread each, staged piece by piece into the
    shared-memory operand of the block's product; only the diagonal piece is masked. Compiled for an
    H100 (`benchmarks/kernel_resources.py`), only scan_bwd_dx spills, 8 to 16 bytes per thread; with
    whole [64, L] tiles scan_bwd_dbc spilled 220 bytes and scan_bwd_dx 432;
  * a transposed tile the math needs ((S o W)^T, dS^T) is computed directly (B C^T o W^T, xs dy^T o W^T)
    and staged at its own width, so that every operand is a row range or a column prefix of a tile.

Refs (ops_mgpu.py lays them out; T, P, Q padded; `cp = c * P`):
  x, dy, y, dx   [B, T, M, P]   input dtype (bf16 / f16)
  b, c           [B, T, J, Q]   input dtype; head m reads group m // (M / J)
  dt, cum        [B, M, T]      f32 (processed dt; chunk-local cumsum of dt A)
  seg, carry     [B, T]         int32 document index / f32 carry mask (only with documents)
  d              [M]            f32
  states, h_in   [B, M, C P, Q] f32 or the input dtype (chunk c's [P, Q] tile at rows cp)
  g              [B, M, C]      f32 carry decay of each chunk

Backward: the gradients of the chunk scan are split over two kernels, because their operands do not
fit one program's shared memory (227 KB on an H100) at L = 128, P = 64, Q = 128:
  `scan_bwd_dbc_kernel`   dB, dC summed over a program's heads, and the per-token terms de_l e_l,
                          dw_s w_s of the decay gradient;
  `scan_bwd_dx_kernel`    dx, d dt, the D-skip terms and da, the gradient of a = dt A, summed directly
                          over the pairs that a_i separates (see `kernel.chunk_scan_bwd_kernel`):
    da_i = sum_{l >= i, s < i} (dS o S)_ls + sum_{l >= i} de_l e_l + sum_{s < i} dw_s w_s.
  The first sum is a row sum of T = U (dS o S) with U_il = [l >= i], masked to s < i: one wgmma with an
  exact 0/1 operand. dS o S is fed as two bf16/f16 terms (hi + lo, ~16 significant bits), so the sum
  keeps nearly f32 accuracy. The other two are row sums of masked [64, L] tiles in f32 (no scan).
"""

import functools

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import _mgpu

_F32 = jnp.float32
_NEG = -1e30  # exp(_NEG) == 0: masked decay entries, never inf * 0
_ROW_BLOCK = 64  # rows of L per wgmma (a warpgroup's M)


def _vec(src, smem, barrier, layout):
  """A [L] vector loaded by TMA into `smem`, then into registers as one value per row or column."""
  _mgpu.load(src, smem, barrier)
  return plgpu.load(smem, layout=layout)


def _decay(cum_r, cum_c, seg_r, seg_c, shape, row0=0, col0=0, transposed=False):
  """A [R, S] tile of W (rows l from row0, columns s from col0) or, `transposed`, of W^T (rows s, columns l).

  W_ls = [s <= l][same doc] exp(cum_l - cum_s), exactly 0 elsewhere; the vectors hold the tile's rows'
  and columns' values. A tile wholly below W's diagonal (every s < l) needs no causal mask, and none is
  computed: there cum_l - cum_s <= 0 (a = dt A <= 0).
  """
  max_s, min_l = (row0 + shape[0] - 1, col0) if transposed else (col0 + shape[1] - 1, row0)
  mask = None
  if max_s >= min_l:  # the tile reaches the diagonal
    rows, cols = row0 + _mgpu.iota(shape, 0), col0 + _mgpu.iota(shape, 1)
    mask = (rows <= cols) if transposed else (cols <= rows)
  if seg_r is not None:
    same_doc = _mgpu.rows(seg_r, shape) == _mgpu.cols(seg_c, shape)
    mask = same_doc if mask is None else mask & same_doc
  diff = _mgpu.rows(cum_r, shape) - _mgpu.cols(cum_c, shape)
  diff = -diff if transposed else diff
  return jnp.exp(diff) if mask is None else jnp.exp(jnp.where(mask, diff, _NEG))


def _chunk_end(cum_ref, seg_ref, b, m, t_last):
  """(cum, doc) of the chunk's last token: scalars read from global memory."""
  return cum_ref[b, m, t_last], (None if seg_ref is None else seg_ref[b, t_last])


def _to_end(cum, seg, cum_last, seg_last):
  """w_s = W_{L-1, s}: decay from token s to the chunk end, 0 across documents (<= 1)."""
  w = jnp.exp(cum_last - cum)
  return w if seg is None else jnp.where(seg == seg_last, w, 0.0)


def _from_start(cum, carry):
  """e_l: decay of the incoming state at l, 0 where a document cut it."""
  e = jnp.exp(cum)
  return e if carry is None else e * carry


def _load_docs(seg_ref, carry_ref, smems, barriers, first, *, b, tokens):
  """The chunk's document vectors (seg, seg again for column loads, carry) loaded by TMA into `smems`
  with barriers first .. first + 2 and returned; Nones without documents."""
  if seg_ref is None:
    return (None, None, None)
  for i, (src, smem) in enumerate(zip((seg_ref, seg_ref, carry_ref), smems)):
    plgpu.copy_gmem_to_smem(src.at[b, tokens], smem, barriers.at[first + i])
  for i in range(3):
    plgpu.barrier_wait(barriers.at[first + i])
  return tuple(smems)


def _split(rest, has_docs, num_outs):
  """(docs refs or Nones, outputs, scratch) of a kernel's trailing refs."""
  docs = rest[:2] if has_docs else (None, None)
  rest = rest[2:] if has_docs else rest
  return docs, rest[:num_outs], rest[num_outs:]


def chunk_state_kernel(lhs_ref, dt_ref, cum_ref, rhs_ref, *rest, mode, has_docs, group_size, heads,
                       max_concurrent_steps):
  """out[p, q] = sum_l lhs[l, p] coef_l rhs[l, q] for `heads` heads of one group in one chunk:
  grid ("b", "c", "hb").

  mode "state" (forward): lhs = x, rhs = B, coef_s = w_s dt_s -> the chunk-end state.
  mode "dout" (backward of the carried-state term): lhs = dy, rhs = C, coef_l = e_l -> d h_in.
  The group's rhs tile is loaded once; the heads' lhs tiles and vectors stream through `emit_pipeline`.
  The coefficient scales lhs in registers; the scaled tile is staged back in place and fed to the
  wgmma as its transposed A operand ([P, L] view of the [L, P] tile). Outputs leave through two
  staging tiles, each TMA store overlapping the next head's work.
  """
  (seg_ref, carry_ref), (out_ref,), scratch = _split(rest, has_docs, 1)
  rhs_smem, doc_smem, out_slots, barriers = scratch
  b, c, hb = lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("hb")
  chunk = rhs_smem.shape[0]
  headdim = out_slots.shape[1]
  t0 = c * chunk
  tokens = pl.ds(t0, chunk)
  head0 = hb * heads
  plgpu.copy_gmem_to_smem(rhs_ref.at[b, tokens, lax.div(head0, group_size)], rhs_smem, barriers.at[0])
  doc = None
  if has_docs:  # seg for "state", carry for "dout"
    doc = _vec((seg_ref if mode == "state" else carry_ref).at[b, tokens], doc_smem, barriers.at[1], _mgpu.ROWS)
  plgpu.barrier_wait(barriers.at[0])
  tile = (chunk, headdim)

  def step(idx, lhs_smem, cum_smem, dt_smem):
    (h,) = idx
    m = head0 + h
    cum = plgpu.load(cum_smem, layout=_mgpu.ROWS)
    if mode == "state":
      cum_last, seg_last = _chunk_end(cum_ref, seg_ref, b, m, t0 + chunk - 1)
      coef = _to_end(cum, doc, cum_last, seg_last) * plgpu.load(dt_smem, layout=_mgpu.ROWS)
    elif mode == "dout":
      coef = _from_start(cum, doc)
    else:
      raise ValueError(f"Unknown {mode=}")
    _mgpu.stage(lhs_smem[...].astype(_F32) * _mgpu.rows(coef, tile), lhs_smem)
    state = _mgpu.matmul(lhs_smem.transpose((1, 0)), rhs_smem, out_slots.shape[1:])  # [P, Q]
    _write_slots([(state, out_ref.at[b, m, pl.ds(c * headdim, headdim)])], (out_slots,), h)

  heads_slice = pl.ds(head0, heads)
  vec_spec = plgpu.BlockSpec((None, chunk), lambda h: (h, 0))
  plgpu.emit_pipeline(
      step, grid=(heads,),
      in_specs=[plgpu.BlockSpec((chunk, None, headdim), lambda h: (0, h, 0),
                                transforms=_mgpu.transforms(lhs_ref.dtype)), vec_spec, vec_spec],
      max_concurrent_steps=max_concurrent_steps,
  )(lhs_ref.at[b, tokens, heads_slice], cum_ref.at[b, heads_slice, tokens], dt_ref.at[b, heads_slice, tokens])
  plgpu.wait_smem_to_gmem(0)


def _write_slots(values_and_dsts, slot_smems, step):
  """Stores of one pipeline step through double-buffered shared memory (slot `step % 2`).

  Waits until the stores of two steps back have read their slot; the previous step's may still run.
  (Written by hand rather than as `emit_pipeline` out_specs: JAX's Mosaic GPU interpreter does not
  take those predicated copies, jax 0.12.)
  """
  slot = lax.rem(step, 2)
  plgpu.wait_smem_to_gmem(len(slot_smems), wait_read_only=True)
  for (value, dst), smem in zip(values_and_dsts, slot_smems):
    _mgpu.stage(value, smem.at[slot])
  for (_, dst), smem in zip(values_and_dsts, slot_smems):
    plgpu.copy_smem_to_gmem(smem.at[slot], dst)


def state_passing_kernel(states_ref, g_ref, h0_ref, *rest, nchunks, max_concurrent_steps):
  """Forward state passing for one (b, m) and one block of Q columns: grid ("b", "m", "q").

  h_in[c] = the state entering chunk c (written in each dtype of the `h_in` outputs); final = h_in[C].
  The recurrence is elementwise, so the [P, Q] state splits into column blocks: more programs to
  cover the SMs when B x M is small (one 64k-token row: 64 heads). h stays in registers.
  rest: h_in refs (one or two dtypes), final_ref, h_smem (f32 [P, Qb]), one [2, P, Qb] slot buffer per
  h_in output, barrier.
  """
  num_outs = (len(rest) - 2) // 2
  h_in_refs, (final_ref, h_smem), slot_smems, (barrier,) = (
      rest[:num_outs], rest[num_outs:num_outs + 2], rest[num_outs + 2:-1], rest[-1:])
  b, m, q = lax.axis_index("b"), lax.axis_index("m"), lax.axis_index("q")
  headdim, q_cols = h_smem.shape
  cols = pl.ds(q * q_cols, q_cols)
  _mgpu.load(h0_ref.at[b, m, :, cols], h_smem, barrier.at[0])
  h0 = plgpu.load(h_smem, layout=plgpu.Layout.WGMMA)

  def step(idx, state_smem, h):
    (c,) = idx
    rows = pl.ds(c * headdim, headdim)
    _write_slots([(h, r.at[b, m, rows, cols]) for r in h_in_refs], slot_smems, c)
    return g_ref[b, m, c] * h + state_smem[...]

  final = plgpu.emit_pipeline(
      step, grid=(nchunks,),
      in_specs=[plgpu.BlockSpec((headdim, q_cols), lambda c: (c, 0))],
      max_concurrent_steps=max_concurrent_steps, init_carry=h0,
  )(states_ref.at[b, m, :, cols])
  _mgpu.store(h_smem, final, final_ref.at[b, m, :, cols])
  plgpu.wait_smem_to_gmem(0)


def state_passing_bwd_kernel(dh_out_ref, g_ref, h_in_ref, dfinal_ref, dstates_ref, dg_ref, dh0_ref,
                             grad_smem, dstate_slots, dg_slots, barrier, *, nchunks, max_concurrent_steps):
  """Reverse state passing for one (b, m) and one block of Q columns: grid ("b", "m", "q").

  G_c = dL/dh_in[c] = dh_out[c] + g_c G_{c+1}, G_C = dfinal. Writes dstates[c] = G_{c+1} (in dstates'
  dtype: the products of the backward chunk scan read it), dg rows [B, M, Q / Qb, C P]: sum over these
  columns of G_{c+1} h_in[c] (summed over p and the column blocks to dg_c in jnp), and dh0 = G_0.
  """
  b, m, q = lax.axis_index("b"), lax.axis_index("m"), lax.axis_index("q")
  headdim, q_cols = grad_smem.shape
  cols = pl.ds(q * q_cols, q_cols)
  _mgpu.load(dfinal_ref.at[b, m, :, cols], grad_smem, barrier.at[0])
  dfinal = plgpu.load(grad_smem, layout=plgpu.Layout.WGMMA)

  def step(idx, dh_out_smem, h_in_smem, grad):
    (i,) = idx
    c = nchunks - 1 - i
    rows = pl.ds(c * headdim, headdim)
    dg = jnp.sum(grad * h_in_smem[...], axis=1)
    _write_slots([(grad, dstates_ref.at[b, m, rows, cols]), (dg, dg_ref.at[b, m, q, rows])],
                 (dstate_slots, dg_slots), i)
    return dh_out_smem[...] + g_ref[b, m, c] * grad

  tile = plgpu.BlockSpec((headdim, q_cols), lambda i: (nchunks - 1 - i, 0))
  dh0 = plgpu.emit_pipeline(
      step, grid=(nchunks,), in_specs=[tile, tile],
      max_concurrent_steps=max_concurrent_steps, init_carry=dfinal,
  )(dh_out_ref.at[b, m, :, cols], h_in_ref.at[b, m, :, cols])
  _mgpu.store(grad_smem, dh0, dh0_ref.at[b, m, :, cols])
  plgpu.wait_smem_to_gmem(0)


class _Chunk:
  """The per-(b, c, m) vectors of a chunk-scan program, loaded into shared memory by TMA; slices of them
  come into registers on demand, one value per row or per column of a tile.

  A vector used both per row and per column is loaded twice, into two shared-memory buffers: Mosaic
  GPU's layout inference gives each buffer's loads one layout (jax 0.12).
  """

  NUM_VECS = 6  # dt, cum (rows, cols), seg (rows, cols), carry

  def __init__(self, smems, cum_last, seg_last):
    """smems: dt, cum, cum (for columns), seg, seg (for columns), carry ([L] shared-memory vectors; the
    document ones None without documents)."""
    self._dt, self._cum, self._cum_c, self._seg, self._seg_c, self._carry = smems
    self.cum_last, self.seg_last = cum_last, seg_last

  @classmethod
  def load(cls, dt_ref, cum_ref, seg_ref, carry_ref, vec_smems, barriers, first, *, b, c, m, chunk):
    """Loads one head's vectors into vec_smems (dt, cum, cum: [L] f32; seg, seg: [L] int32; carry [L]
    f32) with barriers first .. first + 5."""
    t0 = c * chunk
    tokens = pl.ds(t0, chunk)
    for i, src in enumerate((dt_ref, cum_ref, cum_ref)):
      plgpu.copy_gmem_to_smem(src.at[b, m, tokens], vec_smems[i], barriers.at[first + i])
    docs = _load_docs(seg_ref, carry_ref, vec_smems[3:], barriers, first + 3, b=b, tokens=tokens)
    for i in range(3):
      plgpu.barrier_wait(barriers.at[first + i])
    return cls((*vec_smems[:3], *docs), *_chunk_end(cum_ref, seg_ref, b, m, t0 + chunk - 1))

  @staticmethod
  def _load(smem, start, size, layout):
    return None if smem is None else plgpu.load(smem.at[pl.ds(start, size)], layout=layout)

  def dt(self, start, size):  # per row
    return self._load(self._dt, start, size, _mgpu.ROWS)

  def decay(self, row0, num_rows, col0, num_cols, transposed=False):
    """W's tile (rows l from row0, columns s from col0), or W^T's (rows s, columns l)."""
    return _decay(self._load(self._cum, row0, num_rows, _mgpu.ROWS),
                  self._load(self._cum_c, col0, num_cols, _mgpu.COLS),
                  self._load(self._seg, row0, num_rows, _mgpu.ROWS),
                  self._load(self._seg_c, col0, num_cols, _mgpu.COLS),
                  (num_rows, num_cols), row0, col0, transposed)

  def to_end(self, start, size):  # w, per row
    return _to_end(self._load(self._cum, start, size, _mgpu.ROWS),
                   self._load(self._seg, start, size, _mgpu.ROWS), self.cum_last, self.seg_last)

  def from_start(self, start, size):  # e, per row
    return _from_start(self._load(self._cum, start, size, _mgpu.ROWS),
                       self._load(self._carry, start, size, _mgpu.ROWS))


def _load_tiles(pairs, barriers):
  """TMA copies of (src, smem) pairs, all in flight at once, then waited for."""
  for i, (src, smem) in enumerate(pairs):
    plgpu.copy_gmem_to_smem(src, smem, barriers.at[i])
  for i in range(len(pairs)):
    plgpu.barrier_wait(barriers.at[i])


def chunk_scan_fwd_kernel(x_ref, dt_ref, cum_ref, b_ref, c_ref, d_ref, h_ref, *rest, has_docs, group_size,
                          heads, max_concurrent_steps):
  """y of `heads` heads of one B/C group in one chunk: grid ("b", "c", "hb"), head block hb.

  S = C B^T is computed once per program and kept in shared memory (f32); the heads then stream
  through `emit_pipeline` (their x, h_in, dt and cum tiles loaded by TMA one head ahead):
    y = (S o W o dt_s) x  +  e o (C h_in^T)  +  D x
  with the scores staged in shared memory as the A operand of the second product and h_in (input
  dtype) read as the transposed B operand. Each head runs in 64-row blocks of the chunk: block r needs
  only the first 64 (r + 1) columns of S (W is lower-triangular), which skips a quarter of the [L, L]
  work at L = 128; its scores are scaled and staged in 64-column pieces. y leaves through one staging
  tile, its TMA store overlapping the next head's products.
  """
  (seg_ref, carry_ref), (y_ref,), scratch = _split(rest, has_docs, 1)
  c_smem, cb_smem, s_smem, y_smem, seg_r_smem, seg_c_smem, carry_smem, barriers = scratch
  b, c, hb = lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("hb")
  chunk = cb_smem.shape[0]
  headdim = y_smem.shape[1]
  dstate = c_smem.shape[1]
  t0 = c * chunk
  tokens = pl.ds(t0, chunk)
  head0 = hb * heads
  j = lax.div(head0, group_size)
  square = (chunk, chunk)
  plgpu.copy_gmem_to_smem(c_ref.at[b, tokens, j], c_smem, barriers.at[0])
  docs = _load_docs(seg_ref, carry_ref, (seg_r_smem, seg_c_smem, carry_smem), barriers, 1, b=b, tokens=tokens)
  plgpu.barrier_wait(barriers.at[0])

  @functools.partial(pl.run_scoped, b_smem=_mgpu.swizzled((chunk, dstate), c_smem.dtype))
  def _(b_smem):  # B's tile only lives while S is computed
    _mgpu.load(b_ref.at[b, tokens, j], b_smem, barriers.at[4])
    cb_smem[...] = _mgpu.matmul(c_smem, b_smem.transpose((1, 0)), square)        # S [L, S] f32

  def step(idx, x_smem, h_smem, dt_smem, cum_r_smem, cum_c_smem):
    (h,) = idx
    m = head0 + h
    # dt is read per column here (through its own buffer); w, the chunk-end decay, is not needed.
    v = _Chunk((None, cum_r_smem, cum_c_smem, *docs), None, None)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous head's y has left y_smem
    rb = _ROW_BLOCK
    for _, r0 in _row_blocks(chunk):  # 64-row blocks: only the S columns at or left of the diagonal
      rows, cols = pl.ds(r0, rb), pl.ds(0, r0 + rb)
      tile = (rb, headdim)
      for s0 in _pieces(0, r0 + rb):  # scores (S o W o dt_s), staged piece by piece
        piece = pl.ds(s0, rb)
        scores = (plgpu.load(cb_smem.at[rows, piece], layout=plgpu.Layout.WGMMA) * v.decay(r0, rb, s0, rb)
                  * _mgpu.cols(plgpu.load(dt_smem.at[piece], layout=_mgpu.COLS), (rb, rb)))
        _mgpu.stage(scores, s_smem.at[rows, piece])
      y = _mgpu.matmul(s_smem.at[rows, cols], x_smem.at[cols], tile)
      y += (_mgpu.rows(v.from_start(r0, rb), tile)
            * _mgpu.matmul(c_smem.at[rows], h_smem.transpose((1, 0)), tile))
      y += d_ref[m] * x_smem.at[rows][...].astype(_F32)
      _mgpu.stage(y, y_smem.at[rows])
    plgpu.copy_smem_to_gmem(y_smem, y_ref.at[b, tokens, m])

  per_head = lambda h: (h, 0)
  vec_spec = plgpu.BlockSpec((None, chunk), per_head)
  heads_slice = pl.ds(head0, heads)
  plgpu.emit_pipeline(
      step, grid=(heads,),
      in_specs=[
          plgpu.BlockSpec((chunk, None, headdim), lambda h: (0, h, 0), transforms=_mgpu.transforms(y_smem.dtype)),
          plgpu.BlockSpec((None, headdim, dstate), lambda h: (h, 0, 0), transforms=_mgpu.transforms(c_smem.dtype)),
          vec_spec, vec_spec, vec_spec,
      ],
      max_concurrent_steps=max_concurrent_steps,
  )(x_ref.at[b, tokens, heads_slice], h_ref.at[b, heads_slice, pl.ds(c * headdim, headdim)],
    dt_ref.at[b, heads_slice, tokens], cum_ref.at[b, heads_slice, tokens], cum_ref.at[b, heads_slice, tokens])
  plgpu.wait_smem_to_gmem(0)


def _row_blocks(chunk):
  """(r, first row) of the 64-row blocks of a chunk."""
  return [(r, r * _ROW_BLOCK) for r in range(chunk // _ROW_BLOCK)]


def _pieces(start, stop):
  """First columns of the 64-column pieces of columns [start, stop). Elementwise work on a [64, <= L]
  tile runs piece by piece ([64, 64] f32: 32 registers per thread), each staged into its columns of a
  shared-memory operand; only the piece on W's diagonal is masked (`_decay`)."""
  return range(start, stop, _ROW_BLOCK)


def scan_bwd_dbc_kernel(x_ref, dt_ref, cum_ref, b_ref, c_ref, h_ref, dstate_ref, dy_ref, *rest,
                        has_docs, group_size, heads, max_concurrent_steps):
  """dB, dC of `heads` heads of one group, summed over them, on 64 columns of Q; grid ("b", "c", "hb", "qb").

  With xs = dt x, dP = dy xs^T, dS = dP o W, per head:
    dB = dS^T C + w o (xs dstate)      dC = dS B + e o (dy h_in)
    dw_w = rowsum((xs dstate) o B) w   de_e = rowsum((dy h_in) o C) e    (partial over these Q columns)
  The heads stream through `emit_pipeline` (x, dy and their h_in / dstate columns, dt and cum, one head
  ahead) and their dB, dC add up in two f32 [L, 64] accumulators in shared memory, written once per
  program: the output is per head block, not per head. Each head works in 64-row blocks: dB's block r
  (tokens s) needs dS^T's rows s and columns l >= 64 r, computed directly as xs_s dy_l^T o W^T; dC's
  block r (tokens l) needs dS's columns s < 64 (r + 1). Each such tile is staged in a buffer of its own
  width ([64, L - 64 r] for dS^T, reused as [64, 64 (r + 1)] for dS), so that every operand is a prefix
  or a row range of a shared-memory tile. (dS is computed once per column block of Q.)
  """
  (seg_ref, carry_ref), outs, scratch = _split(rest, has_docs, 4)
  db_ref, dc_ref, dw_ref, de_ref = outs
  b_smem, c_smem, *scratch = scratch
  chunk, q_cols = b_smem.shape
  blocks = _row_blocks(chunk)
  tiles = scratch[:len(blocks)]
  acc_db, acc_dc, vout_slots, seg_r_smem, seg_c_smem, carry_smem, barriers = scratch[len(blocks):]
  b, c, hb, qb = (lax.axis_index(name) for name in ("b", "c", "hb", "qb"))
  t0 = c * chunk
  tokens = pl.ds(t0, chunk)
  head0 = hb * heads
  j = lax.div(head0, group_size)
  cols_q = pl.ds(qb * q_cols, q_cols)
  rb = _ROW_BLOCK
  plgpu.copy_gmem_to_smem(b_ref.at[b, tokens, j, cols_q], b_smem, barriers.at[0])
  plgpu.copy_gmem_to_smem(c_ref.at[b, tokens, j, cols_q], c_smem, barriers.at[1])
  docs = _load_docs(seg_ref, carry_ref, (seg_r_smem, seg_c_smem, carry_smem), barriers, 2, b=b, tokens=tokens)
  plgpu.barrier_wait(barriers.at[0])
  plgpu.barrier_wait(barriers.at[1])
  zeros = plgpu.layout_cast(jnp.zeros((chunk, q_cols), _F32), plgpu.Layout.WGMMA)
  _mgpu.stage(zeros, acc_db)
  _mgpu.stage(zeros, acc_dc)

  def add(acc, rows, value):
    acc.at[rows][...] = acc.at[rows][...] + value

  def step(idx, x_smem, dy_smem, h_smem, dst_smem, dt_smem, cum_smem, cum_c_smem):
    (h,) = idx
    m = head0 + h
    headdim = x_smem.shape[1]
    v = _Chunk((dt_smem, cum_smem, cum_c_smem, *docs), *_chunk_end(cum_ref, seg_ref, b, m, t0 + chunk - 1))
    for _, r0 in blocks:  # x -> xs = dt x, in place (the pipeline refills this slot after the step)
      rows = pl.ds(r0, rb)
      _mgpu.stage(x_smem.at[rows][...].astype(_F32) * _mgpu.rows(v.dt(r0, rb), (rb, headdim)), x_smem.at[rows])
    xs_smem = x_smem
    block_q = (rb, q_cols)
    slot = lax.rem(h, 2)
    plgpu.wait_smem_to_gmem(2, wait_read_only=True)  # this slot's stores of two heads back are done
    for r, r0 in blocks:  # dB: tokens s of block r, l >= r0
      rows, later = pl.ds(r0, rb), pl.ds(r0, chunk - r0)
      for l0 in _pieces(r0, chunk):
        piece = pl.ds(l0, rb)
        dp_t = _mgpu.matmul(xs_smem.at[rows], dy_smem.at[piece].transpose((1, 0)), (rb, rb))      # dP^T
        _mgpu.stage(dp_t * v.decay(r0, rb, l0, rb, transposed=True), tiles[r].at[:, pl.ds(l0 - r0, rb)])
      ds_t = tiles[r]
      w = v.to_end(r0, rb)
      xs_dstate = _mgpu.matmul(xs_smem.at[rows], dst_smem, block_q)
      add(acc_db, rows, _mgpu.matmul(ds_t, c_smem.at[later], block_q) + _mgpu.rows(w, block_q) * xs_dstate)
      _mgpu.stage(jnp.sum(xs_dstate * b_smem.at[rows][...].astype(_F32), axis=1) * w,
                  vout_slots.at[slot, 0, rows])
    for r, r0 in blocks:  # dC: tokens l of block r, s < r0 + 64
      rows, earlier = pl.ds(r0, rb), pl.ds(0, r0 + rb)
      ds = tiles[len(blocks) - 1 - r]
      for s0 in _pieces(0, r0 + rb):
        piece = pl.ds(s0, rb)
        dp = _mgpu.matmul(dy_smem.at[rows], xs_smem.at[piece].transpose((1, 0)), (rb, rb))        # dP
        _mgpu.stage(dp * v.decay(r0, rb, s0, rb), ds.at[:, piece])
      e = v.from_start(r0, rb)
      dy_h = _mgpu.matmul(dy_smem.at[rows], h_smem, block_q)
      add(acc_dc, rows, _mgpu.matmul(ds, b_smem.at[earlier], block_q) + _mgpu.rows(e, block_q) * dy_h)
      _mgpu.stage(jnp.sum(dy_h * c_smem.at[rows][...].astype(_F32), axis=1) * e,
                  vout_slots.at[slot, 1, rows])
    plgpu.copy_smem_to_gmem(vout_slots.at[slot, 0], dw_ref.at[qb, b, m, tokens])
    plgpu.copy_smem_to_gmem(vout_slots.at[slot, 1], de_ref.at[qb, b, m, tokens])

  heads_slice = pl.ds(head0, heads)
  x_tile = plgpu.BlockSpec((chunk, None, dy_ref.shape[-1]), lambda h: (0, h, 0),
                           transforms=_mgpu.transforms(dy_ref.dtype))
  state_tile = plgpu.BlockSpec((None, dy_ref.shape[-1], q_cols), lambda h: (h, 0, 0),
                               transforms=_mgpu.transforms(dy_ref.dtype))
  vec_spec = plgpu.BlockSpec((None, chunk), lambda h: (h, 0))
  headdim = dy_ref.shape[-1]
  states = (b, heads_slice, pl.ds(c * headdim, headdim), cols_q)
  plgpu.emit_pipeline(
      step, grid=(heads,),
      in_specs=[x_tile, x_tile, state_tile, state_tile, vec_spec, vec_spec, vec_spec],
      max_concurrent_steps=max_concurrent_steps,
  )(x_ref.at[b, tokens, heads_slice], dy_ref.at[b, tokens, heads_slice], h_ref.at[states],
    dstate_ref.at[states], dt_ref.at[b, heads_slice, tokens], cum_ref.at[b, heads_slice, tokens],
    cum_ref.at[b, heads_slice, tokens])
  plgpu.copy_smem_to_gmem(acc_db, db_ref.at[b, tokens, hb, cols_q])
  plgpu.copy_smem_to_gmem(acc_dc, dc_ref.at[b, tokens, hb, cols_q])
  plgpu.wait_smem_to_gmem(0)


def scan_bwd_dx_kernel(x_ref, dt_ref, cum_ref, b_ref, c_ref, d_ref, dstate_ref, dy_ref, dw_ref, de_ref,
                       *rest, has_docs, group_size):
  """dx, d dt, the D-skip terms and da of one (b, c, m), in 64-row blocks.

    dxs = (S o W)^T dy + w o (B dstate^T)     dx = dt o dxs + D dy
    ddt = rowsum(dxs o x)                      dskip = rowsum(dy o x)   (summed to dD in jnp)
    da_i = rowsum_{s < i}(T_is) + sum_{l >= i} de_e_l + sum_{s < i} dw_w_s,   T = U (dS o S)
  with U_il = [l >= i] and dS o S fed as hi + lo terms in the input dtype (module docstring).
  Phase 1 (dx, ddt, dskip): block r of tokens s takes (S o W)^T's rows s and columns l >= 64 r, computed
  directly as B_s C_l^T o W^T. Phase 2 (da): dS o S is staged block by block (rows l, columns
  s < 64 (r + 1): the only entries the U product reads), then block r of da takes U's rows i and
  columns l >= 64 r. Each phase's buffers are scoped, so the two share shared memory.
  """
  (seg_ref, carry_ref), outs, scratch = _split(rest, has_docs, 4)
  dx_ref, ddt_ref, dskip_ref, da_ref = outs
  (x_smem, dy_smem, b_smem, c_smem, dst_smem, vout_smem, dw_smem, de_smem, *vec_smems, barriers) = scratch
  b, c, m = lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("m")
  chunk, headdim = x_smem.shape
  dtype = x_smem.dtype
  blocks = _row_blocks(chunk)
  rb = _ROW_BLOCK
  t0 = c * chunk
  tokens = pl.ds(t0, chunk)
  j = lax.div(m, group_size)
  _load_tiles([(x_ref.at[b, tokens, m], x_smem), (dy_ref.at[b, tokens, m], dy_smem),
               (b_ref.at[b, tokens, j], b_smem), (c_ref.at[b, tokens, j], c_smem),
               (dstate_ref.at[b, m, pl.ds(c * headdim, headdim)], dst_smem)], barriers)
  v = _Chunk.load(dt_ref, cum_ref, seg_ref, carry_ref, vec_smems, barriers, 5, b=b, c=c, m=m, chunk=chunk)
  _mgpu.load(dw_ref.at[b, m, tokens], dw_smem, barriers.at[5 + _Chunk.NUM_VECS])
  _mgpu.load(de_ref.at[b, m, tokens], de_smem, barriers.at[6 + _Chunk.NUM_VECS])
  block_p = (rb, headdim)

  @functools.partial(pl.run_scoped, sw_t_smem=_mgpu.swizzled((rb, chunk), dtype),
                     dx_smem=_mgpu.swizzled((rb, headdim), dtype))
  def _(sw_t_smem, dx_smem):  # phase 1: dx, ddt, dskip
    for _, r0 in blocks:
      rows, width = pl.ds(r0, rb), chunk - r0
      later = pl.ds(r0, width)
      for l0 in _pieces(r0, chunk):
        piece = pl.ds(l0, rb)
        s_t = _mgpu.matmul(b_smem.at[rows], c_smem.at[piece].transpose((1, 0)), (rb, rb))     # S^T
        _mgpu.stage(s_t * v.decay(r0, rb, l0, rb, transposed=True), sw_t_smem.at[:, pl.ds(l0 - r0, rb)])
      sw_t = sw_t_smem.at[:, pl.ds(0, width)]
      dxs = _mgpu.matmul(sw_t, dy_smem.at[later], block_p)                                  # (S o W)^T dy
      dxs += (_mgpu.rows(v.to_end(r0, rb), block_p)
              * _mgpu.matmul(b_smem.at[rows], dst_smem.transpose((1, 0)), block_p))
      x = x_smem.at[rows][...].astype(_F32)
      dy = dy_smem.at[rows][...].astype(_F32)
      _mgpu.stage(jnp.sum(dxs * x, axis=1), vout_smem.at[0, rows])
      _mgpu.stage(jnp.sum(dy * x, axis=1), vout_smem.at[1, rows])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # dx_smem free again
      _mgpu.store(dx_smem, dxs * _mgpu.rows(v.dt(r0, rb), block_p) + d_ref[m] * dy,
                  dx_ref.at[b, pl.ds(t0 + r0, rb), m])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # before the scope's memory is reused

  @functools.partial(pl.run_scoped, xs_smem=_mgpu.swizzled((chunk, headdim), dtype),
                     hi_smem=_mgpu.swizzled((chunk, chunk), dtype), lo_smem=_mgpu.swizzled((chunk, chunk), dtype),
                     u_smem=_mgpu.swizzled((rb, chunk), dtype))
  def _(xs_smem, hi_smem, lo_smem, u_smem):  # phase 2: da
    for _, r0 in blocks:
      rows = pl.ds(r0, rb)
      _mgpu.stage(x_smem.at[rows][...].astype(_F32) * _mgpu.rows(v.dt(r0, rb), block_p), xs_smem.at[rows])
    for _, r0 in blocks:  # dS o S, rows l of block r, columns s < r0 + 64
      rows = pl.ds(r0, rb)
      for s0 in _pieces(0, r0 + rb):
        piece = pl.ds(s0, rb)
        s_w = (_mgpu.matmul(c_smem.at[rows], b_smem.at[piece].transpose((1, 0)), (rb, rb))        # S o W
               * v.decay(r0, rb, s0, rb))
        pairs = _mgpu.matmul(dy_smem.at[rows], xs_smem.at[piece].transpose((1, 0)), (rb, rb)) * s_w  # dP
        hi = pairs.astype(dtype)
        _mgpu.stage(hi, hi_smem.at[rows, piece])
        _mgpu.stage(pairs - hi.astype(_F32), lo_smem.at[rows, piece])
    square = (rb, chunk)
    _mgpu.stage(jnp.where(_mgpu.iota(square, 1) >= _mgpu.iota(square, 0), 1.0, 0.0), u_smem)  # U, shifted
    piece_shape = (rb, rb)
    vec = lambda smem, piece: _mgpu.cols(plgpu.load(smem.at[piece], layout=_mgpu.COLS), piece_shape)
    for _, r0 in blocks:  # da_i, i in block r, summed over 64-column pieces of s
      rows, later = pl.ds(r0, rb), pl.ds(r0, chunk - r0)
      u = u_smem.at[:, pl.ds(0, chunk - r0)]                  # U's columns l >= r0
      total = None
      for s0 in _pieces(0, chunk):
        piece = pl.ds(s0, rb)
        if s0 > r0:  # every s > i
          term = vec(de_smem, piece)
        else:
          term = vec(dw_smem, piece) + _mgpu.matmul(u, hi_smem.at[later, piece], piece_shape,
                                                    u, lo_smem.at[later, piece])
          if s0 == r0:  # the diagonal piece: s < i there, where s = s0 + column and i = r0 + row
            term = jnp.where(_mgpu.iota(piece_shape, 1) < _mgpu.iota(piece_shape, 0), term, vec(de_smem, piece))
        total = term if total is None else total + term
      _mgpu.stage(jnp.sum(total, axis=1), vout_smem.at[2, rows])

  for k, dst in enumerate((ddt_ref, dskip_ref, da_ref)):
    plgpu.copy_smem_to_gmem(vout_smem.at[k], dst.at[b, m, tokens])
  plgpu.wait_smem_to_gmem(0)


# Named partials used by `ops_mgpu.py`.
chunk_state_fwd = functools.partial(chunk_state_kernel, mode="state")
chunk_state_dout = functools.partial(chunk_state_kernel, mode="dout")
