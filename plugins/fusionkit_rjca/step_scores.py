"""The released TAGF step encoder and its score as one autograd function (fast path).

For ``N`` frames of ``S`` recursion steps ``x`` ``(N, S, D)`` the released gate computes, per
frame::

    h = BiLSTM(x)                      (N, S, 2H)  over the steps, learnable (h0, c0) shared
    e = Linear([x || h] after Dropout) (N, S, dim)
    score = mean(e / max(||e||, eps))  (N, S)

:func:`step_scores` returns ``score`` from the same parameters (the ``nn.LSTM`` weights, the
``init_state`` rows h0 fwd, h0 bwd, c0 fwd, c0 bwd, the Linear) with the same math, computed
the way these shapes allow: the steps axis is short (``S = 3`` in the released model) and the
frames are many (``N = B * T``), so

* the recurrence is unrolled over the steps as matrix products over all frames; the input
  projections of both directions are one product over every step, and the first recurrent
  product, from the initial state that every frame shares, is a single row (``nn.LSTM``
  multiplies that state with ``W_hh`` once per frame, forward and backward);
* the frames are processed in blocks, each written into preallocated buffers: the per-step
  element-wise work touches a block's memory only, and no operation allocates a fresh tensor
  of all frames (on the CPU a fresh large allocation costs page faults on first touch);
* the backward pass is written out instead of recorded: one pass over the blocks, the steps
  in reverse, from the saved gate activations (cell states are recomputed per block) and the
  dropout mask saved as bools.

With ``BLOCK_BYTES`` between 4 and 64 MiB the training step of the released model measured the
same on a 2-core Xeon (within the noise of a shared machine).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fusionkit_rjca.dropout import dropout_noise

__all__ = ["step_scores"]

#: bytes of gate activations per block of frames (both directions, all steps)
BLOCK_BYTES = 32 << 20


def _swap_og(w: Tensor, h: int) -> Tensor:
    """LSTM gate blocks ``(i, f, g, o) <-> (i, f, o, g)`` along dim 0 (an involution)."""
    return torch.cat([w[: 2 * h], w[3 * h :], w[2 * h : 3 * h]])


def _block_rows(x: Tensor, h: int, block: int | None) -> int:
    """Frames per block: ``block``, else about :data:`BLOCK_BYTES` of gate activations on the
    CPU and all frames at once on other devices (where blocks would only add kernel launches)."""
    n, s, _ = x.shape
    if block is None:
        cpu = x.device.type == "cpu"
        block = max(32, BLOCK_BYTES // (s * 8 * h * x.element_size())) if cpu else n
    return max(1, min(n, block))


class _StepScores(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor,
        b_hh: Tensor,
        w_ih_r: Tensor,
        w_hh_r: Tensor,
        b_ih_r: Tensor,
        b_hh_r: Tensor,
        init_state: Tensor,
        proj_w: Tensor,
        proj_b: Tensor,
        noise: Tensor | None,
        p: float,
        eps: float,
        block: int | None,
    ) -> Tensor:
        x = x.contiguous()
        n, s, d = x.shape
        h = w_hh.shape[1]
        dim, f = proj_w.shape
        nb = _block_rows(x, h, block)
        # gate rows reordered to (i, f, o, g): one sigmoid over 3H columns, one tanh over H;
        # columns [0, 4H) forward direction, [4H, 8H) backward direction
        wih = torch.cat([_swap_og(w_ih, h), _swap_og(w_ih_r, h)])  # (8H, D)
        bias = torch.cat([_swap_og(b_ih + b_hh, h), _swap_og(b_ih_r + b_hh_r, h)])
        whh = (_swap_og(w_hh, h), _swap_og(w_hh_r, h))  # (4H, H) each
        h0 = (init_state[0], init_state[1])
        c0 = (init_state[2], init_state[3])
        # the initial state is one row for every frame: its recurrent product is one row too
        r0 = (whh[0] @ h0[0], whh[1] @ h0[1])
        acts = x.new_empty(n, s, 8 * h)  # gate activations, steps in their natural order
        z = x.new_empty(n, s, f)  # [x || h] after dropout
        e = x.new_empty(n, s, dim)
        # dropout drawn block by block (the same numbers as one draw for all rows); the kept
        # units are saved as bools
        draw = noise is None and p > 0
        kept = torch.empty(n, s, f, dtype=torch.bool, device=x.device) if draw else None
        cell = x.new_empty(nb, s, 2 * h)  # cell states of a block, forward | backward
        tmp = x.new_empty(nb, h)
        for lo in range(0, n, nb):
            hi = min(n, lo + nb)
            m = hi - lo
            xb, ab, zb, cb, t = x[lo:hi], acts[lo:hi], z[lo:hi], cell[:m], tmp[:m]
            torch.addmm(bias, xb.view(m * s, d), wih.t(), out=ab.view(m * s, 8 * h))
            for k in range(s):
                for dr in (0, 1):  # forward reads step k, backward step s - 1 - k
                    st = k if dr == 0 else s - 1 - k
                    prev = st - 1 if dr == 0 else st + 1
                    g = ab[:, st, 4 * h * dr : 4 * h * (dr + 1)]
                    cols = slice(d + h * dr, d + h * (dr + 1))
                    if k:
                        g.addmm_(zb[:, prev, cols], whh[dr].t())
                    else:
                        g.add_(r0[dr])
                    g[:, : 3 * h].sigmoid_()
                    g[:, 3 * h :].tanh_()
                    c = cb[:, st, h * dr : h * (dr + 1)]
                    c_prev = cb[:, prev, h * dr : h * (dr + 1)] if k else c0[dr]
                    torch.mul(g[:, h : 2 * h], c_prev, out=c)
                    c.addcmul_(g[:, :h], g[:, 3 * h :])
                    torch.tanh(c, out=t)
                    torch.mul(g[:, 2 * h : 3 * h], t, out=zb[:, st, cols])
            zb[:, :, :d] = xb
            if noise is not None:
                zb.mul_(noise[lo:hi])
            elif kept is not None:
                keep = kept[lo:hi]
                torch.lt(torch.rand(m, s, f, device=x.device), 1.0 - p, out=keep)
                zb.mul_(keep).mul_(1.0 / (1.0 - p))
            torch.addmm(proj_b, zb.view(m * s, f), proj_w.t(), out=e[lo:hi].view(m * s, dim))
        norm = torch.linalg.vector_norm(e, dim=2)  # (N, S)
        den = norm.clamp_min(eps)
        score = e.sum(dim=2).div_(den).div_(dim)  # mean of the unit-norm encoding
        ctx.save_for_backward(x, acts, z, e, norm, den, score, wih, init_state, proj_w)
        ctx.whh = whh
        ctx.noise = noise
        ctx.kept = kept
        ctx.p = p
        ctx.eps = eps
        ctx.nb = nb
        return score.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_score: Tensor):  # type: ignore[override]
        x, acts, z, e, norm, den, score, wih, init_state, proj_w = ctx.saved_tensors
        whh, noise, kept, nb = ctx.whh, ctx.noise, ctx.kept, ctx.nb
        n, s, d = x.shape
        h = whh[0].shape[1]
        dim, f = proj_w.shape
        need = ctx.needs_input_grad
        c0 = (init_state[2], init_state[3])
        h0 = (init_state[0], init_state[1])
        # score = sum(e) / (dim den): d score / d e = 1 / (dim den) - score e / den^2, the
        # second term only where the norm is not clamped to eps
        gs = g_score.contiguous()
        coef1 = gs / (den * dim)
        coef2 = torch.where(norm > ctx.eps, gs * score / (den * den), torch.zeros_like(gs))
        g_pw = proj_w.new_zeros(dim, f)
        g_pb = proj_w.new_zeros(dim)
        g_bias = wih.new_zeros(8 * h)
        g_wih = wih.new_zeros(8 * h, d)
        g_whh = (whh[0].new_zeros(4 * h, h), whh[1].new_zeros(4 * h, h))
        g_row0 = (wih.new_zeros(4 * h), wih.new_zeros(4 * h))  # gates of the shared h0
        g_c0 = (wih.new_zeros(h), wih.new_zeros(h))
        g_x = torch.empty_like(x) if need[0] else None
        dgates = x.new_empty(nb, s, 8 * h)
        de = x.new_empty(nb, s, dim)
        dz = x.new_empty(nb, s, f)
        cell = x.new_empty(nb, s, 2 * h)  # cell states, recomputed per block
        tc = x.new_empty(nb, s, 2 * h)  # tanh(c)
        hid = x.new_empty(nb, s, 2 * h)  # h before dropout, recomputed per block
        dcell = x.new_empty(nb, s, 2 * h)  # gradient reaching each cell state from the next step
        t1 = x.new_empty(nb, h)
        t2 = x.new_empty(nb, 3 * h)
        for lo in range(0, n, nb):
            hi = min(n, lo + nb)
            m = hi - lo
            ab, zb, xb, cb = acts[lo:hi], z[lo:hi], x[lo:hi], cell[:m]
            deb, dzb, dgb, tcb, hb, dcb = de[:m], dz[:m], dgates[:m], tc[:m], hid[:m], dcell[:m]
            torch.addcmul(
                coef1[lo:hi].unsqueeze(2), coef2[lo:hi].unsqueeze(2), e[lo:hi], value=-1.0, out=deb
            )
            g_pw.addmm_(deb.view(m * s, dim).t(), zb.view(m * s, f))
            g_pb.add_(deb.view(m * s, dim).sum(dim=0))
            torch.mm(deb.view(m * s, dim), proj_w, out=dzb.view(m * s, f))
            if noise is not None:
                dzb.mul_(noise[lo:hi])
            elif kept is not None:
                dzb.mul_(kept[lo:hi]).mul_(1.0 / (1.0 - ctx.p))
            for dr in (0, 1):  # c_k = f_k c_{k-1} + i_k g_k, in each direction's reading order
                g = ab[:, :, 4 * h * dr : 4 * h * (dr + 1)]
                for k in range(s):
                    st = k if dr == 0 else s - 1 - k
                    prev = st - 1 if dr == 0 else st + 1
                    c = cb[:, st, h * dr : h * (dr + 1)]
                    c_prev = cb[:, prev, h * dr : h * (dr + 1)] if k else c0[dr]
                    torch.mul(g[:, st, h : 2 * h], c_prev, out=c)
                    c.addcmul_(g[:, st, :h], g[:, st, 3 * h :])
            torch.tanh(cb, out=tcb)
            for dr in (0, 1):
                cols = slice(4 * h * dr, 4 * h * (dr + 1))
                hc = slice(h * dr, h * (dr + 1))
                torch.mul(ab[:, :, cols][:, :, 2 * h : 3 * h], tcb[:, :, hc], out=hb[:, :, hc])
            for k in reversed(range(s)):
                for dr in (0, 1):
                    st = k if dr == 0 else s - 1 - k
                    prev = st - 1 if dr == 0 else st + 1
                    nxt_exists = k < s - 1
                    cols = slice(4 * h * dr, 4 * h * (dr + 1))
                    hc = slice(h * dr, h * (dr + 1))
                    g = ab[:, st, cols]
                    i, fg, o, gg = g[:, :h], g[:, h : 2 * h], g[:, 2 * h : 3 * h], g[:, 3 * h :]
                    tk = tcb[:, st, hc]
                    dh = dzb[:, st, d + h * dr : d + h * (dr + 1)]  # grad of h (after dropout)
                    dg = dgb[:, st, cols]
                    if nxt_exists:  # recurrent grad from the step read after this one
                        nst = st + 1 if dr == 0 else st - 1
                        dh.addmm_(dgb[:, nst, cols], whh[dr])
                    # dc = dh o (1 - tanh(c)^2) + the gradient from the next step's cell
                    dc = t1[:m]
                    torch.mul(tk, tk, out=dc)
                    dc.neg_().add_(1).mul_(o).mul_(dh)
                    if nxt_exists:
                        dc.add_(dcb[:, nst, hc])
                    c_prev = cb[:, prev, hc] if k else c0[dr]
                    torch.mul(dc, gg, out=dg[:, :h])
                    torch.mul(dc, c_prev, out=dg[:, h : 2 * h])
                    torch.mul(dh, tk, out=dg[:, 2 * h : 3 * h])
                    sig, u = g[:, : 3 * h], t2[:m]
                    torch.neg(sig, out=u).add_(1).mul_(sig)
                    dg[:, : 3 * h].mul_(u)
                    torch.mul(gg, gg, out=dg[:, 3 * h :])
                    dg[:, 3 * h :].neg_().add_(1).mul_(i).mul_(dc)
                    # into the cell state read before this one (c_prev), through f
                    if k:
                        torch.mul(dc, fg, out=dcb[:, st, hc])
                    else:
                        g_c0[dr].add_((dc * fg).sum(dim=0))
                        g_row0[dr].add_(dg.sum(dim=0))
            flat = dgb.view(m * s, 8 * h)
            g_wih.addmm_(flat.t(), xb.reshape(m * s, d))
            for dr in (0, 1):  # recurrent weights: gates of step k times h of step k - 1
                cols = slice(4 * h * dr, 4 * h * (dr + 1))
                hc = slice(h * dr, h * (dr + 1))
                for k in range(1, s):
                    st = k if dr == 0 else s - 1 - k
                    prev = st - 1 if dr == 0 else st + 1
                    g_whh[dr].addmm_(dgb[:, st, cols].t(), hb[:, prev, hc])
            if g_x is not None:
                torch.addmm(
                    dzb[:, :, :d].reshape(m * s, d), flat, wih, out=g_x[lo:hi].view(m * s, d)
                )
            g_bias.add_(flat.sum(dim=0))
        # the shared initial state: h0 entered every frame's first gates through W_hh
        for dr in (0, 1):
            g_whh[dr].add_(torch.outer(g_row0[dr], h0[dr]))
        g_init = torch.stack([g_row0[0] @ whh[0], g_row0[1] @ whh[1], g_c0[0], g_c0[1]])

        def back(t: Tensor) -> Tensor:
            return _swap_og(t, h)

        return (
            g_x,
            back(g_wih[: 4 * h]),
            back(g_whh[0]),
            back(g_bias[: 4 * h]),
            back(g_bias[: 4 * h]),
            back(g_wih[4 * h :]),
            back(g_whh[1]),
            back(g_bias[4 * h :]),
            back(g_bias[4 * h :]),
            g_init,
            g_pw,
            g_pb,
            None,
            None,
            None,
            None,
        )


def step_scores(
    lstm: torch.nn.LSTM,
    init_state: Tensor,
    proj: torch.nn.Linear,
    x: Tensor,
    dropout: float = 0.0,
    training: bool = False,
    eps: float = 1e-12,
    block: int | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """``mean(normalize(proj(Dropout([x || BiLSTM(x)]))), -1)``: ``(N, S, D) -> (N, S)``.

    ``lstm``: one-layer bidirectional ``nn.LSTM(D, H, batch_first=True)`` with biases, run from
    the state ``init_state`` ``(4, H)`` (rows h0 fwd, h0 bwd, c0 fwd, c0 bwd) for every row;
    ``proj``: ``Linear(D + 2H -> dim)``. With ``training`` and ``dropout > 0``, dropout on the
    ``(N, S, D + 2H)`` concatenation multiplies it by ``noise`` when given, else keeps each unit
    with probability ``1 - dropout`` (on the CPU ``rand < 1 - dropout``, drawn block by block in
    the order of one draw for all frames; elsewhere
    :func:`~fusionkit_rjca.dropout.dropout_noise`), scaled by ``1 / (1 - dropout)``. Under
    autocast the computation runs in the autocast dtype, as ``nn.LSTM`` and ``nn.Linear`` do.
    ``block``: frames per block (default: about ``BLOCK_BYTES`` of gate activations on the CPU,
    all frames elsewhere).
    """
    if not (lstm.bidirectional and lstm.num_layers == 1 and lstm.batch_first and lstm.bias):
        raise ValueError(
            "step_scores needs a one-layer bidirectional batch_first nn.LSTM with biases"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"step_scores needs 0 <= dropout < 1; got {dropout}")
    n, s, _ = x.shape
    params = [
        lstm.weight_ih_l0,
        lstm.weight_hh_l0,
        lstm.bias_ih_l0,
        lstm.bias_hh_l0,
        lstm.weight_ih_l0_reverse,
        lstm.weight_hh_l0_reverse,
        lstm.bias_ih_l0_reverse,
        lstm.bias_hh_l0_reverse,
        init_state,
        proj.weight,
        proj.bias,
    ]
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    x = x.to(dtype)
    params = [p.to(dtype) for p in params]
    p = dropout if training else 0.0
    if p == 0.0:
        noise = None
    elif noise is not None:
        noise = noise.to(dtype)
    elif x.device.type != "cpu":
        noise = dropout_noise((n, s, proj.in_features), p, device=x.device, dtype=dtype)
    with torch.autocast(device, enabled=False):
        return _StepScores.apply(x, *params, noise, p, eps, block)
