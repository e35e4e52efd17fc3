#!/usr/bin/env bash
# Fills .whl/ with what benchmarks/gpu_check.sh needs and a bare CUDA machine lacks, for that machine's
# Python 3.12 on x86-64 (its image has torch, torchvision, numpy, scipy, OpenCV, scikit-image, pyarrow,
# safetensors, click and pytest, but no lpips, dlib or defusedxml). Run it once where PyPI is reachable,
# then take .whl/ along with the repository (it is not committed):
#
#   bash benchmarks/gpu_wheels.sh
#
# With STITCHTIME_REFERENCE set to a copy of stylegan2-ada-pytorch's source, its packages (dnnlib,
# torch_utils, training) and licence go to .whl/stylegan2-ada-pytorch too, where gpu_check.sh finds them.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir .whl
# lpips: PTI's loss (benchmarks and tests); dlib-bin and defusedxml: imported by the modules that the
# gpu-marked tests' fixtures load. Their own dependencies are all in the image. One version of each.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl lpips==0.1.4 dlib-bin==20.0.1.post1 defusedxml==0.7.1
if [ -n "${STITCHTIME_REFERENCE:-}" ]; then
    mkdir .whl/stylegan2-ada-pytorch
    cp -r "$STITCHTIME_REFERENCE"/{dnnlib,torch_utils,training,LICENSE.txt} .whl/stylegan2-ada-pytorch/
fi
ls .whl
du -sh .whl
