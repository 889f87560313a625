"""HiPPO transition matrices and their normal-plus-low-rank (NPLR / DPLR) forms.

Gu, Dao, Ermon, Rudra, Re 2020, "HiPPO: Recurrent Memory with Optimal Polynomial
Projections"; Gu, Goel, Re 2022, "Efficiently Modeling Long Sequences with
Structured State Spaces" (S4). Conventions follow state-spaces/s4
src/models/hippo/hippo.py (its latest version, with the halved LegT).

Sign convention: the continuous system is

    dx/dt = A x(t) + B u(t)

with A stable: eigenvalues have negative real part, except Fourier's eigenvalue 0
on its dummy state sin_0 (a zero row and column with B = 0, so it never moves). Indices are 0-based, n = row, k = column.

    legs     A[n,k] = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k);  B[n] = sqrt(2n+1)
    legt     A[n,k] = -1/2 sqrt(2n+1) sqrt(2k+1) * (1 if n >= k else (-1)^(n-k));  B[n] = 1/2 sqrt(2n+1)
    lagt     A = I/2 - tril(ones), B = 1
    fourier  the repo's 'fourier' / FouT: A = pi * (block skew, frequency k on the pair
             (cos_k, sin_k)) - B B^T, B = [1, 0, sqrt2, 0, sqrt2, 0, ...]

Every A here is "normal plus low rank": A + P^T P = S with S normal (real part times
I plus skew-symmetric), P = `rank_correction(measure, N, rank)` of shape (rank, N).
Diagonalising S = V_full diag(Lambda_full) V_full^* (V_full unitary) gives

    A = V_full (Lambda_full - P~ P~^*) V_full^*,   P~ = V_full^* P^T,  B~ = V_full^* B.

Because A, P, B are real, the eigenpairs come in conjugate pairs, so only one half
of them is kept (the N/2 with Im Lambda <= 0): V_full = [V, conj V],
Lambda_full = [Lambda, conj Lambda], P~ = [P_h, conj P_h], B~ = [B_h, conj B_h].
`nplr` returns that half (Lambda, P_h, B_h, V); the S4 kernel (ssm/s4.py) sums
over both halves, so the DPLR system it runs is exactly the HiPPO one.

Everything here is NumPy float64 / complex128, computed once per (measure, N, rank)
and cached (the arrays are read-only; copy before changing them).
"""

import functools
from typing import NamedTuple

import numpy as np

MEASURES = ("legs", "legt", "lagt", "fourier")


def _check(measure: str, N: int) -> None:
  if measure not in MEASURES:
    raise ValueError(f"unknown HiPPO measure {measure!r}; valid measures: {MEASURES}")
  if not isinstance(N, (int, np.integer)) or N < 1:
    raise ValueError(f"HiPPO state size N must be a positive int, got {N!r}")
  if measure == "fourier" and N % 2:
    raise ValueError(f"HiPPO 'fourier' needs an even N (cos/sin pairs), got {N}")


def _readonly(*arrays):
  for a in arrays:
    a.flags.writeable = False
  return arrays


@functools.lru_cache(maxsize=None)
def _transition(measure: str, N: int):
  q = np.arange(N, dtype=np.float64)
  r = np.sqrt(2 * q + 1)
  row, col = q[:, None], q[None, :]
  if measure == "legs":
    A = -np.where(row > col, r[:, None] * r[None, :], 0.0) - np.diag(q + 1)
    B = r.copy()
  elif measure == "legt":
    sign = np.where(row >= col, 1.0, (-1.0) ** (row - col))
    # Halved (the S4 repo's "timescale correctness"): theta = 2, so the sliding window spans
    # 2 time units (the impulse response is 1/2 on [0, 2]; notebook 01 checks it).
    A = -0.5 * r[:, None] * r[None, :] * sign
    B = 0.5 * r
  elif measure == "lagt":
    A = np.eye(N) / 2 - np.tril(np.ones((N, N)))
    B = np.ones(N)
  else:  # fourier (FouT): states (cos_0, sin_0 = 0 dummy, cos_1, sin_1, ...)
    # off-diagonal entry 2k (k >= 1) couples cos_k (index 2k) and sin_k (index 2k+1)
    d = np.zeros(max(N - 1, 0))
    idx = np.arange(2, N - 1, 2)
    d[idx] = idx // 2
    A = np.pi * (np.diag(d, -1) - np.diag(d, 1))
    B = np.zeros(N)
    B[0::2] = np.sqrt(2.0)
    B[0] = 1.0
    # The rank-one term reads off the other end of the window (frequencies pi k: the window
    # spans 2 time units, as LegT's).
    A = A - np.outer(B, B)
  return _readonly(A, B)


