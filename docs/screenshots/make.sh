#!/usr/bin/env bash
# The README's gallery screenshots: real photos that ship in packages (augmented copies, as `make demo`
# makes them), embedded with the default efficientnetlite0 and its pretrained weights (installed with
# imgvec: nothing is downloaded), each HTML page rendered by headless Chromium. Needs `imgvec` and
# `python` (the .venv's) on PATH: `make screenshots`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
chromium=${CHROMIUM:-chromium}
work=${TMPDIR:-/tmp}/imgvec-demo   # the pages name their folder: a plain name, not a random one
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
cd "$work"
python -c "
from imgvec.synthetic import make_photo_folder
classes = ('cat', 'coffee', 'astronaut', 'rocket', 'temple', 'flower')
make_photo_folder('images/train', per_class=8, size=224, classes=classes, seed=0)
make_photo_folder('images/holdout', per_class=2, size=224, classes=classes, seed=1)"
cp images/train/cat/cat_000.jpg images/train/cat/cat_000_copy.jpg   # an identical file for dedup
imgvec embed images/train -o photos.h5          # efficientnetlite0, pretrained
imgvec index photos.h5
imgvec query photos.h5 images/holdout/cat images/holdout/coffee -k 6 --html query.html > /dev/null
imgvec train photos.h5 -o head.h5 --cv 3 > /dev/null
imgvec predict head.h5 images/holdout --html predict.html > /dev/null
imgvec compare images/train -m efficientnetlite0 --cv 3 --html compare.html > /dev/null
imgvec dedup photos.h5 --threshold 0.99 --html dedup.html > /dev/null
for page in query predict compare dedup; do
  "$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1100,800 \
    --screenshot="$here/$page.png" "file://$work/$page.html" 2> /dev/null
done
python -c "
import sys
from PIL import Image
for path in sys.argv[1:]:  # 256 colours: a quarter of the bytes, the same picture
    Image.open(path).convert('RGB').quantize(256).save(path, optimize=True)" "$here"/*.png
ls -l "$here"/*.png
