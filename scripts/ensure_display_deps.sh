#!/usr/bin/env bash
# Installs the Debian packages napari needs to render under a virtual display (Xvfb), and
# libturbojpeg0 (the tests write a DICOM slide with wsidicomizer, whose JPEG transcoding
# needs it), only when one of them is missing. Idempotent; needs root (or sudo) the first
# time.
set -euo pipefail
pkgs=(xvfb libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0
      libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libgl1-mesa-dri libegl1
      libgl1 libfontconfig1 libdbus-1-3 libturbojpeg0)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing display packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