def transition(measure: str, N: int) -> tuple[np.ndarray, np.ndarray]:
  """The HiPPO (A, B) of a measure.

  Args:
    measure: "legs", "legt", "lagt" or "fourier".
    N: state size.

  Returns:
    A (N, N), B (N,): float64, read-only (cached); dx/dt = A x + B u.
  """
  _check(measure, N)
  return _transition(measure, int(N))


@functools.lru_cache(maxsize=None)
def _rank_correction(measure: str, N: int, rank: int):
  q = np.arange(N, dtype=np.float64)
  if measure == "legs":
    P = np.sqrt(q + 0.5)[None]
  elif measure == "legt":
    # One term per parity of the index; scaled by 1/sqrt2 because A was halved.
    p = np.sqrt(q + 0.5)
    P = np.stack([np.where(q % 2 == 1, p, 0.0), np.where(q % 2 == 0, p, 0.0)])
  elif measure == "lagt":
    P = np.full((1, N), np.sqrt(0.5))
  else:  # fourier
    P = transition("fourier", N)[1][None].copy()
  if rank < P.shape[0]:
    raise ValueError(f"HiPPO measure {measure!r} needs rank >= {P.shape[0]}, got {rank}")
  P = np.concatenate([P, np.zeros((rank - P.shape[0], N))], axis=0)
  return _readonly(P)[0]


def rank_correction(measure: str, N: int, rank: int = 1) -> np.ndarray:
  """P (rank, N) float64 such that A + P^T P is normal (zero rows pad to `rank`).

  "legs", "lagt" and "fourier" need rank >= 1, "legt" rank >= 2.
  """
  _check(measure, N)
  if not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  return _rank_correction(measure, int(N), int(rank))


class NPLR(NamedTuple):
  """Conjugate-symmetric half of the NPLR form of a HiPPO matrix (see module docstring).

  Lambda: (N/2,) complex128, Im <= 0, sorted by Im ascending.
  P: (rank, N/2) complex128 (= V^* P^T).
  B: (N/2,) complex128 (= V^* B).
  V: (N, N/2) complex128, orthonormal columns; [V, conj V] is unitary.
  """
  Lambda: np.ndarray
  P: np.ndarray
  B: np.ndarray
  V: np.ndarray


def normal_part(measure: str, N: int, rank: int = 1) -> np.ndarray:
  """S = A + P^T P (N, N) float64, real part times I plus skew-symmetric."""
  A, _ = transition(measure, N)
  P = rank_correction(measure, N, rank)
  return A + P.T @ P


