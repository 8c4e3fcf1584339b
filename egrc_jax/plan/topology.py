"""Named TPU slices -> compile-only devices of libtpu's topology API, and each chip's peaks.

    slice_spec("v4-32")  ->  Slice(kind="v4", chips=16, topology="v4:2x2x4", chip_config="megacore")
    topology_devices(slice_spec("v5e-8"))  ->  8 compile-only `TPU v5 lite` devices

Users name slices as Cloud TPU does: v4 and v5p names count TensorCores (two per chip; JAX
sees one "megacore" device per chip), v5e (v5litepod) and v6e names count chips. Nothing
here needs a TPU: `jax.experimental.topologies.get_topology_desc` asks libtpu (the `aot`
extra: `pip install -e ".[aot]"`) for the devices of a topology, and `jax.jit(f).lower(...)
.compile()` on a mesh of them runs the real TPU compiler on this host. JAX keeps CPU as its
default backend for everything else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

AOT_EXTRA = 'pip install -e ".[aot]"  (jax[tpu]==0.10.2: libtpu, the TPU compiler)'


# Per-chip peaks from Google's public Cloud TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): peak bf16 FLOP/s, HBM bytes/s, HBM GiB.
#   v4:  275 TFLOP/s, 32 GiB HBM2 at 1200 GB/s (two TensorCores = one megacore device)
#   v5e: 197 TFLOP/s, 16 GB HBM2 at 819 GB/s
#   v5p: 459 TFLOP/s, 95 GB HBM2e at 2765 GB/s (two TensorCores = one megacore device)
#   v6e: 918 TFLOP/s, 32 GB HBM at 1640 GB/s (the page's table says 1638 GBps)
@dataclasses.dataclass(frozen=True)
class ChipPeaks:
  bf16_flops: float  # FLOP/s
  hbm_bandwidth: float  # bytes/s
  hbm_gib: float  # nominal capacity (the compiler reports a little less as available)


CHIP_PEAKS: dict[str, ChipPeaks] = {
  "v4": ChipPeaks(275e12, 1200e9, 32),
  "v5e": ChipPeaks(197e12, 819e9, 16),
  "v5p": ChipPeaks(459e12, 2765e9, 95),
  "v6e": ChipPeaks(918e12, 1640e9, 32),
}

# Chips -> topology shape. v4 / v5p are 3-D tori (AxBxC), v5e / v6e 2-D (AxB).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}  # fmt: skip
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}  # fmt: skip
# kind -> (topology prefix, chip_config_name, slice-name unit: cores or chips per name count)
_KINDS = {
  "v4": ("v4", "megacore", 2),
  "v5p": ("v5p", "megacore", 2),
  "v5e": ("v5e", None, 1),
  "v6e": ("v6e", None, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as the user wrote it, e.g. "v4-32"
  kind: str  # a key of CHIP_PEAKS
  chips: int  # JAX devices
  topology: str  # libtpu topology name, e.g. "v4:2x2x4"
  chip_config: str | None  # "megacore" for v4 / v5p

  @property
  def peaks(self) -> ChipPeaks:
    return CHIP_PEAKS[self.kind]


def known_slices() -> list[str]:
  names = []
  for kind, (_, _, unit) in _KINDS.items():
    shapes = _SHAPES_3D if unit == 2 else _SHAPES_2D
    names += [f"{kind}-{chips * unit}" for chips in shapes]
  return names


def slice_spec(name: str) -> Slice:
  """'v4-32' | 'v5p-16' | 'v5e-8' | 'v5litepod-8' | 'v6e-8' -> Slice."""
  m = re.fullmatch(r"\s*(v4|v5p|v5e|v5litepod|v5lite|v6e)-(\d+)\s*", name.lower())
  kind = _ALIASES.get(m.group(1), m.group(1)) if m else None
  if kind is not None:
    prefix, chip_config, unit = _KINDS[kind]
    count = int(m.group(2))
    shapes = _SHAPES_3D if unit == 2 else _SHAPES_2D
    if count % unit == 0 and count // unit in shapes:
      chips = count // unit
      return Slice(name, kind, chips, f"{prefix}:{shapes[chips]}", chip_config)
  raise ValueError(
    f"unknown TPU slice {name!r}; known slices: {', '.join(known_slices())} (v4/v5p names"
    " count TensorCores, two per chip; v5e (alias v5litepod) and v6e names count chips)"
  )


def _offline_env() -> None:
  # libtpu must never ask a cloud metadata server for its topology (nothing may leave the
  # host); it then also needs a worker hostname to stop it guessing one.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Compile-only use touches no chip: let several processes (test workers, other users of
  # this host) load libtpu at once instead of failing on its /tmp/libtpu_lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@functools.lru_cache(maxsize=16)
def topology_devices(spec: Slice) -> tuple:
  """The slice's compile-only TPU devices (one per chip), from libtpu; nothing allocated."""
  _offline_env()
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise RuntimeError(
      f"compiling for TPU slice {spec.name} needs libtpu, which is not installed: {AOT_EXTRA}"
    ) from None
  from jax.experimental import topologies

  kw = {"chip_config_name": spec.chip_config} if spec.chip_config else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology, **kw)
  except Exception as e:  # libtpu raises JaxRuntimeError / RuntimeError with its own text
    raise RuntimeError(
      f"libtpu could not describe topology {spec.topology!r} (slice {spec.name},"
      f" chip_config_name={spec.chip_config!r}): {e}"
    ) from e
  devices = tuple(desc.devices)
  if len(devices) != spec.chips:
    raise RuntimeError(
      f"topology {spec.topology} has {len(devices)} devices, expected {spec.chips} chips"
    )
  return devices


