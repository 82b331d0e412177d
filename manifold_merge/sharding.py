"""Sharded merges: each block's parameter axis split over a device mesh, with ``jax.sharding``.

A merge is sharded by giving :func:`~manifold_merge.merge` a mesh (``mesh=8`` for 8 devices, or
a :class:`jax.sharding.Mesh` with an axis named :data:`PARAM_AXIS`). Every floating-point leaf
is then split along its leading axis over the mesh (:func:`leaf_spec`), which is the parameter
axis of each block for ``granularity="tensor"`` and ``"column"`` (and the block axis for
``"row"``); the result stays split the same way until it is written.

The merge kernels are ordinary jitted JAX: XLA's SPMD partitioner turns the reductions over a
split axis (norms, inner products, the Karcher iteration's sums, TIES' threshold counts) into
local partial sums plus an all-reduce, and keeps the elementwise work local. The two places
where that is not enough use :func:`over_parameter_axis`, an explicit ``jax.shard_map``:

* the Gram-space Karcher solver's pass 1 (a blocked loop over columns): each device computes
  the Gram of its own columns and a ``psum`` adds them; the N-dimensional solve runs replicated
  and pass 2 is a local weighted sum;
* TIES' tie-break at the magnitude threshold, which ranks tied entries in index order: a
  cumulative count, offset by the counts of the devices before.

LoRA adapters: ``b`` (m, r) is split along m and ``a`` (r, n) along n; the core-space QR of the
stacked factors is a TSQR (local QRs, one small QR of the stacked R factors), so only
(N r) x (N r) matrices are ever replicated.

Several hosts: call :func:`initialize` (``jax.distributed.initialize``) first in every process;
:func:`make_mesh` then spans the devices of all hosts, and each host reads and writes only the
slices its devices hold (see ``docs/scaling.md``).

Example:
    >>> import numpy as np
    >>> from manifold_merge import merge
    >>> models = [{"w": np.full((8, 4), float(i), np.float32)} for i in range(3)]
    >>> out = merge("linear", models, mesh=1).params["w"]  # doctest: +SKIP
    >>> # on 8 devices, each holds one row: 8 x (1, 4)
    >>> [s.data.shape for s in out.addressable_shards]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: Name of the mesh axis the parameter axis is split over.
PARAM_AXIS = "params"

#: What the kernel being traced has split: (mesh, kind, lengths), kind "block" (the last axis
#: of a merge block's arrays) or "lora" (the long axes of LoRA factors), ``lengths`` the sizes
#: of the split axes (an axis of another size is not split); None: nothing.
_SPLIT: contextvars.ContextVar[tuple[Mesh, str, frozenset] | None] = contextvars.ContextVar(
    "mm_split", default=None
)
KINDS = ("block", "lora")


def make_mesh(devices: int | Sequence[jax.Device] | Mesh | None = None) -> Mesh:
    """A 1-D mesh with axis :data:`PARAM_AXIS` (automatic sharding: XLA partitions the ops).

    Args:
        devices: a device count (the first that many of ``jax.devices()``, which spans every
            host after :func:`initialize`), a list of devices, a ``Mesh`` (returned as is if it
            has a :data:`PARAM_AXIS` axis) or None for all devices.

    Example:
        >>> make_mesh(1).shape
        OrderedDict([('params', 1)])
    """
    if isinstance(devices, Mesh):
        if PARAM_AXIS not in devices.axis_names:
            raise ValueError(
                f"the mesh needs an axis named {PARAM_AXIS!r}, got axes {devices.axis_names}"
            )
        return devices
    available = jax.devices()
    if devices is None:
        chosen = available
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"asked for {devices} devices, but JAX sees {len(available)} "
                f"({available[0].platform}); on a CPU, simulate more with XLA_FLAGS="
                f"--xla_force_host_platform_device_count={devices} (set before JAX starts)"
            )
        chosen = available[:devices]
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("make_mesh needs at least one device")
    return jax.make_mesh(
        (len(chosen),), (PARAM_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=chosen
    )


def mesh_size(mesh: Mesh) -> int:
    """Number of devices along :data:`PARAM_AXIS`."""
    return int(mesh.shape[PARAM_AXIS])


def leaf_spec(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """How a leaf of ``shape`` is laid out on ``mesh``: split along its leading axis when that
    divides evenly, else replicated (scalars, odd vocabularies: flatten such a tensor first to
    split it, as ``manifold-merge merge --devices`` does for ``granularity="tensor"``).

    Example:
        >>> leaf_spec((4096, 1024), make_mesh(1))
        P('params', None)
    """
    size = mesh_size(mesh)
    if len(shape) == 0 or shape[0] % size != 0 or shape[0] < size:
        return PartitionSpec()
    return PartitionSpec(PARAM_AXIS, *([None] * (len(shape) - 1)))


def place(x, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    """``x`` as a global array laid out by ``spec`` on ``mesh``. A JAX array already laid out
    so is returned as is; anything else is sliced on the host, each device receiving only its
    own slice (``jax.make_array_from_callback``: on several hosts, each fills its own
    devices)."""
    sharding = NamedSharding(mesh, spec)
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return jax.device_put(x, sharding)
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])


@contextlib.contextmanager
def split_parameter_axis(mesh: Mesh | None, kind: str, lengths: Sequence[int] = ()):
    """While tracing a merge kernel: ``kind="block"``, the parameter axis of the merge block
    (of length ``lengths[0]``) is split over ``mesh``'s :data:`PARAM_AXIS`; ``"lora"``, the m
    axis of the LoRA factors ``b`` and the n axis of ``a`` are (``lengths = (m, n)``); None:
    nothing is split. Set by the merge kernels, read by :func:`over_parameter_axis`; the mesh
    is one of the kernels' static arguments, so compiled programs are cached per mesh."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    token = _SPLIT.set(None if mesh is None else (mesh, kind, frozenset(lengths)))
    try:
        yield
    finally:
        _SPLIT.reset(token)


