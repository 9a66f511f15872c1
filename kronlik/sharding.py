r"""More individuals than one device holds: M = G Gᵀ with G (T × r) sharded by rows over devices.

:class:`ShardedLowRank` is the form of M for a factor whose T rows are split over the devices of
a mesh axis (one process or many, after ``jax.distributed.initialize()``). Its one step that is
not a product is the thin SVD of G; here it is a tall-skinny QR (TSQR): every device factors its
own rows, G_i = Q_i R_i (O(T r²/P)), the P small factors R_i (at most r × r each) are gathered to every
device and factored once more, [R_1; …; R_P] = Q_s R, and Q = diag(Q_i) Q_s stays sharded by
rows. The SVD of the r × r R = U_R S W_Rᵀ then gives M's basis V = Q U_R, λ = S², exactly the
numbers (to rounding) of the single-device SVD and as backward stable: no Gram matrix GᵀG is
formed, so nothing squares G's condition number (a Gram matrix would lose the small singular
values of a graded G below √eps·‖G‖). Communication: one all-gather of P·r² numbers; the
second QR, of the P·r × r stack, runs on every device (O(P r³), small beside the local
O(T r²/P) while P² r ≤ T).

Everything after the basis is products in which T is either kept (V X, Y - V VᵀY, elementwise
work on (T, D) arrays: local to each device) or contracted (Vᵀ Y, Vᵀ X, Gᵀ R: a local product
and an all-reduce of an r × D or r × r block), which XLA's partitioner emits from the shardings
of G and Y; no T × T or T × r array is ever gathered to one device.

>>> import jax, jax.numpy as jnp, kronlik
>>> mesh = kronlik.row_mesh()  # every device, one axis "rows"
>>> G = jnp.linspace(-1.0, 1.0, 8 * 3).reshape(8, 3)
>>> Y = jnp.cos(jnp.arange(8 * 2.0)).reshape(8, 2)
>>> M = kronlik.ShardedLowRank(kronlik.shard_rows(G, mesh), mesh)
>>> sharded = kronlik.loglik(kronlik.shard_rows(Y, mesh), M, jnp.eye(2), jnp.eye(2))
>>> bool(jnp.isclose(sharded, kronlik.loglik(Y, kronlik.LowRank(G), jnp.eye(2), jnp.eye(2))))
True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .forms import Basis, LowRank, MCotangent, singular_basis

Array = jax.Array

__all__ = ["ShardedLowRank", "row_mesh", "shard_rows", "thin_svd", "tsqr"]


def row_mesh(devices=None, axis: str = "rows") -> Mesh:
    """A one-axis mesh over ``devices`` (default: every device of every process) whose axis is *Auto*.

    Auto: XLA's partitioner places the all-reduces of the contractions over T (Vᵀ Y, ...) from the
    shardings of the inputs. A mesh of *Explicit* axes (``jax.make_mesh``'s default from jax 0.7
    on) would make every such contraction name its output sharding, so :class:`ShardedLowRank`
    refuses one.
    """
    devices = np.asarray(jax.devices() if devices is None else list(devices))
    axis_type = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
    if axis_type is None:  # jax < 0.6: every axis is automatic
        return Mesh(devices, (axis,))
    return Mesh(devices, (axis,), axis_types=(axis_type,))


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` (jax ≥ 0.6) or its experimental predecessor (jax 0.5), replication unchecked:
    the gathered R and its QR are the same on every device by construction (same input, same
    deterministic kernel), which the checker cannot infer through a QR."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def shard_rows(x, mesh: Mesh, axis: str = "rows") -> Array:
    """``x`` (T, ...) placed on ``mesh`` with its rows split over the mesh axis ``axis`` (the rest replicated).

    T must be a multiple of the axis' size. In several processes (after
    ``jax.distributed.initialize()``) every process passes the same global ``x`` and keeps only
    its own rows on its devices; build a larger-than-host array with
    ``jax.make_array_from_callback(shape, row_sharding(mesh), ...)`` instead.
    """
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    _check_rows(x.shape[0], mesh, axis, "the array")
    return jax.device_put(x, row_sharding(mesh, axis, x.ndim))


def host_array(x) -> np.ndarray:
    """x as a NumPy array on this host, gathered from every process if it spans several (small arrays only)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def row_sharding(mesh: Mesh, axis: str = "rows", ndim: int = 2) -> NamedSharding:
    """The sharding of an ``ndim``-dimensional array split by rows over ``axis`` of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(axis, *([None] * (ndim - 1))))


def _check_rows(T: int, mesh: Mesh, axis: str, what: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. kronlik.row_mesh()); got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"the mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", None) or ()))
    if "Explicit" in str(types.get(axis, "")):
        raise ValueError(
            f"mesh axis {axis!r} is Explicit; kronlik needs an Auto axis (XLA places the all-reduces): "
            "use kronlik.row_mesh(), or jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,))"
        )
    p = mesh.shape[axis]
    if T % p:
        raise ValueError(
            f"{what} has T = {T} rows, which the {p} devices of mesh axis {axis!r} cannot split evenly: "
            f"use a number of devices that divides T (or drop {T % p} individuals)"
        )


def _local_tsqr(g: Array, axis: str) -> tuple[Array, Array, Array]:
    """Inside shard_map: (this device's Q_i, its block of Q_s, R) with G's rows = diag(Q_i) Q_s R."""
    q, r = jnp.linalg.qr(g)  # (T/P, k_i), (k_i, r) with k_i = min(T/P, r)
    stacked = jax.lax.all_gather(r, axis)  # (P, k_i, r): every device's R
    p, k_i, n = stacked.shape
    q_s, R = jnp.linalg.qr(stacked.reshape(p * k_i, n))
    block = jax.lax.dynamic_slice_in_dim(q_s, jax.lax.axis_index(axis) * k_i, k_i, 0)
    return q, block, R


def _over_rows(local, G: Array, mesh: Mesh, axis: str) -> tuple[Array, Array]:
    """``local`` on each device's rows of G: its first output sharded by rows, its second the same on every device."""
    _check_rows(G.shape[0], mesh, axis, "G")
    spec = PartitionSpec(axis, None)
    return _shard_map(local, mesh, spec, (spec, PartitionSpec()))(G)


def tsqr(G: Array, mesh: Mesh, axis: str = "rows") -> tuple[Array, Array]:
    """G = Q R for a (T, r) G sharded by rows over ``axis``: Q (T, k) sharded like G, R (k, r) on every device.

    k = min(T, r). Backward stable (Householder QR twice), O(T r²/P) per device plus one
    all-gather of the devices' R factors (P · min(T/P, r) · r numbers)."""

    def local(g):
        q, block, R = _local_tsqr(g, axis)
        return q @ block, R

    return _over_rows(local, G, mesh, axis)


def thin_svd(G: Array, mesh: Mesh, axis: str = "rows") -> tuple[Array, Array]:
    """G = U diag(s) Wᵀ's (U, s) for G sharded by rows: U (T, k) sharded like G, s (k,) on every device.

    TSQR, then the SVD of the k × r R = U_R S W_Rᵀ on every device; U = diag(Q_i) (Q_s U_R), the
    small product first, so that each device makes one pass of O(T r²/P) over its rows."""

    def local(g):
        q, block, R = _local_tsqr(g, axis)
        u_r, sv, _ = jnp.linalg.svd(R, full_matrices=False)
        return q @ (block @ u_r), sv

    return _over_rows(local, G, mesh, axis)


@jax.tree_util.register_pytree_node_class
class ShardedLowRank:
    """M = G Gᵀ with G (T, r) sharded by rows over the mesh axis ``axis`` (see the module's docstring).

    The same M as :class:`kronlik.LowRank` (whose methods it shares, with its cotangent
    ShardedLowRank(∂L/∂G)); only the basis is computed by TSQR so that no device holds all of G.
    T must be a multiple of the axis' size (a ``ValueError`` at trace time otherwise).
    ``mesh`` and ``axis`` are static: they are part of the pytree's structure, not leaves.
    """

    def __init__(self, factor: Array, mesh: Mesh, axis: str = "rows"):
        self.factor, self.mesh, self.axis = factor, mesh, axis

    def tree_flatten(self):
        return (self.factor,), (self.mesh, self.axis)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def __repr__(self) -> str:
        shape, dtype = getattr(self.factor, "shape", "?"), getattr(self.factor, "dtype", "?")
        devices = dict(self.mesh.shape).get(self.axis, "?") if isinstance(self.mesh, Mesh) else "?"
        return f"ShardedLowRank(factor: {dtype} {shape}, axis={self.axis!r}, devices={devices})"

    def _plain(self) -> LowRank:
        return LowRank(self.factor)

    def arrays(self) -> dict[str, Array]:
        return self._plain().arrays()

    def rebuild(self, arrays: list[Array]) -> ShardedLowRank:
        """This form with its factor replaced (the list of :meth:`arrays`)."""
        return ShardedLowRank(arrays[0], self.mesh, self.axis)

    def check_shape(self, y_shape: tuple[int, int]) -> None:
        self._plain().check_shape(y_shape)
        _check_rows(self.factor.shape[0], self.mesh, self.axis, "a ShardedLowRank factor")

    def eigenbasis(self, eigh_dtype=None) -> Basis:
        u, sv = thin_svd(self.factor.astype(eigh_dtype or self.factor.dtype), self.mesh, self.axis)
        return singular_basis(u, sv, self.factor)

    def cotangent(self, basis: Basis, ct: MCotangent) -> ShardedLowRank:
        return ShardedLowRank(self._plain().cotangent(basis, ct).factor, self.mesh, self.axis)

    def dense(self) -> Array:
        return self._plain().dense()

    linear = False

    def matmul(self, X: Array) -> Array:
        return self._plain().matmul(X)

    def rotated(self, basis: Basis) -> Array:
        return self._plain().rotated(basis)

    def trace(self) -> Array:
        return self._plain().trace()

    def take(self, rows) -> LowRank:
        """The submatrix of M on ``rows`` (rows and columns) as a plain ``LowRank``: a subset of the rows need not
        split evenly over the devices any more."""
        return LowRank(self.factor[rows])
