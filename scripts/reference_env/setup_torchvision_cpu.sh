#!/usr/bin/env bash
# Recreate the torch-CPU + torchvision reference environment used by
# scripts/make_parity_fixtures.py (NOT run by CI; CI has no torch).
#
# Why this is needed
#   * `pip install torch==2.13.0` gives the CPU build (torch-2.13.0+cpu).
#   * torchvision 0.28.0 (the only release built for torch 2.13) exists on the
#     registry only as a CUDA build (version string 0.28.0+cu130). Its compiled
#     extension torchvision/_C.so has DT_NEEDED entries on libc10_cuda.so,
#     libtorch_cuda.so and libcudart.so.13, which the CPU torch does not ship, so
#     `import torchvision` fails ("operator torchvision::nms does not exist").
#   * The CUDA symbols in _C.so are only reached by the CUDA kernels (never
#     called on CPU) and by the static constructors that register the CUDA
#     fat binaries (__cudaRegisterFatBinary & co, called at dlopen time).
#     So we build three tiny stand-in shared libraries that define exactly the
#     symbols _C.so imports from them:
#       - the fat-binary registration functions are harmless no-ops;
#       - every other function aborts loudly if it were ever called;
#       - libcudart's symbols carry the version node `libcudart.so.13`, because
#         _C.so imports them versioned (cudaGetLastError@libcudart.so.13).
#     and point _C.so's RPATH (a CI path from the wheel build) at their folder
#     with patchelf, so no LD_LIBRARY_PATH is needed.
#   Result: torchvision's own CPU kernels (nms, roi_align, ...) and all of
#   torchvision.models.detection run on CPU, bit-for-bit the registry wheel.
#
# Usage:  bash scripts/reference_env/setup_torchvision_cpu.sh [VENV_DIR]
#         (default VENV_DIR=/work/tvenv; must be outside the repository)
set -euo pipefail

VENV=${1:-/work/tvenv}
PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  $PY -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install torch==2.13.0                       # CPU wheel (torch-2.13.0+cpu)
"$PIP" install --no-deps torchvision==0.28.0       # CUDA build; deps would pull CUDA torch
"$PIP" install numpy scikit-image pillow pycocotools patchelf

SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TVC="$SP/torchvision/_C.so"
STUBS="$SP/torchvision_cuda_stubs"
mkdir -p "$STUBS"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Show what _C.so imports that the CPU torch/libstdc++/libc do not provide (for the record).
echo "== CUDA-side imports of torchvision/_C.so:"
nm -D --undefined-only "$TVC" | grep -E 'cuda|Cuda|CUDA' || true

# ---------------------------------------------------------------- libcudart.so.13
cat > "$WORK/cudart_stub.c" <<'EOF'
/* Stand-in for libcudart.so.13: only what torchvision/_C.so imports. */
#include <stdio.h>
#include <stdlib.h>
static void die(const char *f) {
  fprintf(stderr, "torchvision CUDA stub called: %s (no CUDA in this CPU environment)\n", f);
  abort();
}
/* Fat-binary registration: called by _C.so's static constructors at load time. */
static void *fake_handle[4];
void **__cudaRegisterFatBinary(void *fatCubin) { (void)fatCubin; return fake_handle; }
void __cudaRegisterFatBinaryEnd(void **h) { (void)h; }
void __cudaUnregisterFatBinary(void **h) { (void)h; }
void __cudaRegisterFunction(void **h, const char *hf, char *df, const char *dn, int tl,
                            void *tid, void *bid, void *bd, void *gd, int *ws) {
  (void)h; (void)hf; (void)df; (void)dn; (void)tl; (void)tid; (void)bid; (void)bd; (void)gd; (void)ws;
}
void __cudaRegisterVar(void **h, char *hv, char *dv, const char *dn, int ext, size_t size,
                       int constant, int global) {
  (void)h; (void)hv; (void)dv; (void)dn; (void)ext; (void)size; (void)constant; (void)global;
}
char __cudaInitModule(void **h) { (void)h; return 0; }
/* Everything below is only reached from CUDA kernels / CUDA code paths. */
#define DIE(name) int name(void) { die(#name); return 1; }
DIE(__cudaGetKernel)
DIE(__cudaLaunchKernel)
DIE(__cudaPopCallConfiguration)
DIE(__cudaPushCallConfiguration)
DIE(cudaDeviceSynchronize)
DIE(cudaEventCreateWithFlags)
DIE(cudaEventDestroy)
DIE(cudaEventElapsedTime)
DIE(cudaEventQuery)
DIE(cudaEventRecord)
DIE(cudaEventSynchronize)
DIE(cudaGetLastError)
DIE(cudaStreamIsCapturing)
DIE(cudaStreamWaitEvent)
const char *cudaGetErrorString(int e) { (void)e; return "cuda stub: no CUDA"; }
EOF
# _C.so needs the symbols under version node "libcudart.so.13".
printf 'libcudart.so.13 { global: *; };\n' > "$WORK/cudart.map"
gcc -shared -fPIC -O1 -o "$STUBS/libcudart.so.13" -Wl,-soname,libcudart.so.13 \
    -Wl,--version-script="$WORK/cudart.map" "$WORK/cudart_stub.c"

