"""Lower the RoIAlign kernels to Triton IR for a CUDA GPU, without one, and compile them if Triton
is installed: a native-compilation check that needs no GPU.

  python -m pallas_kernels.roi_align.triton_check [--out /tmp/roi_align_ttir] [--arch 90]

1. Lowers the forward and both backwards (atomic, deterministic) at the model's shapes (P2..P5 of
   2 x 800x1344, C = 256, 1024 RoIs; float32 and bfloat16; mmdet 7x7 adaptive and torchvision
   14x14 sampling_ratio 2) for the 'cuda' platform, and writes each Triton module (TTIR text) to
   --out. JAX >= 0.11 reads the GPU's compute capability while lowering: without a GPU an abstract
   H100 stands in.
2. If the `triton` Python package is importable, compiles each TTIR file for sm_<arch>
   (`triton.compile(path, target=GPUTarget('cuda', arch, 32))`) and runs its bundled `ptxas -v`
   on the PTX: registers, stack and spills per kernel.

XLA compiles the TTIR with the Triton bundled in jaxlib, which may differ from the pip package's
version (3.6.0 is the GPU machines' one), so step 2 is evidence, not proof, that impl='pallas'
compiles there. Done with jax 0.11.2 + triton 3.6.0 on a CPU machine (pallas_kernels/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import warnings


def _abstract_gpu(device_kind):
  import jax
  sharding = jax.sharding
  if jax.default_backend() == "gpu" or not hasattr(sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = sharding.AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu")
  return sharding.use_abstract_mesh(sharding.AbstractMesh((1,), ("x",), abstract_device=device))


def lower_all(out_dir, device_kind="NVIDIA H100 80GB HBM3"):
  """Writes one .ttir per kernel and configuration; returns [(path, num_stages, num_warps)]."""
  import jax
  import jax.numpy as jnp
  from jax._src.pallas.triton import pallas_call_registration as registration
  from pallas_kernels.roi_align import kernel

  captured = []
  original = registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    captured.append(result.module)
    return result

  os.makedirs(out_dir, exist_ok=True)
  written = []
  hw, k = (800, 1344), 1024
  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    for dtype in ("float32", "bfloat16"):
      feats = [jax.ShapeDtypeStruct((2, -(-hw[0] // s), -(-hw[1] // s), 256), jnp.dtype(dtype))
               for s in (4, 8, 16, 32)]
      boxes = jax.ShapeDtypeStruct((k, 4), jnp.float32)
      ints = jax.ShapeDtypeStruct((k,), jnp.int32)
      for sr, aligned, out, det in ((0, True, 7, False), (0, True, 7, True),
                                    (2, False, 14, False)):
        def loss(fs, b, i, l):
          pooled = kernel.pool_levels(fs, b, i, l, spatial_scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32],
                                      output_size=out, sampling_ratio=sr, aligned=aligned,
                                      max_grid=8, deterministic=det)
          return jnp.sum(pooled.astype(jnp.float32))
        first = len(captured)
        with warnings.catch_warnings():
          warnings.filterwarnings("ignore", "The Pallas Triton backend is deprecated")
          with _abstract_gpu(device_kind):
            jax.jit(jax.grad(loss)).trace(feats, boxes, ints, ints).lower(
                lowering_platforms=("cuda",))
        for module in captured[first:]:
          assert module.operation.verify()
          asm = module.operation.get_asm(enable_debug_info=False)
          name = re.search(r"tt\.func public @(\w+)", asm).group(1)
          path = os.path.join(out_dir, f"{name}_{dtype}_sr{sr}_out{out}.ttir")
          with open(path, "w") as f:
            f.write(asm)
          # The launch parameters kernel.py uses at C = 256 (CB * XB >= 512: 4 warps).
          written.append((path, 1 if name == "_bwd_band_kernel" else 2, 4))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
  return written


def compile_all(files, arch):
  try:
    import triton
    from triton.backends.compiler import GPUTarget
  except ImportError:
    print("triton not installed: TTIR written, not compiled")
    return
  ptxas = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
  print(f"triton {triton.__version__}, sm_{arch}")
  for path, stages, warps in files:
    compiled = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    ptx = path[:-5] + ".ptx"
    with open(ptx, "w") as f:
      f.write(compiled.asm["ptx"])
    report = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}",
                             "-v", ptx, "-o", ptx[:-4] + ".cubin"], capture_output=True, text=True)
    used = " ".join(line.split(":", 1)[-1].strip() for line in report.stderr.splitlines()
                    if "Used" in line or "spill" in line)
    print(f"{os.path.basename(path):<44} {'ok' if report.returncode == 0 else 'FAILED'}  {used}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="/tmp/roi_align_ttir")
  parser.add_argument("--arch", type=int, default=90)
  args = parser.parse_args()
  import jax
  print(f"jax {jax.__version__}")
  files = lower_all(args.out)
  print(f"{len(files)} Triton modules verified and written to {args.out}")
  compile_all(files, args.arch)


if __name__ == "__main__":
  main()
