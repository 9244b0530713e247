"""Pure-jnp reference implementations of the Mamba-2 SSD scan and causal conv1d.

The numerical spec the Pallas kernels of this package are tested against:
clarity and exactness (float32, `Precision.HIGHEST`) over speed.

SSD recurrence (per batch b and head m; Dao & Gu 2024, "Transformers are SSMs",
arXiv:2405.21060, Sec. 5 "state space duality")::

  dt_t  = clip(softplus(dt_raw_t + dt_bias), dt_min, dt_max)   # in float32
  h_t   = exp(dt_t * A) * h_{t-1} + dt_t * outer(x_t, B_t)        # h: [P, Q]
  y_t   = h_t @ C_t + D * x_t

Head m reads the B/C group `m // (M // J)` (contiguous grouping, i.e.
`repeat_interleave` of the groups over heads, as in state-spaces/mamba).

Packed sequences (`doc_ids`), following the `seq_idx` semantics of
state-spaces/mamba `mamba_ssm/ops/triton/ssd_combined.py`:

* `doc_ids` is an integer array [B, T]. A new document starts at every t >= 1
  with `doc_ids[:, t] != doc_ids[:, t - 1]`; only these change points matter
  (documents are numbered by their cumulative sum), so ids need not be
  monotonic or unique: `[0, 0, 1, 1, 0]` is three documents.
* The SSM state is reset to zero immediately before the first token of every
  document except the first one; no information flows across a boundary.
* `initial_state` (float32 [B, M, P, Q], default zeros) is the state h_{-1}
  and flows only into the first document (the tokens before the first change
  point). Without `doc_ids` the whole row is one document.
* `final_state` is the state after the last token, i.e. it belongs to the last
  document, so it can be used to continue that document (chunked prefill or
  decoding).

Causal conv1d uses the same document semantics: inputs from a different
document than token t contribute zero to t's window, `initial_state` (the K-1
inputs preceding `x`) belongs to the first document, and `final_state` holds the
last K-1 inputs with entries that are not part of the last document zeroed.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
_F32 = jnp.float32


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
  """Float32-accumulating einsum at full precision."""
  return jnp.einsum(
      spec, *operands, precision=_HIGHEST, preferred_element_type=_F32
  )


def _check_vector(name: str, v: Optional[jax.Array], nheads: int) -> None:
  if v is not None and tuple(v.shape) != (nheads,):
    raise ValueError(f"{name} must have shape ({nheads},) (M,), got {v.shape=}")


def _check_doc_ids(doc_ids: Optional[jax.Array], bsz: int, seqlen: int) -> None:
  if doc_ids is None:
    return
  if tuple(doc_ids.shape) != (bsz, seqlen) or doc_ids.dtype.kind not in "iu":
    raise ValueError(
        f"doc_ids must be an integer array of shape [B, T]=({bsz}, {seqlen}), "
        f"got {doc_ids.shape=} {doc_ids.dtype=}"
    )


def _check_ssd_inputs(x, dt, A, B, C, D, dt_bias, initial_state, doc_ids):
  """Validates shapes of the sequence-level SSD inputs."""
  if x.ndim != 4:
    raise ValueError(f"x must be [B, T, M, P], got {x.shape=}")
  bsz, seqlen, nheads, headdim = x.shape
  if seqlen < 1:
    raise ValueError(f"Sequence length must be >= 1, got {x.shape=}")
  if tuple(dt.shape) != (bsz, seqlen, nheads):
    raise ValueError(f"dt must be [B, T, M], got {dt.shape=} with {x.shape=}")
  _check_vector("A", A, nheads)
  if B.ndim != 4 or tuple(B.shape[:2]) != (bsz, seqlen):
    raise ValueError(f"B must be [B, T, J, Q], got {B.shape=} with {x.shape=}")
  if tuple(C.shape) != tuple(B.shape):
    raise ValueError(f"C must have the shape of B, got {C.shape=} {B.shape=}")
  ngroups, dstate = B.shape[2], B.shape[3]
  if ngroups < 1 or nheads % ngroups != 0:
    raise ValueError(
        f"Number of heads M must be divisible by groups J, got {x.shape=} "
        f"(M={nheads}) and {B.shape=} (J={ngroups})"
    )
  _check_vector("D", D, nheads)
  _check_vector("dt_bias", dt_bias, nheads)
  expected = (bsz, nheads, headdim, dstate)
  if initial_state is not None and tuple(initial_state.shape) != expected:
    raise ValueError(
        f"initial_state must be [B, M, P, Q]={expected}, got "
        f"{initial_state.shape=}"
    )
  _check_doc_ids(doc_ids, bsz, seqlen)
  # An integer x gave an integer y (the scan's f32 result truncated), silently.
  named = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, initial_state=initial_state)
  for name, v in named.items():
    if v is not None and not jnp.issubdtype(v.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {name}.dtype={v.dtype}")


def _check_chunk_size(chunk_size: int) -> None:
  # bool is an int: chunk_size=True ran 1-token chunks.
  if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size=}")


def _process_dt(
    dt: jax.Array,
    dt_bias: Optional[jax.Array],
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
) -> jax.Array:
  """dt = clip(softplus(dt + dt_bias), dt_min, dt_max) in float32."""
  dt = dt.astype(_F32)
  if dt_bias is not None:
    dt = dt + dt_bias.astype(_F32)
  if dt_softplus:
    dt = jax.nn.softplus(dt)
  return jnp.clip(dt, dt_min, dt_max)


def _expand_groups(v: jax.Array, nheads: int) -> jax.Array:
  """[..., J, Q] -> [..., M, Q]; head m reads group m // (M // J)."""
  return jnp.repeat(v.astype(_F32), nheads // v.shape[-2], axis=-2)


def _segment_ids(doc_ids: Optional[jax.Array], bsz: int, seqlen: int):
  """[B, T] int32 non-decreasing document index, 0 for the first document."""
  if doc_ids is None:
    return jnp.zeros((bsz, seqlen), jnp.int32)
  changes = (doc_ids[:, 1:] != doc_ids[:, :-1]).astype(jnp.int32)  # [B,T-1]
  return jnp.pad(jnp.cumsum(changes, axis=1), [(0, 0), (1, 0)])  # [B,T]


def _chunked_segments(doc_ids: Optional[jax.Array], bsz: int, seqlen: int, chunk: int
                      ) -> tuple[jax.Array, jax.Array]:
  """(document index [B, C, L] int32 over whole chunks, padding in the last document; carry [B, C, L] bool).

  The state entering chunk c belongs to the document of chunk c-1's last token (document 0, that of the
  initial state, for c == 0); `carry[b, c, l]` says whether position l is in that document (indices never
  decrease, so equality <=> no boundary in between). Shared by the reference and the kernels' prologues.
  """
  seg = _segment_ids(doc_ids, bsz, seqlen)  # [B,T]
  seg = jnp.pad(seg, [(0, 0), (0, (-seqlen) % chunk)], mode="edge")
  segc = seg.reshape(bsz, -1, chunk)  # [B,C,L]
  seg_prev = jnp.pad(segc[:, :-1, -1], [(0, 0), (1, 0)])  # [B,C]
  return segc, segc == seg_prev[:, :, None]


def _pad_dim(v: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` of `v` up to `size`."""
  pad = size - v.shape[axis]
  if not pad:
    return v
  widths = [(0, 0)] * v.ndim
  widths[axis] = (0, pad)
  return jnp.pad(v, widths)


def _cast_ssd(x, A, B, C, initial_state):
  """Returns float32 A, x, B/C expanded to heads [..., M, Q], and h0."""
  nheads, headdim = x.shape[-2:]
  if initial_state is None:
    initial_state = jnp.zeros((x.shape[0], nheads, headdim, B.shape[-1]))
  return (
      A.astype(_F32),
      x.astype(_F32),
      _expand_groups(B, nheads),
      _expand_groups(C, nheads),
      initial_state.astype(_F32),  # [B,M,P,Q]
  )


def _ssd_state_update(h, x, dt, A, B):
  """h [B,M,P,Q] after one more token: exp(dt A) h + dt x B^T. x [B,M,P], dt [B,M], B [B,M,Q]."""
  decay = jnp.exp(dt * A)  # [B,M]
  # [B,M] x [B,M,P] x [B,M,Q] -> [B,M,P,Q]
  return decay[:, :, None, None] * h + _einsum("bm,bmp,bmq->bmpq", dt, x, B)


def _ssd_readout(h, x, C, D):
  """y [B,M,P] = h C (+ D x). h [B,M,P,Q], x [B,M,P], C [B,M,Q]."""
  y = _einsum("bmpq,bmq->bmp", h, C)  # [B,M,P,Q] x [B,M,Q] -> [B,M,P]
  if D is not None:
    y = y + D.astype(_F32)[:, None] * x
  return y


def _ssd_step(h, x, dt, A, B, C, D):
  """One recurrent step. h [B,M,P,Q], x [B,M,P], dt [B,M], B/C [B,M,Q]."""
  h = _ssd_state_update(h, x, dt, A, B)
  return h, _ssd_readout(h, x, C, D)


def _segsum(a: jax.Array) -> jax.Array:
  """[..., L] -> [..., L, S]: out[..., l, s] = sum_{s < i <= l} a[..., i].

  A masked cumsum (as in `ssd_minimal.py` of state-spaces/mamba) rather than a
  difference of cumsums, to avoid cancellation. Entries with s > l are 0.
  """
  chunk = a.shape[-1]
  strict_lower = jnp.tril(jnp.ones((chunk, chunk), bool), k=-1)  # [L,S]
  a_ls = jnp.where(strict_lower, a[..., :, None], 0.0)  # [..., L, S]
  return jnp.cumsum(a_ls, axis=-2)


def ssd_reference(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: Optional[jax.Array],
    dt_bias: Optional[jax.Array],
    *,
    initial_state: Optional[jax.Array] = None,
    doc_ids: Optional[jax.Array] = None,
    chunk_size: int = 128,
    dt_softplus: bool = True,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
) -> tuple[jax.Array, jax.Array]:
  """Chunked SSD scan (Mamba-2 "state space duality" algorithm).

  Follows the four-step chunked algorithm of Dao & Gu 2024 (arXiv:2405.21060,
  Sec. 6 / Listing 1): (1) intra-chunk quadratic attention-like term with the
  causal decay mask exp(segsum(dt * A)), (2) per-chunk end states, (3) a
  recurrence over chunk states (`lax.scan`), (4) the state-to-output term.
  Document boundaries (`doc_ids`) additionally mask (1), (2) and (4) and cut
  the carry in (3), like `seq_idx` in `mamba_ssm/ops/triton/ssd_combined.py`.
  See the module docstring for the exact `doc_ids` / `initial_state` rules.

  Args:
    x: [B, T, M, P] input, any float dtype.
    dt: [B, T, M] raw time step (before `dt_bias` / softplus).
    A: [M] negative decay rates (used in float32).
    B: [B, T, J, Q] input projection; M % J == 0.
    C: [B, T, J, Q] output projection.
    D: [M] skip weights or None.
    dt_bias: [M] or None.
    initial_state: [B, M, P, Q] state before the first token (float32), or
      None for zeros. Only feeds the first document.
    doc_ids: [B, T] integer document ids or None (one document per row).
    chunk_size: chunk length L; T is zero-padded internally to a multiple.
    dt_softplus: whether to apply softplus to dt + dt_bias.
    dt_min: lower clip of the processed dt.
    dt_max: upper clip of the processed dt.

  Returns:
    y: [B, T, M, P] in x.dtype.
    final_state: [B, M, P, Q] float32 state after the last token.
  """
  _check_ssd_inputs(x, dt, A, B, C, D, dt_bias, initial_state, doc_ids)
  _check_chunk_size(chunk_size)
  dt = _process_dt(dt, dt_bias, dt_softplus, dt_min, dt_max)  # [B,T,M]
  bsz, seqlen, nheads, headdim = x.shape
  ngroups = B.shape[2]
  heads_per_group = nheads // ngroups
  # xf [B,T,M,P], h0 [B,M,P,Q]; B and C stay per group, bmat/cmat [B,T,J,Q]: head m = (j, g) with
  # j = m // G reads group j. Expanding them to heads would repeat each group's C.B products G times.
  a_coef, xf, _, _, h0 = _cast_ssd(x, A, B[..., :1, :], C[..., :1, :], initial_state)
  bmat, cmat = B.astype(_F32), C.astype(_F32)
  segc, carry_in = _chunked_segments(doc_ids, bsz, seqlen, chunk_size)  # [B,C,L] each

  # Pad after dt processing: dt = 0 (decay 1) and x = B = C = 0 change neither
  # y nor the final state; padded tokens stay in the last document.
  pad = (-seqlen) % chunk_size
  if pad:
    pad_t = lambda v: jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
    xf, dt, bmat, cmat = map(pad_t, (xf, dt, bmat, cmat))
  nchunks = (seqlen + pad) // chunk_size
  chunked = lambda v: v.reshape((bsz, nchunks, chunk_size) + v.shape[2:])
  # xc [B,C,L,M,P], dtc [B,C,L,M], bc/cc [B,C,L,J,Q].
  xc, dtc, bc, cc = map(chunked, (xf, dt, bmat, cmat))
  by_group = lambda v, axis: v.reshape(v.shape[:axis] + (ngroups, heads_per_group) + v.shape[axis + 1:])
  xg, dtg = by_group(xc, 3), by_group(dtc, 3)  # [B,C,L,J,G,P], [B,C,L,J,G]

  a = jnp.transpose(dtc * a_coef, (0, 3, 1, 2))  # [B,M,C,L]
  a_cumsum = jnp.cumsum(a, axis=-1)  # [B,M,C,L]
  mask = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))  # [L,S]
  if doc_ids is not None:
    same_doc = segc[:, :, :, None] == segc[:, :, None, :]  # [B,C,L,S]
    mask = (mask & same_doc)[:, None]  # [B,1,C,L,S]
  # Safe value before exp, then mask: no inf/NaN in forward or backward.
  segsum = jnp.where(mask, _segsum(a), 0.0)  # [B,M,C,L,S]
  decay_ls = jnp.where(mask, jnp.exp(segsum), 0.0)  # [B,M,C,L,S]

  # (1) Intra-chunk (diagonal block) term: C.B once per group, the decay per head.
  # [B,C,L,J,Q] x [B,C,S,J,Q] -> [B,J,C,L,S]
  scores_g = _einsum("bcljq,bcsjq->bjcls", cc, bc)
  scores = scores_g[:, :, None] * by_group(decay_ls, 1)  # [B,J,G,C,L,S]
  # [B,J,G,C,L,S] x [B,C,S,J,G] x [B,C,S,J,G,P] -> [B,C,L,J,G,P]
  y_diag = _einsum("bjgcls,bcsjg,bcsjgp->bcljgp", scores, dtg, xg)

  # (2) State at the end of each chunk from that chunk's own tokens. The last
  # row of decay_ls already zeroes tokens outside the chunk's last document.
  decay_to_end = by_group(decay_ls[..., -1, :], 1)  # [B,J,G,C,S]
  # [B,J,G,C,S] x [B,C,S,J,G] x [B,C,S,J,Q] x [B,C,S,J,G,P] -> [B,C,J,G,P,Q]
  chunk_states = _einsum(
      "bjgcs,bcsjg,bcsjq,bcsjgp->bcjgpq", decay_to_end, dtg, bc, xg
  ).reshape(bsz, nchunks, nheads, headdim, -1)  # [B,C,M,P,Q]

  # (3) Inter-chunk recurrence. Position l sees the state entering its chunk
  # iff it is in that state's document (`carry_in`, see `_chunked_segments`).
  # decay_from_start[..., l] is the decay of the incoming state at l (0 if cut
  # off); the last entry is the carry decay of the whole chunk.
  # exp(cumsum(dt * A) <= 0) is safe.
  decay_from_start = jnp.exp(a_cumsum)  # [B,M,C,L]
  if doc_ids is not None:
    decay_from_start = jnp.where(carry_in[:, None], decay_from_start, 0.0)
  chunk_decay = decay_from_start[..., -1]  # [B,M,C]

  def _chunk_step(h, inputs):
    state_c, decay_c = inputs  # [B,M,P,Q], [B,M]
    return decay_c[:, :, None, None] * h + state_c, h

  xs = (jnp.moveaxis(chunk_states, 1, 0), jnp.moveaxis(chunk_decay, 2, 0))
  final_state, h_in = jax.lax.scan(_chunk_step, h0, xs)  # h_in: [C,B,M,P,Q]
  h_in = jnp.moveaxis(h_in, 0, 1)  # [B,C,M,P,Q] state entering each chunk

  # (4) State-to-output (off-diagonal block) term.
  # [B,C,L,J,Q] x [B,C,J,G,P,Q] x [B,J,G,C,L] -> [B,C,L,J,G,P]
  y_off = _einsum("bcljq,bcjgpq,bjgcl->bcljgp", cc, by_group(h_in, 2), by_group(decay_from_start, 1))

  y = (y_diag + y_off).reshape(bsz, nchunks * chunk_size, nheads, headdim)
  y = y[:, :seqlen]  # [B,T,M,P]
  if D is not None:
    y = y + D.astype(_F32)[:, None] * x.astype(_F32)
  return y.astype(x.dtype), final_state


def ssd_sequential_reference(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: Optional[jax.Array],
    dt_bias: Optional[jax.Array],
    *,
    initial_state: Optional[jax.Array] = None,
    doc_ids: Optional[jax.Array] = None,
    chunk_size: int = 128,
    dt_softplus: bool = True,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
) -> tuple[jax.Array, jax.Array]:
  """Token-by-token `lax.scan` oracle with the semantics of `ssd_reference`.

  `chunk_size` is validated but otherwise unused (kept for signature parity).
  All arithmetic is float32; returns (y in x.dtype, final_state float32).
  """
  _check_ssd_inputs(x, dt, A, B, C, D, dt_bias, initial_state, doc_ids)
  _check_chunk_size(chunk_size)
  dt = _process_dt(dt, dt_bias, dt_softplus, dt_min, dt_max)  # [B,T,M]
  # xf [B,T,M,P], bmat/cmat [B,T,M,Q], h0 [B,M,P,Q]
  a_coef, xf, bmat, cmat, h0 = _cast_ssd(x, A, B, C, initial_state)
  seg = _segment_ids(doc_ids, *x.shape[:2])  # [B,T]
  # [B,T] True where the state is zeroed before the token.
  reset = jnp.pad(seg[:, 1:] != seg[:, :-1], [(0, 0), (1, 0)])

  def _step(h, inputs):
    x_t, dt_t, b_t, c_t, reset_t = inputs
    h = jnp.where(reset_t[:, None, None, None], 0.0, h)
    return _ssd_step(h, x_t, dt_t, a_coef, b_t, c_t, D)

  xs = tuple(jnp.moveaxis(v, 1, 0) for v in (xf, dt, bmat, cmat, reset))
  final_state, ys = jax.lax.scan(_step, h0, xs)  # ys: [T,B,M,P]
  return jnp.moveaxis(ys, 0, 1).astype(x.dtype), final_state


def _check_decode_inputs(state, x, dt, A, B, C, D, dt_bias, keep) -> None:
  """The checks of `ssd_decode_step_reference` (shared with the kernel's entry point)."""
  if x.ndim != 3 or dt.ndim != 2 or B.ndim != 3 or C.ndim != 3:
    raise ValueError(
        "Expected x [B, M, P], dt [B, M], B/C [B, J, Q], got "
        f"{x.shape=} {dt.shape=} {B.shape=} {C.shape=}"
    )
  # Validate as a length-1 sequence (T = 1).
  _check_ssd_inputs(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, dt_bias, state, None)
  if keep is not None and keep.shape != (x.shape[0],):
    raise ValueError(f"keep must be [B] = ({x.shape[0]},), got {keep.shape=}")


def ssd_decode_step_reference(
    state: jax.Array,
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: Optional[jax.Array],
    dt_bias: Optional[jax.Array],
    *,
    dt_softplus: bool = True,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
    keep: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """One-token recurrent SSD update (decoding), semantics of `ssd_reference`.

  Args:
    state: [B, M, P, Q] float32 state after the previous token.
    x: [B, M, P] input for the new token.
    dt: [B, M] raw time step.
    A: [M].
    B: [B, J, Q].
    C: [B, J, Q].
    D: [M] or None.
    dt_bias: [M] or None.
    dt_softplus: see `ssd_reference`.
    dt_min: see `ssd_reference`.
    dt_max: see `ssd_reference`.
    keep: [B] bool or None: rows whose state carries on; the others start a new document and read a zero
      state (None: every row carries on).

  Returns:
    y: [B, M, P] in x.dtype.
    new_state: [B, M, P, Q] float32.
  """
  _check_decode_inputs(state, x, dt, A, B, C, D, dt_bias, keep)
  dt = _process_dt(dt, dt_bias, dt_softplus, dt_min, dt_max)  # [B,M]
  # xf [B,M,P], bmat/cmat [B,M,Q], h0 [B,M,P,Q]
  a_coef, xf, bmat, cmat, h0 = _cast_ssd(x, A, B, C, state)
  if keep is not None:
    h0 = jnp.where(keep[:, None, None, None], h0, 0.0)
  # `_ssd_step` with a barrier between the state update and the readout (the same operations). Without it
  # XLA fuses both into one kernel that writes the new state to a temporary and then copies it into the
  # cache: two extra passes over the largest tensor of a decoding step (f32 [B, M, P, Q] per Mamba layer;
  # 5.3 GB over the 21 layers of Nemotron-3-Nano-4B at batch 64). Behind the barrier the update is one
  # elementwise kernel that writes where the old state lies (in place in a donated per-layer cache,
  # `n3jax.models.unstack_cache`) and the readout a reduction over the new state: read, write, read.
  new_state = _ssd_state_update(h0, xf, dt, a_coef, bmat)
  new_state = jax.lax.optimization_barrier(new_state)
  y = _ssd_readout(new_state, xf, cmat, D)
  return y.astype(x.dtype), new_state


def _check_conv_weights(weight, bias, channels: int, activation) -> int:
  if weight.ndim != 2 or weight.shape[1] != channels or weight.shape[0] < 1:
    raise ValueError(
        f"weight must be [K, Ch] with Ch={channels}, got {weight.shape=}"
    )
  if bias is not None and tuple(bias.shape) != (channels,):
    raise ValueError(f"bias must be [Ch]=({channels},), got {bias.shape=}")
  if activation not in ("silu", None):
    raise ValueError(f"activation must be 'silu' or None, got {activation=}")
  return weight.shape[0]


def _conv_epilogue(y, bias, activation):
  if bias is not None:
    y = y + bias.astype(_F32)
  if activation == "silu":
    y = jax.nn.silu(y)
  return y


def causal_conv1d_reference(
    x: jax.Array,
    weight: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    initial_state: Optional[jax.Array] = None,
    doc_ids: Optional[jax.Array] = None,
    activation: Optional[str] = "silu",
) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal conv1d with document masking.

  y[t, c] = act(bias[c] + sum_k weight[k, c] * x[t - (K-1) + k, c]), i.e.
  weight[K-1] multiplies the current token (torch `conv1d` with left padding
  K-1 and `weight[c, 0, k]`, as in the Mamba-2 mixer). Inputs before the
  sequence come from `initial_state`; inputs from another document than token
  t contribute zero (cf. `seq_idx` in `causal_conv1d_fn`).

  Args:
    x: [B, T, Ch].
    weight: [K, Ch].
    bias: [Ch] or None.
    initial_state: [B, K-1, Ch] inputs preceding x (oldest first), or None
      for zeros. Only contributes to tokens of the first document.
    doc_ids: [B, T] integer document ids or None.
    activation: "silu" or None, applied after the bias.

  Returns:
    y: [B, T, Ch] in x.dtype.
    final_state: [B, K-1, Ch] in x.dtype: the last K-1 inputs (including
      initial_state entries when T < K-1), with entries that do not belong to
      the last document zeroed.
  """
  if x.ndim != 3 or x.shape[1] < 1:
    raise ValueError(f"x must be [B, T, Ch] with T >= 1, got {x.shape=}")
  bsz, seqlen, channels = x.shape
  width = _check_conv_weights(weight, bias, channels, activation)
  state_shape = (bsz, width - 1, channels)
  if initial_state is not None and initial_state.shape != state_shape:
    raise ValueError(
        f"initial_state must be [B, K-1, Ch]={state_shape}, got "
        f"{initial_state.shape=}"
    )
  _check_doc_ids(doc_ids, bsz, seqlen)
  init = jnp.zeros(state_shape) if initial_state is None else initial_state

  seg = _segment_ids(doc_ids, bsz, seqlen)  # [B,T]
  # Prepended inputs belong to the first document (index 0).
  seg_ext = jnp.pad(seg, [(0, 0), (width - 1, 0)])  # [B,K-1+T]
  xp = jnp.concatenate([init, x], axis=1).astype(_F32)  # [B,K-1+T,Ch]
  w = weight.astype(_F32)  # [K,Ch]
  y = jnp.zeros((bsz, seqlen, channels), _F32)
  for k in range(width):
    same_doc = (seg_ext[:, k : k + seqlen] == seg)[..., None]  # [B,T,1]
    y = y + jnp.where(same_doc, xp[:, k : k + seqlen], 0.0) * w[k]
  y = _conv_epilogue(y, bias, activation)

  final_state = xp[:, seqlen:]  # [B,K-1,Ch]
  in_last_doc = (seg_ext[:, seqlen:] == seg[:, -1:])[..., None]  # [B,K-1,1]
  final_state = jnp.where(in_last_doc, final_state, 0.0)
  return y.astype(x.dtype), final_state.astype(x.dtype)


def causal_conv1d_update_reference(
    conv_state: jax.Array,
    x: jax.Array,
    weight: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    activation: Optional[str] = "silu",
) -> tuple[jax.Array, jax.Array]:
  """One-token causal conv1d update (decoding).

  Args:
    conv_state: [B, K-1, Ch] previous K-1 inputs, oldest first.
    x: [B, Ch] new input.
    weight: [K, Ch].
    bias: [Ch] or None.
    activation: "silu" or None.

  Returns:
    y: [B, Ch] in x.dtype.
    new_conv_state: [B, K-1, Ch] in conv_state.dtype (window shifted by one).
  """
  if x.ndim != 2:
    raise ValueError(f"x must be [B, Ch], got {x.shape=}")
  bsz, channels = x.shape
  width = _check_conv_weights(weight, bias, channels, activation)
  if tuple(conv_state.shape) != (bsz, width - 1, channels):
    raise ValueError(
        f"conv_state must be [B, K-1, Ch]=({bsz}, {width - 1}, {channels}), "
        f"got {conv_state.shape=}"
    )
  window = jnp.concatenate([conv_state, x[:, None]], 1).astype(_F32)  # [B,K,Ch]
  y = jnp.sum(window * weight.astype(_F32)[None], axis=1)  # [B,Ch]
  y = _conv_epilogue(y, bias, activation)
  return y.astype(x.dtype), window[:, 1:].astype(conv_state.dtype)


def _check_conv_decode_inputs(conv_state, x, B, C, conv_weight, conv_bias, activation) -> int:
  """The checks of `conv_ssd_decode_step_reference` on the conv part (shared with the kernel's entry point):
  -> the conv width K."""
  if not (isinstance(conv_state, (tuple, list)) and isinstance(conv_weight, (tuple, list)) and len(conv_state) == 3
          and len(conv_weight) == 3):
    raise ValueError("conv_state and conv_weight must each be an (x, B, C) triple, got "
                     f"{type(conv_state).__name__} / {type(conv_weight).__name__}")
  if conv_bias is not None and not (isinstance(conv_bias, (tuple, list)) and len(conv_bias) == 3):
    raise ValueError(f"conv_bias must be None or an (x, B, C) triple, got {type(conv_bias).__name__}")
  if activation not in ("silu", None):
    raise ValueError(f"activation must be 'silu' or None, got {activation=}")
  bias = conv_bias or (None, None, None)
  width = None
  for name, v, window, w, b in zip("xBC", (x, B, C), conv_state, conv_weight, bias):
    if w.ndim != 3 or tuple(w.shape[1:]) != tuple(v.shape[1:]) or w.shape[0] < 1:
      raise ValueError(f"conv weight of {name} must be [K, {', '.join(map(str, v.shape[1:]))}] (K, then the "
                       f"channels of {name}), got {w.shape}")
    width = w.shape[0] if width is None else width
    if w.shape[0] != width:
      raise ValueError(f"the conv weights of x, B, C differ in width K: {[u.shape[0] for u in conv_weight]}")
    if tuple(window.shape) != (v.shape[0], width - 1, *v.shape[1:]):
      raise ValueError(f"conv state of {name} must be [B, K-1, ...] = {(v.shape[0], width - 1, *v.shape[1:])}, "
                       f"got {window.shape}")
    if b is not None and tuple(b.shape) != tuple(v.shape[1:]):
      raise ValueError(f"conv bias of {name} must be {tuple(v.shape[1:])}, got {b.shape}")
  return width


def conv_ssd_decode_step_reference(
    state: Optional[jax.Array],
    conv_state: tuple[jax.Array, jax.Array, jax.Array],
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: Optional[jax.Array],
    dt_bias: Optional[jax.Array],
    conv_weight: tuple[jax.Array, jax.Array, jax.Array],
    conv_bias: Optional[tuple[jax.Array, jax.Array, jax.Array]] = None,
    *,
    dt_softplus: bool = True,
    dt_min: float = 0.0,
    dt_max: float = float("inf"),
    keep: Optional[jax.Array] = None,
    activation: Optional[str] = "silu",
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  """One token through the core of a Mamba-2 mixer (decoding): x, B and C each through its causal conv
  window and the activation, then the SSD update.

    x_c, B_c, C_c = act(conv(window + new input))      `causal_conv1d_update_reference`, per channel set
    y, h'         = ssd_decode_step_reference(h, x_c, dt, A, B_c, C_c, D, dt_bias)

  The convolved inputs are rounded to the inputs' dtypes before the update, as the mixer computes them.

  Args:
    state: [B, M, P, Q] float32 SSM state, or None (zeros).
    conv_state: (x [B, K-1, M, P], B [B, K-1, J, Q], C [B, K-1, J, Q]): the last K-1 raw inputs, oldest first.
    x: [B, M, P], dt: [B, M], B / C: [B, J, Q]: the new token's raw (pre-conv) inputs.
    A, D, dt_bias: [M] (D, dt_bias may be None).
    conv_weight: (x [K, M, P], B [K, J, Q], C [K, J, Q]); weight[K-1] multiplies the new input.
    conv_bias: (x [M, P], B [J, Q], C [J, Q]) or None.
    dt_softplus, dt_min, dt_max: see `ssd_reference`.
    keep: [B] bool or None: rows whose state carries on; the others start a new document, reading zero conv
      windows and a zero SSM state (None: every row carries on).
    activation: "silu" or None.

  Returns:
    y: [B, M, P] in x.dtype; new_state: [B, M, P, Q] float32; new conv_state: the windows shifted by the
    new raw inputs, in the conv_state dtypes.
  """
  _check_conv_decode_inputs(conv_state, x, B, C, conv_weight, conv_bias, activation)
  _check_decode_inputs(state, x, dt, A, B, C, D, dt_bias, keep)
  (xc, bc, cc), windows = conv_decode_windows_reference(conv_state, x, B, C, conv_weight, conv_bias, keep=keep,
                                                        activation=activation)
  y, new_state = ssd_decode_step_reference(state, xc, dt, A, bc, cc, D, dt_bias, dt_softplus=dt_softplus,
                                           dt_min=dt_min, dt_max=dt_max, keep=keep)
  return y, new_state, windows


def conv_decode_windows_reference(
    conv_state: tuple[jax.Array, jax.Array, jax.Array],
    x: jax.Array,
    B: jax.Array,
    C: jax.Array,
    conv_weight: tuple[jax.Array, jax.Array, jax.Array],
    conv_bias: Optional[tuple[jax.Array, jax.Array, jax.Array]] = None,
    *,
    keep: Optional[jax.Array] = None,
    activation: Optional[str] = "silu",
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
  """The conv half of `conv_ssd_decode_step_reference` (same arguments): x, B and C each through its causal
  conv window and the activation -> ((x_c, B_c, C_c) in the inputs' dtypes, the shifted windows)."""
  bsz = x.shape[0]
  convolved, windows = [], []
  for i, v in enumerate((x, B, C)):
    window = conv_state[i]
    if keep is not None:
      window = jnp.where(keep.reshape((-1,) + (1,) * (window.ndim - 1)), window, jnp.zeros_like(window))
    channels = v.shape[1:]
    flat = lambda a, lead: a.reshape(*a.shape[:lead], -1)
    y, fin = causal_conv1d_update_reference(
        flat(window, 2), flat(v, 1), flat(conv_weight[i], 1),
        None if conv_bias is None or conv_bias[i] is None else flat(conv_bias[i], 0), activation=activation)
    convolved.append(y.reshape(bsz, *channels))
    windows.append(fin.reshape(window.shape))
  return tuple(convolved), tuple(windows)
