# Sourced by the GPU scripts (gpu_bench.sh, nccl_check.sh) with W set to their work folder: TK, the
# tunekit binary (TUNEKIT, or device/tunekit, unpacked from device/tunekit.xz when it came
# compressed), and LD_LIBRARY_PATH with the CUDA libraries of PyTorch's wheels (cuBLAS, cuRAND,
# NVRTC, NCCL, the runtime); the driver comes from the system.
TK="${TUNEKIT:-device/tunekit}"
if [ -f "$TK.xz" ] && [ ! -x "$TK" ]; then
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$TK.xz" "$W/tunekit"
  chmod +x "$W/tunekit"; TK="$W/tunekit"
fi
LIBS=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for f in glob.glob(os.path.join(sp, "nvidia", "**", "lib", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$LIBS:${LD_LIBRARY_PATH:-}"
export PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1