_HBM_RE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_USED_RE = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> tuple[int, int] | None:
  """(required, available) bytes per device from the TPU compiler's out-of-HBM error, e.g.
  'the total memory required for HLO temporaries (157.22G) exceeds available HBM (30.75G)'
  (its 'temporaries' figure is arguments + outputs + temporaries), or 'Used 40.5G of 15.48G
  hbm'. None when the message is not one of these."""
  m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
  h = _HBM_RE.search(message)
  if m and h:
    return int(float(m[1]) * _UNIT[m[2]]), int(float(h[1]) * _UNIT[h[2]])
  u = _USED_RE.search(message)
  if u:
    return int(float(u[1]) * _UNIT[u[2]]), int(float(u[3]) * _UNIT[u[4]])
  return None


@functools.lru_cache(maxsize=16)
def available_hbm_bytes(spec: Slice) -> int:
  """HBM the compiler lets one program use on one chip of this kind (v4: 30.75 GiB of 32).

  Asked of the compiler itself: a program that needs 1 TiB per device is compiled and the
  'exceeds available HBM (...)' figure of its refusal is read back (about a second)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  devices = topology_devices(spec)
  mesh = Mesh(np.array(devices[:1]), ("x",))
  x = jax.ShapeDtypeStruct((2**18, 2**20), jnp.float32, sharding=NamedSharding(mesh, P()))
  try:
    jax.jit(lambda a: jnp.exp(a) + a[::-1]).lower(x).compile()
  except Exception as e:
    parsed = parse_oom(str(e))
    if parsed:
      return parsed[1]
    raise RuntimeError(f"could not read the available HBM of {spec.name} from: {e}") from e
  # A chip with more than 1 TiB free: fall back to the nominal capacity.
  return int(spec.peaks.hbm_gib * 2**30)


def slice_mesh(spec: Slice, data: int, fsdp: int, tensor: int):
  """The run's (data, fsdp, tensor) mesh over the slice's devices; one axis may be -1."""
  from egrc_jax.sharding import make_mesh

  shape = [data, fsdp, tensor]
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if spec.chips % known:
      raise ValueError(
        f"mesh data={data}, fsdp={fsdp}, tensor={tensor} does not divide the {spec.chips} chips"
        f" of {spec.name}; set mesh.* so the product divides it"
      )
  return make_mesh(data, fsdp, tensor, devices=topology_devices(spec))
