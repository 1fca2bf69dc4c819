"""Every imgvec file attacked on purpose: each dataset and header attribute dropped, retyped,
reshaped, NaN-filled, truncated or forged in turn. The reader either gives the same answer as
for the untouched file, or one line (BadInputError / MismatchError); never a traceback, never a
silently different answer.

"Forged" here means a value that disagrees with the rest of the file or with its store; a
forgery consistent with everything else (another backbone of the same dimension, say) is
indistinguishable from a real file without a signature, and is out of scope.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import imgvec
from imgvec.files.header import FORMAT_VERSION
from imgvec.vectors.classifier import LogisticHead, read_head, save_head
from imgvec.cli import app
from imgvec.embedding.embedder import Embedder
from imgvec.errors import BadInputError, ImgvecError, MismatchError
from imgvec.pages import report
from imgvec.vectors.index import build_index, load_index
from imgvec.files.provenance import Provenance
from imgvec.vectors.store import StoreWriter, create_store, open_store
from old_files import format2

D = 576  # mobilenetv3small's embedding size
PROV = Provenance("mobilenetv3small", "random", 0, None, None, 64, "in model", D)


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, D)) * 3
    return (centres[np.arange(n) % 3] + rng.normal(size=(n, D))).astype(np.float32)


def _make_store(path: Path, n: int = 30, seed: int = 0) -> Path:
    x = _vectors(n, seed)
    with create_store(path, PROV, str(path.parent)) as w:
        w.append(x, [f"{'abc'[i % 3]}/{i}.png" for i in range(n)], ["abc"[i % 3] for i in range(n)],
                 skipped=[("bad.png", "cannot decode")])
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    store = _make_store(root / "s.h5")
    with open_store(store) as s:
        build_index(s, "flat").save(root / "s.index.h5")
        head = LogisticHead(cv=2, Cs=(0.1, 1.0)).fit(s.embeddings(), s.labels())
        save_head(head, root / "head.h5", s.provenance, s.store_id, s.generation, [s.absolute(k) for k in s.paths()])
    return {"store": store, "index": root / "s.index.h5", "head": root / "head.h5"}


# -- what each kind's reader answers ------------------------------------------------------------
def _read_store(path: Path, files: dict[str, Path]) -> Any:
    with open_store(path) as s:
        return s.embeddings(), s.paths(), s.labels(), s.skipped(), s.rows, s.dim


def _read_index(path: Path, files: dict[str, Path]) -> Any:
    index = load_index(path)
    with open_store(files["store"]) as s:
        index.check_covers(s)
        return index.search(_vectors(5, seed=9), 4)


def _read_head(path: Path, files: dict[str, Path]) -> Any:
    head, header = read_head(path)
    Embedder.from_provenance(header.provenance)  # what predict embeds new images with
    return head.predict_proba(_vectors(6, seed=9)), list(head.classes_), header.provenance.key()


READERS: dict[str, Callable[[Path, dict[str, Path]], Any]] = {"store": _read_store, "index": _read_index,
                                                              "head": _read_head}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    return a == b


# -- the attacks -------------------------------------------------------------------------------
def _datasets(h5: h5py.File) -> list[str]:
    names: list[str] = []
    h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _replace(h5: h5py.File, name: str, data: Any, **kw: Any) -> None:
    del h5[name]
    h5.create_dataset(name, data=data, **kw)


def _dataset_attacks(h5: h5py.File, name: str) -> dict[str, Callable[[h5py.File], None]]:
    ds = h5[name]
    data = ds[()]
    is_str = h5py.check_string_dtype(ds.dtype) is not None
    attacks: dict[str, Callable[[h5py.File], None]] = {"drop": lambda f: f.__delitem__(name)}
    retyped = np.arange(len(data), dtype=np.int32) if is_str else data.astype(np.float64 if ds.dtype != np.float64
                                                                                 else np.int64)
    attacks["retype"] = lambda f: _replace(f, name, retyped)
    attacks["reshape"] = ((lambda f: _replace(f, name, data.reshape(-1))) if ds.ndim > 1
                          else (lambda f: _replace(f, name, data.reshape(-1, 1), **({"dtype": ds.dtype} if is_str else {}))))
    if ds.ndim and len(data):
        attacks["truncate"] = lambda f: _replace(f, name, data[:-1], **({"dtype": ds.dtype} if is_str else {}))
    if ds.dtype.kind == "f":
        attacks["nan"] = lambda f: _replace(f, name, np.full_like(data, np.nan))
        if name == "scale":  # zero scale divides by zero; zeros elsewhere are content, not structure
            attacks["zero"] = lambda f: _replace(f, name, np.zeros_like(data))
    # garbage: not in a strings column's bytes, which are its content (names): rewriting them is a forgery
    # consistent with everything else, out of scope here as above
    if ds.dtype == np.uint8 and not name.endswith("/bytes"):
        attacks["garbage"] = lambda f: _replace(
            f, name, np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8))
    return attacks


def _forged(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)):
        text = value.decode() if isinstance(value, bytes) else value
        others = ["imgvec-store", "imgvec-index", "imgvec-head", "store", "index", "head", "random", "file",
                  "efficientnetb0", text + "x", ""]
        return [o for o in others if o != text]
    if isinstance(value, (int, np.integer)):
        return [int(value) + 1, int(value) - 1, -1, 10**12]
    if isinstance(value, (float, np.floating)):
        return [float("nan"), -1.0, float(value) * 2]
    return []


def _attr_attacks(h5: h5py.File) -> dict[str, Callable[[h5py.File], None]]:
    attacks: dict[str, Callable[[h5py.File], None]] = {}
    for name, value in h5.attrs.items():
        attacks[f"attr {name} drop"] = lambda f, n=name: f.attrs.__delitem__(n)
        retyped = np.array([1.5, 2.5]) if isinstance(value, (str, bytes)) else "not a number"
        attacks[f"attr {name} retype"] = lambda f, n=name, v=retyped: f.attrs.__setitem__(n, v)
        for i, forged in enumerate(_forged(value)):
            attacks[f"attr {name} forge{i}={forged!r}"] = lambda f, n=name, v=forged: f.attrs.__setitem__(n, v)
    return attacks


def _all_attacks(path: Path) -> dict[str, Callable[[h5py.File], None]]:
    with h5py.File(path, "r") as h5:
        attacks = _attr_attacks(h5)
        for name in _datasets(h5):
            attacks.update({f"{name} {k}": v for k, v in _dataset_attacks(h5, name).items()})
    return attacks


@pytest.mark.parametrize("kind", ["store", "index", "head"])
def test_every_attack_gives_the_same_answer_or_one_line(kind: str, files: dict[str, Path], tmp_path: Path):
    reader = READERS[kind]
    expected = reader(files[kind], files)
    attacks = _all_attacks(files[kind])
    assert len(attacks) > 40
    outcomes: dict[str, str] = {}
    for what, attack in attacks.items():
        victim = tmp_path / f"victim-{kind}.h5"
        shutil.copy(files[kind], victim)
        with h5py.File(victim, "r+") as h5:
            attack(h5)
        try:
            answer = reader(victim, files)
        except (BadInputError, MismatchError) as error:
            assert "\n" not in str(error), what
            assert str(victim) in str(error) or "store" in str(error) or "forged" in str(error), (what, str(error))
            outcomes[what] = "refused"
        else:
            assert _same(answer, expected), f"{what}: a silently different answer"
            outcomes[what] = "same"
    # The attacks that must be refused, by kind, are refused (not merely answered the same).
    must = ["attr rows forge0=31", "attr dim drop", "attr format drop", "attr kind forge0='imgvec-store'"]
    must += {"store": ["embeddings nan", "embeddings reshape", "paths/offsets truncate", "paths/bytes truncate",
                       "labels/codes drop", "labels/codes truncate", "labels/names/bytes truncate",
                       "skipped/reasons/offsets truncate"],
             "index": ["faiss garbage", "faiss drop", "attr generation forge0=1", "attr store_id forge10=''",
                       "attr index_kind forge3='store'"],
             "head": ["coef nan", "coef reshape", "scale zero", "classes/offsets truncate", "classes/bytes truncate",
                      "intercept retype"]}[kind]
    for what in must:
        hits = [k for k in outcomes if k.startswith(what.split("=")[0]) and (what in k or "=" not in what)]
        assert hits and all(outcomes[k] == "refused" for k in hits), (what, {k: outcomes[k] for k in hits})


@pytest.mark.parametrize("kind", ["store", "index", "head"])
def test_info_on_attacked_files_is_one_line_never_a_traceback(kind: str, files: dict[str, Path], tmp_path: Path):
    runner = CliRunner()
    attacks = _all_attacks(files[kind])
    for what, attack in list(attacks.items())[::3]:
        victim = tmp_path / f"v-{kind}.h5"
        shutil.copy(files[kind], victim)
        with h5py.File(victim, "r+") as h5:
            attack(h5)
        try:  # what the library says of the file: the CLI must print exactly that
            table, code, line = report.render(imgvec.info(victim).to_table()), 0, ""
        except ImgvecError as error:
            table, code, line = "", error.exit_code, report.shown(f"imgvec: error: {error.cli_message()}") + "\n"
        result = runner.invoke(app, ["info", str(victim)])
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), what
        assert (result.exit_code, result.stdout, result.stderr) == (code, table, line), what


def test_an_index_whose_header_was_forged_from_the_right_store_is_caught(files: dict[str, Path], tmp_path: Path):
    other = _make_store(tmp_path / "other.h5", seed=5)  # same size and dim, other vectors
    with open_store(other) as o:
        build_index(o, "flat").save(tmp_path / "other.index.h5")
    with h5py.File(files["index"]) as good, h5py.File(tmp_path / "other.index.h5", "r+") as bad:
        for name, value in good.attrs.items():  # every attribute, checksum included
            bad.attrs[name] = value
    forged = load_index(tmp_path / "other.index.h5")
    with open_store(files["store"]) as s, pytest.raises(MismatchError, match="does not hold .* vectors"):
        forged.check_covers(s)


def test_files_of_one_kind_are_refused_as_another(files: dict[str, Path]):
    with pytest.raises(BadInputError, match="is an imgvec head file, not a store"):
        open_store(files["head"])
    with pytest.raises(BadInputError, match="is an imgvec store file, not a index"):
        load_index(files["store"])


def test_version_1_files_are_migrated_or_refused_with_the_rebuild(files: dict[str, Path], tmp_path: Path):
    def downgrade(src: Path, dst: Path) -> Path:
        shutil.copy(src, dst)
        with h5py.File(dst, "r+") as h5:
            h5.attrs["format_version"] = 1
            for name in ("kind", "header_sha256"):  # what version 1 did not write
                del h5.attrs[name]
        return dst

    made = format2(tmp_path)  # format 2 (imgvec at 89cb242), the same rows as files["store"]: as version 1 wrote them
    old_store = downgrade(made["s.h5"], tmp_path / "old.h5")
    assert _same(_read_store(old_store, files), _read_store(files["store"], files))
    with StoreWriter(old_store) as w:  # the next write upgrades it
        w.append(_vectors(1, seed=3), ["new.png"], ["a"])
    with h5py.File(old_store) as h5:
        assert h5.attrs["format_version"] == FORMAT_VERSION and h5.attrs["kind"] == b"store"
    old_head = downgrade(made["head.h5"], tmp_path / "oldhead.h5")
    assert _same(_read_head(old_head, files), _read_head(made["head.h5"], files))  # the same bytes, read as version 1
    # and the head this machine fits on the same rows: equal up to the float rounding of another machine's fit
    old_p, old_classes, old_key = _read_head(old_head, files)
    new_p, new_classes, new_key = _read_head(files["head"], files)
    assert (old_classes, old_key) == (new_classes, new_key)
    np.testing.assert_allclose(old_p, new_p, rtol=1e-5, atol=1e-7)
    old_index = downgrade(made["s.index.h5"], tmp_path / "old.index.h5")
    with pytest.raises(BadInputError, match=r"imgvec 0.1 .* rebuild the index from its store \(imgvec index STORE\)"):
        load_index(old_index)


def test_a_newer_format_is_refused(files: dict[str, Path], tmp_path: Path):
    shutil.copy(files["store"], tmp_path / "new.h5")
    with h5py.File(tmp_path / "new.h5", "r+") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(BadInputError, match="newer imgvec"):
        open_store(tmp_path / "new.h5")


def test_info_reads_every_kind_from_headers(files: dict[str, Path], monkeypatch):
    import faiss

    import imgvec

    monkeypatch.setattr(faiss, "read_index", lambda *a: pytest.fail("info must not deserialise an index"))
    store, index, head = (imgvec.info(files[k]).to_records() for k in ("store", "index", "head"))
    assert (store["kind"], store["rows"], store["labels"], store["index"]["state"]) == (
        "store", 30, {"a": 10, "b": 10, "c": 10}, "up to date")
    assert (index["kind"], index["index_kind"], index["rows"], index["generation"]) == ("index", "flat", 30, 0)
    assert (head["kind"], head["classes"], head["rows"]) == ("head", ["a", "b", "c"], 30)
    result = CliRunner().invoke(app, ["info", str(files["store"])])
    assert result.exit_code == 0 and "labels.a" in result.stdout and "{" not in result.stdout


def test_reading_turns_hdf5s_errors_into_a_damaged_file_line_but_never_imgvecs_own_bugs(tmp_path):
    """Issue 26: a KeyError or TypeError raised by imgvec's code inside ``reading()`` is a bug, not damage."""
    import h5py

    from imgvec.errors import BadInputError
    from imgvec.files.artifact import reading

    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as h5:
        h5["x"] = [1, 2]
    with h5py.File(path, "r") as h5:
        with pytest.raises(BadInputError, match="damaged imgvec store file .*HDF5 cannot read it"):
            with reading(path, "store"):
                h5["missing"]  # h5py's KeyError: what the file lacks
        for bug in (KeyError("ours"), TypeError("ours")):
            with pytest.raises(type(bug), match="ours"):
                with reading(path, "store"):
                    raise bug
