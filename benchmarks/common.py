"""Shared helpers for the benchmarks: generated data, timing, result files, markdown tables.

Every benchmark uses random (seeded) weights: ImageNet weights are not needed to measure
speed, and results are labelled as random-weight so nobody reads them as accuracy claims.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
OUT = ROOT / "out"  # generated data, gitignored


def generated_store(path: Path, rows: int, dim: int, fill: Callable[[int, int], np.ndarray],
                    chunk: int = 50_000) -> Path:
    """A store of ``rows`` rows from ``fill(start, n)`` (see :mod:`benchmarks.make_store`), made once and kept."""
    from .make_store import write_store

    if path.exists():
        import h5py

        from imgvec.files.header import FORMAT_VERSION

        with h5py.File(path, "r") as h5:
            current = h5.attrs.get("format_version", 1) == FORMAT_VERSION
        if current:
            return path
        path.unlink()  # made by an earlier imgvec, in an older format: made again
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_store(path, rows, dim, fill, chunk=chunk)


def byte_compiled() -> int:
    """Byte-compile imgvec's modules, as ``pip install`` does: a process timed from its start then reads them
    compiled, as a user's does (an editable install under ``PYTHONDONTWRITEBYTECODE`` would compile every
    module in every process: ~0.08 s of a query). How many files were written."""
    import compileall
    import imgvec

    folder = Path(imgvec.__file__).parent
    before = sum(1 for _ in folder.rglob("*.pyc"))
    compileall.compile_dir(str(folder), quiet=1)
    return sum(1 for _ in folder.rglob("*.pyc")) - before


def where_measured(kept: list[dict[str, Any]], earlier: dict[str, Any], new: list[dict[str, Any]]) -> None:
    """Stamp each row with the machine and date it was measured on: ``kept`` rows from the ``earlier`` results file
    (its machine, where they lack one), ``new`` rows with this machine and today, so a file merged from two runs
    says which row came from where."""
    for row in kept:
        row.setdefault("machine", (earlier.get("machine") or {}).get("cpu", "?"))
        row.setdefault("date", earlier.get("date", "?"))
    for row in new:
        row.update(machine=machine()["cpu"], date=time.strftime("%Y-%m-%d"))


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded: recorded beside figures taken on a shared machine."""
    return [round(v, 2) for v in os.getloadavg()]


def quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in ("tensorflow", "keras", "openvino", "faiss-cpu", "scikit-learn", "pillow", "numpy", "hnswlib", "h5py"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "versions": versions}


def commit() -> str:
    """The code measured: HEAD's hash, with ``+dirty`` when the work tree has uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    return head + ("+dirty" if head and git("status", "--porcelain", "--untracked-files=no") else "")


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "commit": commit(), "machine": machine(), **data}
    if os.environ.get("IMGVEC_BENCH_BESIDE"):  # what else ran on the machine meanwhile, as the runner states it
        data["beside"] = os.environ["IMGVEC_BENCH_BESIDE"]
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    return path


def kept_quiet(data: dict[str, Any]) -> bool:
    """Whether the runner said nothing else ran beside these results (IMGVEC_BENCH_BESIDE="nothing: ..."): then a
    load average near the core count is the benchmark's own, not another job's."""
    return str(data.get("beside", "")).startswith("nothing")


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Run every contender once per round, ``repeats`` rounds, in rotating order; seconds per run.

    The machine is shared and noisy, so contenders are always timed side by side and the
    order rotates each round so no contender always runs right after another.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(timed(contenders[n])[0])
    return times


def best(ts: Sequence[float]) -> float:
    """Least-disturbed run: the minimum (noise on a shared machine only ever adds time)."""
    return min(ts)


def median(ts: Sequence[float]) -> float:
    return statistics.median(ts)


# -- photo-like JPEGs ---------------------------------------------------------------------
def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An RGB uint8 image with what makes real JPEGs their size: smooth gradients, a few
    blurred shapes, fine texture and sensor noise (flat synthetic patterns compress 10x better)."""
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx /= width
    yy /= height
    img = np.empty((height, width, 3), np.float32)
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    a = rng.uniform(0, 2 * np.pi)
    t = np.clip((xx * np.cos(a) + yy * np.sin(a) + 1) / 2, 0, 1)[..., None]
    img[:] = c0 * (1 - t) + c1 * t
    # a soft "sky/ground" split
    horizon = rng.uniform(0.3, 0.7)
    ground = 1 / (1 + np.exp(-(yy - horizon - 0.05 * np.sin(xx * rng.uniform(3, 12))) * 40))
    img = img * (1 - ground[..., None]) + (c2 * (0.6 + 0.4 * yy[..., None])) * ground[..., None]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(4, 12)):
        x0, y0 = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        w, h = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.4) * height
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif shape == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            pts = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(5)]
            draw.polygon(pts, fill=colour)
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 2.0)))
    out = np.asarray(pil, dtype=np.float32)
    # texture (low-frequency-modulated fine detail) + sensor noise
    texture = rng.normal(0, 1, (height // 2 + 1, width // 2 + 1)).repeat(2, 0).repeat(2, 1)[:height, :width]
    out += (texture * rng.uniform(4, 14) * (0.5 + ground))[..., None]
    out += rng.normal(0, rng.uniform(2, 6), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def photo_folder(n: int = 300, seed: int = 0, name: str | None = None) -> Path:
    """``n`` photo-like JPEGs (~500x375, sizes and orientations vary) under benchmarks/out/, cached."""
    from PIL import Image

    folder = OUT / (name or f"photos-{n}-{seed}")
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        long_side = int(rng.integers(400, 641))
        short_side = int(long_side * rng.uniform(0.66, 0.8))
        w, h = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
        img = photo_like(rng, w, h)
        Image.fromarray(img).save(folder / f"img_{i:05d}.jpg", quality=int(rng.integers(82, 95)))
    done.write_text(str(n))
    return folder


def small_folder(n: int, size: int = 64, seed: int = 0) -> Path:
    """``n`` small JPEGs (for memory and enumeration runs), spread over subfolders of 1000, cached."""
    from PIL import Image

    folder = OUT / f"small-{n}-{size}-{seed}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(seed)
    base = [photo_like(rng, size, size) for _ in range(64)]
    from io import BytesIO

    blobs = []
    for img in base:
        buf = BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    for i in range(n):
        sub = folder / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        # the same few encoded images, so the run is about memory per image, not decoding
        (sub / f"s_{i:06d}.jpg").write_bytes(blobs[i % len(blobs)])
    done.write_text(str(n))
    return folder


# The first lines of a child script that reports its own peak RSS: VmHWM starts afresh at exec, where
# ru_maxrss would carry over the parent's peak. A benchmark appends its work and calls peak_rss_mb().
CHILD_PEAK_RSS = """
def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

import json, sys, time
import imgvec
start = time.perf_counter()
"""


def peak_rss_mb_of(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``cmd`` in a child process; (its peak RSS in MB, wall seconds).

    Uses one fresh python wrapper per measurement so RUSAGE_CHILDREN holds only this child.
    """
    import subprocess

    wrapper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, dt]))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env, check=True)
    rc, kb, dt = json.loads(out.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}")
    return kb / 1024.0, dt