@functools.lru_cache(maxsize=None)
def _nplr(measure: str, N: int, rank: int):
  A, B = transition(measure, N)
  P = rank_correction(measure, N, rank)
  S = A + P.T @ P
  w_re = np.mean(np.diag(S))
  if abs(w_re) < 1e-12:
    w_re = 0.0  # legt, lagt, fourier: purely skew (avoid a +1e-16 real part)
  sym = S + S.T - 2 * w_re * np.eye(N)
  if np.abs(sym).max() > 1e-8 * max(1.0, np.abs(S).max()):
    raise AssertionError(f"HiPPO {measure!r}: A + P^T P is not (real * I + skew-symmetric)")
  skew = (S - S.T) / 2
  # -i * skew is Hermitian: its real eigenvalues are the imaginary parts of Lambda.
  w_im, V_full = np.linalg.eigh(-1j * skew)
  n = N // 2
  tol = 1e-8 * max(1.0, np.abs(w_im).max())
  zero = np.abs(w_im) <= tol
  neg = np.flatnonzero((w_im < 0) & ~zero)
  if len(neg) != np.count_nonzero((w_im > 0) & ~zero):
    raise AssertionError(f"HiPPO {measure!r}: eigenvalues are not in conjugate pairs")
  V_neg = V_full[:, neg]
  lam_im = w_im[neg]
  n_zero = n - len(neg)
  if n_zero:
    # The null space of the skew part (Fourier's frequency 0) is real; pair a real
    # orthonormal basis u_1, u_2, ... as (u_1 + i u_2)/sqrt2 so that a vector and its
    # conjugate are both kept (the repo hard-codes this for Fourier's first two states).
    Z = V_full[:, zero]
    basis, s, _ = np.linalg.svd(np.concatenate([Z.real, Z.imag], axis=1), full_matrices=False)
    basis = basis[:, :2 * n_zero]
    V_zero = (basis[:, 0::2] + 1j * basis[:, 1::2]) / np.sqrt(2.0)
    V_neg = np.concatenate([V_neg, V_zero], axis=1)
    lam_im = np.concatenate([lam_im, np.zeros(n_zero)])
  Lam = w_re + 1j * lam_im
  V = V_neg
  P_h = P @ V.conj()  # (rank, n) = (V^* P^T)^T
  B_h = V.conj().T @ B
  return _readonly(Lam, P_h, B_h, V)


def nplr(measure: str, N: int, rank: int = 1) -> NPLR:
  """NPLR form of HiPPO (measure, N), conjugate-symmetric half kept.

  Eigendecomposition of the normal part S = A + P^T P in float64: the real part of
  Lambda is the mean of S's diagonal, the imaginary part from eigh(-i * skew(S)).
  Cached; returns read-only arrays.

  Args:
    measure: "legs", "legt", "lagt" or "fourier".
    N: real state size, even.
    rank: rank of the low-rank term (>= 2 for "legt").

  Returns:
    NPLR(Lambda (N/2,), P (rank, N/2), B (N/2,), V (N, N/2)), complex128.
  """
  _check(measure, N)
  if N % 2:
    raise ValueError(f"NPLR needs an even state size N (conjugate pairs), got {N}")
  rank_correction(measure, N, rank)  # validates rank
  return NPLR(*_nplr(measure, int(N), int(rank)))


def dplr(measure: str, N: int, rank: int = 1, copies: int = 1):
  """S4's DPLR initialisation: the NPLR half repeated for `copies` independent SSMs.

  Returns:
    Lambda (copies, N/2), P (rank, copies, N/2), B (copies, N/2): complex128,
    fresh writable arrays.
  """
  lam, p, b, _ = nplr(measure, N, rank)
  return (np.repeat(lam[None], copies, 0), np.repeat(p[:, None], copies, 1),
          np.repeat(b[None], copies, 0))


def dplr_dense(Lambda, P):
  """Full dense state matrix of a DPLR half: diag([L, conj L]) - P_f P_f^* (NumPy).

  Lambda (..., n), P (rank, ..., n) -> (..., 2n, 2n) complex, the matrix the S4 kernel
  and step run (P_f = [P, conj P] per rank; Q = conj P).
  """
  lam_f = np.concatenate([Lambda, np.conj(Lambda)], axis=-1)
  p_f = np.concatenate([P, np.conj(P)], axis=-1)
  low = np.einsum("r...n,r...m->...nm", p_f, p_f.conj())
  return np.einsum("...n,nm->...nm", lam_f, np.eye(lam_f.shape[-1])) - low
