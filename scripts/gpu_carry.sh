#!/usr/bin/env bash
# Here (CPU machine, with internet to the package registries): build .gpu/, the folder a lent GPU
# run carries. The device's image has torch, accelerate, scikit-image, tifffile, typer, rich, pytest
# and more, but not diffusers, kornia or imagecodecs, and it reaches no registry. The travelling
# tree is capped at 64 MiB and the repository is ~56 MB, so .gpu/ holds only:
#   * diffusers (this venv's version) and importlib_metadata, as wheels;
#   * kornia 0.7.0 (the newest kornia that does not need the 5 MB kornia_rs; the studio's colour
#     code passes its tests on it);
#   * imagecodecs pruned to the codecs the samples and slide jobs use (JPEG 8, zlib, deflate),
#     1.7 MB as a tarball instead of the 27 MB wheel.
# Then: device run with carry [".gpu"] and command `bash scripts/gpu_session.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.gpu
rm -rf "$DEST" && mkdir -p "$DEST"
dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
         -d "$1" "$2" 2>&1 | grep -v "^WARNING: Location" || true; }
diffusers=$("$PY" -c "import diffusers; print(diffusers.__version__)")
imagecodecs=$("$PY" -c "import imagecodecs; print(imagecodecs.__version__)")
dl "$DEST" "diffusers==$diffusers"
dl "$DEST" importlib_metadata
dl "$DEST" kornia==0.7.0
tmp=$(mktemp -d)
dl "$tmp" "imagecodecs==$imagecodecs"
(cd "$tmp" && python3 -m zipfile -e imagecodecs-*.whl unpacked)
keep="$tmp/keep" && mkdir -p "$keep/imagecodecs" "$keep/imagecodecs.libs"
src="$tmp/unpacked"
cp "$src"/imagecodecs/{__init__.py,_imagecodecs.py,imagecodecs.py,_shared.abi3.so,_shared_cython.abi3.so} "$keep/imagecodecs/"
cp "$src"/imagecodecs/{_jpeg8.abi3.so,_zlib.abi3.so,_deflate.abi3.so} "$keep/imagecodecs/"
cp -r "$src"/imagecodecs/licenses "$keep/imagecodecs/"
cp "$src"/imagecodecs.libs/libjpeg-*.so* "$src"/imagecodecs.libs/libdeflate-*.so* "$keep/imagecodecs.libs/"
tar czf "$DEST/imagecodecs-pruned.tgz" -C "$keep" .
rm -rf "$tmp"
ls -la "$DEST"
total=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -sb "$DEST" | cut -f1) ))
echo "tree + $DEST: $(( total / 1048576 )) MiB of the 64 MiB a device run carries"
test "$total" -lt $(( 64 * 1048576 )) || { echo "too large to carry" >&2; exit 1; }