# ---------------------------------------------------------------- libc10_cuda.so
# C++ symbols are defined through their mangled names (valid C identifiers).
cat > "$WORK/c10_cuda_stub.c" <<'EOF'
/* Stand-in for libc10_cuda.so: c10::cuda::* imported by torchvision/_C.so. */
#include <stdio.h>
#include <stdlib.h>
static void die(const char *f) {
  fprintf(stderr, "torchvision CUDA stub called: %s (no CUDA in this CPU environment)\n", f);
  abort();
}
#define DIE(name) void name(void) { die(#name); }
DIE(_ZN3c104cuda12device_countEv)                              /* c10::cuda::device_count() */
DIE(_ZN3c104cuda14ExchangeDeviceEa)                            /* ExchangeDevice(signed char) */
DIE(_ZN3c104cuda14MaybeSetDeviceEa)                            /* MaybeSetDevice(signed char) */
DIE(_ZN3c104cuda17getStreamFromPoolEba)                        /* getStreamFromPool(bool, signed char) */
DIE(_ZN3c104cuda17getStreamFromPoolEia)                        /* getStreamFromPool(int, signed char) */
DIE(_ZN3c104cuda20getCurrentCUDAStreamEa)                      /* getCurrentCUDAStream(signed char) */
DIE(_ZN3c104cuda20getDefaultCUDAStreamEa)                      /* getDefaultCUDAStream(signed char) */
DIE(_ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE)      /* setCurrentCUDAStream(CUDAStream) */
DIE(_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb)     /* c10_cuda_check_implementation(...) */
DIE(_ZN3c104cuda9GetDeviceEPa)                                 /* GetDevice(signed char*) */
DIE(_ZN3c104cuda9SetDeviceEab)                                 /* SetDevice(signed char, bool) */
DIE(_ZNK3c104cuda10CUDAStream11synchronizeEv)                  /* CUDAStream::synchronize() const */
DIE(_ZNK3c104cuda10CUDAStream5queryEv)                         /* CUDAStream::query() const */
DIE(_ZNK3c104cuda10CUDAStream6streamEv)                        /* CUDAStream::stream() const */
/* c10::cuda::CUDACachingAllocator::allocator: a std::atomic<CUDAAllocator*> object. */
void *_ZN3c104cuda20CUDACachingAllocator9allocatorE = 0;
EOF
gcc -shared -fPIC -O1 -o "$STUBS/libc10_cuda.so" -Wl,-soname,libc10_cuda.so "$WORK/c10_cuda_stub.c"

# ---------------------------------------------------------------- libtorch_cuda.so
cat > "$WORK/torch_cuda_stub.c" <<'EOF'
/* Stand-in for libtorch_cuda.so: at::cuda::getCurrentDeviceProperties(). */
#include <stdio.h>
#include <stdlib.h>
void _ZN2at4cuda26getCurrentDevicePropertiesEv(void) {
  fprintf(stderr, "torchvision CUDA stub called: at::cuda::getCurrentDeviceProperties\n");
  abort();
}
EOF
gcc -shared -fPIC -O1 -o "$STUBS/libtorch_cuda.so" -Wl,-soname,libtorch_cuda.so "$WORK/torch_cuda_stub.c"

# Point _C.so at the stubs (its RPATH was the wheel builder's conda env).
"$VENV/bin/patchelf" --set-rpath '$ORIGIN/../torchvision_cuda_stubs' "$TVC"

# Check that nothing is left unresolved.
echo "== ldd of _C.so (torch libs show as 'not found' here; they are loaded by torch first):"
ldd "$TVC" | grep -E 'cuda|not found' || true

"$VENV/bin/python" - <<'EOF'
import torch, torchvision
from torchvision.ops import nms, roi_align
b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
print("nms:", nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist())
f = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
print("roi_align:", roi_align(f, [b[:1]], output_size=2, spatial_scale=0.5, sampling_ratio=2).flatten().tolist())
m = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
with torch.no_grad():
    out = m([torch.rand(3, 64, 80)])
print("maskrcnn ok:", {k: tuple(v.shape) for k, v in out[0].items()})
print("torch", torch.__version__, "torchvision", torchvision.__version__)
EOF