def split_mesh(kind: str, length: int) -> Mesh | None:
    """The mesh splitting the ``kind`` axes of the kernel being traced, if an axis of
    ``length`` is one of them; else None."""
    current = _SPLIT.get()
    if current is None or current[1] != kind or length not in current[2]:
        return None
    return current[0]


def over_parameter_axis(
    fn: Callable,
    *arrays,
    replicated: bool | tuple[bool, ...],
    kind: str = "block",
    check_replication: bool = True,
):
    """``fn(axis, *arrays)`` on each device's slice of the parameter (last) axis.

    Unsplit (no :func:`split_parameter_axis` in effect) this is ``fn(None, *arrays)`` on the
    whole arrays. Split, it runs under ``jax.shard_map`` with ``axis`` = :data:`PARAM_AXIS`:
    ``fn`` sees its device's columns and combines across devices with :func:`psum`,
    :func:`axis_offset` or other ``jax.lax`` collectives. ``replicated=True``: the result is
    the same on every device (after a ``psum``); False: it is split along its last axis like
    the inputs; a tuple gives one flag per output of ``fn``. ``kind``: which split applies
    (see :func:`split_parameter_axis`). ``check_replication=False`` skips shard_map's proof
    that replicated outputs are (needed after linear algebra on gathered values, which it
    cannot follow).
    """
    mesh = split_mesh(kind, arrays[0].shape[-1])
    if mesh is None:
        return fn(None, *arrays)

    def spec(ndim):
        return PartitionSpec(*([None] * (ndim - 1)), PARAM_AXIS)

    def out_spec(flag):
        return PartitionSpec() if flag else spec(arrays[0].ndim)

    if isinstance(replicated, tuple):
        outs = tuple(map(out_spec, replicated))
    else:
        outs = out_spec(replicated)
    mapped = jax.shard_map(
        functools.partial(fn, PARAM_AXIS),
        mesh=mesh,
        in_specs=tuple(spec(a.ndim) for a in arrays),
        out_specs=outs,
        check_vma=check_replication,
    )
    return mapped(*arrays)


def psum(x, axis: str | None):
    """The sum of ``x`` over the devices along ``axis`` (``x`` itself when ``axis`` is None)."""
    return x if axis is None else jax.lax.psum(x, axis)


def axis_offset(count, axis: str | None):
    """Exclusive prefix sum of a per-device ``count`` along ``axis``: what the devices before
    this one hold (0 when ``axis`` is None). ``count`` may be an array; summed per entry."""
    if axis is None:
        return jnp.zeros_like(count)
    counts = jax.lax.all_gather(count, axis)  # (devices, ...)
    before = jnp.arange(counts.shape[0]) < jax.lax.axis_index(axis)
    before = before.reshape((-1,) + (1,) * (counts.ndim - 1))
    return jnp.sum(jnp.where(before, counts, 0), axis=0).astype(count.dtype)


#: Environment variables :func:`initialize` reads when no argument is given.
ENV_COORDINATOR = "MM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MM_NUM_PROCESSES"
ENV_PROCESS_ID = "MM_PROCESS_ID"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join a multi-host job: ``jax.distributed.initialize`` with these arguments, falling back
    to the environment variables ``MM_COORDINATOR_ADDRESS``, ``MM_NUM_PROCESSES`` and
    ``MM_PROCESS_ID``. With none of them set anywhere, JAX's own cluster detection runs (Cloud
    TPU pods, SLURM, Open MPI, Kubernetes JobSets need no arguments). Call it once per process,
    before any other JAX call."""
    address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
