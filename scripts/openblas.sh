# Sourced by the other scripts. On Linux, MLX's CPU build bundles a reference BLAS that is ~30x
# slower than Debian's OpenBLAS for float32. Use OpenBLAS when it is there; install it when we can
# (root with apt-get), saying so first; otherwise say how. MLX_GEMMA_TUNE_APT=0 never installs
# anything. Nothing happens on macOS, where MLX uses the Metal GPU.
if [ "$(uname)" = Linux ]; then
  OPENBLAS=/usr/lib/x86_64-linux-gnu/libopenblas.so.0
  [ "$(uname -m)" = aarch64 ] && OPENBLAS=/usr/lib/aarch64-linux-gnu/libopenblas.so.0
  if [ ! -e "$OPENBLAS" ] && [ "${MLX_GEMMA_TUNE_APT:-1}" != 0 ] && [ "$(id -u)" = 0 ] \
     && command -v apt-get >/dev/null 2>&1; then
    echo "note: installing Debian's OpenBLAS for ~30x faster MLX on the CPU:" \
         "apt-get install libopenblas0-pthread (MLX_GEMMA_TUNE_APT=0 skips this)" >&2
    apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
      || echo "note: apt-get could not install libopenblas0-pthread; going on without it" >&2
  fi
  if [ -e "$OPENBLAS" ]; then
    export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
  else
    echo "note: MLX will use its slow reference BLAS; for ~30x faster CPU training run" \
         "'sudo apt install libopenblas0-pthread' and try again" >&2
  fi
fi
