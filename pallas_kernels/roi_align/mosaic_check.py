"""Lower the Mosaic GPU RoIAlign kernels for a CUDA GPU (sm_90) without one, as far as JAX goes.

  python -m pallas_kernels.roi_align.mosaic_check [--out /tmp/roi_align_mosaic]

Lowers the forward and both backwards (atomic, deterministic) at the model's shapes (P2..P5 of
2 x 800x1344, C = 256, 1024 RoIs; float32 and bfloat16; mmdet 7x7 adaptive and torchvision 14x14
sampling_ratio 2) with `jax.jit(...).trace(...).lower(lowering_platforms=('cuda',))`. For every
kernel this runs the Python half of the Mosaic GPU compiler: the Pallas jaxpr is lowered to an
MLIR module (gpu / nvvm / llvm / memref / vector / scf ops) for compute capability 9.0 (the
`mosaic_gpu.arch_major` / `arch_minor` attributes pick the Hopper code paths; without a device JAX
assumes 9.0), which is verified by MLIR and serialized into the StableHLO as a `mosaic_gpu_v2`
custom call. The PTX target (sm_90a on a Hopper GPU) is chosen by the jaxlib CUDA plugin from the
device when it compiles the module. Each module is written to --out and summarized: the widths of its
vector loads and stores, and its atomic reductions (`red.relaxed.gpu.add.f32`).

What this cannot do without a GPU: the rest of the pipeline (MLIR -> LLVM -> PTX -> ptxas cubin)
runs inside the jaxlib CUDA plugin when XLA compiles the custom call for a device (jaxlib
`mosaic/gpu/custom_call.cc`); it has no Python entry point, and jaxlib's CPU build registers none
of the conversion passes (`convert-arith-to-llvm`, `convert-gpu-to-nvvm`, ...). So registers,
spills and the SASS are unknown until a GPU compiles the kernels (scripts/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re


@contextlib.contextmanager
def capture_modules():
  """Collects the MLIR text of every Mosaic GPU module lowered inside the block."""
  from jax.experimental.mosaic.gpu import core as mgpu_core
  texts = []
  original = mgpu_core._mosaic_gpu_lowering_rule  # pylint: disable=protected-access

  def capture(ctx, *args, module, **kwargs):
    assert module.operation.verify()
    texts.append(module.operation.get_asm(enable_debug_info=False))
    return original(ctx, *args, module=module, **kwargs)

  mgpu_core._mosaic_gpu_lowering_rule = capture  # pylint: disable=protected-access
  try:
    yield texts
  finally:
    mgpu_core._mosaic_gpu_lowering_rule = original  # pylint: disable=protected-access


def summarize(text: str) -> dict:
  """Vector memory accesses and atomics of one module's MLIR text."""
  loads = sorted(set(re.findall(r"vector\.load .*?vector<(\d+x\w+)>", text)))
  stores = sorted(set(re.findall(r"vector\.store .*?vector<(\d+x\w+)>", text)))
  return dict(vector_loads=loads, vector_stores=stores,
              atomic_adds=len(re.findall(r"red\.[a-z.]*add\.f32", text)),
              arch=re.findall(r"mosaic_gpu\.arch_major = (\d+)", text)[:1])


def lower(features, boxes, batch_idx, levels, *, spatial_scales, output_size, sampling_ratio,
          aligned, max_grid, deterministic):
  """Lowers jax.grad of the pooled sum (the forward and one backward) for CUDA; returns
  (StableHLO text, [Mosaic GPU module texts]). Arguments: arrays or ShapeDtypeStructs."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.roi_align import kernel

  def loss(fs, b, i, l):
    pooled = kernel.pool_levels(fs, b, i, l, spatial_scales=spatial_scales,
                                output_size=output_size, sampling_ratio=sampling_ratio,
                                aligned=aligned, max_grid=max_grid, deterministic=deterministic,
                                lowering="mosaic")
    return jnp.sum(pooled.astype(jnp.float32))

  with capture_modules() as texts:
    lowered = jax.jit(jax.grad(loss)).trace(features, boxes, batch_idx, levels).lower(
        lowering_platforms=("cuda",))
  return lowered.as_text(), list(texts)


def lower_all(out_dir):
  """Writes one .mlir per kernel and configuration; returns [(path, summary)]."""
  import jax
  import jax.numpy as jnp
  os.makedirs(out_dir, exist_ok=True)
  hw, k = (800, 1344), 1024
  written = []
  for dtype in ("float32", "bfloat16"):
    feats = [jax.ShapeDtypeStruct((2, -(-hw[0] // s), -(-hw[1] // s), 256), jnp.dtype(dtype))
             for s in (4, 8, 16, 32)]
    boxes = jax.ShapeDtypeStruct((k, 4), jnp.float32)
    ints = jax.ShapeDtypeStruct((k,), jnp.int32)
    for sr, aligned, out, det in ((0, True, 7, False), (0, True, 7, True), (2, False, 14, False)):
      hlo, texts = lower(feats, boxes, ints, ints, spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
                         output_size=out, sampling_ratio=sr, aligned=aligned, max_grid=8,
                         deterministic=det)
      assert hlo.count("mosaic_gpu_v2") == 2, "expected a forward and a backward kernel"
      for name, text in zip(("fwd", "bwd_band" if det else "bwd_atomic"), texts):
        path = os.path.join(out_dir, f"{name}_{dtype}_sr{sr}_out{out}.mlir")
        with open(path, "w") as f:
          f.write(text)
        written.append((path, summarize(text)))
  return written


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/roi_align_mosaic")
  args = parser.parse_args()
  import jax
  print(f"jax {jax.__version__}, backend {jax.default_backend()}")
  for path, s in lower_all(args.out):
    print(f"{os.path.basename(path):<34} verified; sm_{s['arch'][0] if s['arch'] else '?'}0; "
          f"loads {','.join(s['vector_loads'])}; stores {','.join(s['vector_stores']) or '-'}; "
          f"atomic adds {s['atomic_adds']}")
  print(f"modules written to {args.out}; MLIR -> PTX needs a GPU (module docstring)")


if __name__ == "__main__":
  main()
