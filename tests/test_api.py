"""The library API end to end, as a notebook would use it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import imgvec
from imgvec.errors import BadInputError, MismatchError
from imgvec.vectors.store import open_store


def test_store_holds_every_image_with_labels_and_provenance(store_path: Path, image_dir: Path):
    with open_store(store_path) as s:
        assert s.rows == 24 and s.dim == 576
        assert sorted(s.paths()) == sorted(str(p.relative_to(image_dir)) for p in image_dir.rglob("*.png"))
        assert all(label == path.split("/")[0] for path, label in zip(s.paths(), s.labels()))
        prov = s.provenance
    assert (prov.backbone, prov.weights, prov.weights_seed, prov.input_size) == ("mobilenetv3small", "random", 0, 64)
    assert prov.keras_version.startswith("3.") and (prov.runtime, prov.tensorflow_version) == ("openvino", "")
    assert prov.runtime_version.startswith("20")  # OpenVINO's year.release


def test_self_query_ranks_first_with_score_one(store_path: Path, image_dir: Path):
    queries = sorted(image_dir.rglob("*.png"))[::5]
    r = imgvec.query(store_path, queries, k=3)
    assert len(r.queries) == len(queries)
    for q, path in zip(r.queries, queries):
        top = q.results[0]
        assert top.path == str(path.relative_to(image_dir)) and top.score == pytest.approx(1.0, abs=1e-4)
        assert [n.rank for n in q.results] == [1, 2, 3]
        assert q.results[0].score >= q.results[1].score >= q.results[2].score


def test_resume_adds_only_new_images_and_keeps_old_rows(tmp_path: Path, image_dir: Path, small):
    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    moved = sorted(folder.rglob("*.png"))[:5]
    parked = tmp_path / "parked"
    parked.mkdir()
    for p in moved:
        p.rename(parked / f"{p.parent.name}__{p.name}")
    store = tmp_path / "s.h5"
    first = imgvec.embed([folder], store, **small)
    assert (first.added, first.already) == (19, 0)
    with open_store(store) as s:
        before = s.embeddings().copy()
    for p in moved:
        (parked / f"{p.parent.name}__{p.name}").rename(p)
    second = imgvec.embed([folder], store)  # backbone and weights come from the store
    assert (second.added, second.already, second.rows) == (5, 19, 24)
    with open_store(store) as s:
        np.testing.assert_array_equal(s.embeddings(0, 19), before)
        assert len(set(s.paths())) == 24
    third = imgvec.embed([folder], store)
    assert (third.added, third.already) == (0, 24)


def test_rerun_with_nothing_new_does_not_load_the_model(store_path: Path, image_dir: Path, tmp_path: Path,
                                                       monkeypatch):
    def no_model(self):
        raise AssertionError("the model was loaded with nothing to embed")

    store = tmp_path / "copy.h5"
    shutil.copy(store_path, store)
    monkeypatch.setattr(imgvec.Embedder, "load", no_model)
    for engine in ("local", "ray"):  # nor does it start Ray workers
        again = imgvec.embed([image_dir], store, engine=engine)
        assert (again.added, again.already) == (0, again.rows)


def test_resume_with_another_backbone_is_refused(store_path: Path, image_dir: Path, tmp_path: Path):
    copy = tmp_path / "copy.h5"
    shutil.copy(store_path, copy)
    with pytest.raises(MismatchError, match="backbone: mobilenetv3small vs mobilenetv2"):
        imgvec.embed([image_dir], copy, model="mobilenetv2", weights="none", image_size=64)


def test_missing_weights_leave_no_store(tmp_path: Path, image_dir: Path):
    with pytest.raises(imgvec.MissingWeightsError):
        imgvec.embed([image_dir], tmp_path / "s.h5", model="mobilenetv3small", image_size=64)
    assert not (tmp_path / "s.h5").exists()


def test_train_and_predict_separate_the_classes(store_path: Path, holdout_dir: Path, tmp_path: Path):
    t = imgvec.train(store_path, tmp_path / "head.h5", cv=3)
    assert t.classes == ["blues", "greens", "reds", "yellows"] and t.n_train == 24
    assert t.cv_accuracy >= 0.9
    assert t.confusion.shape == (4, 4) and t.confusion.sum() == 24
    p = imgvec.predict(t.head, [holdout_dir])
    truth = [Path(x.path).parent.name for x in p.predictions]
    assert np.mean([x.label == y for x, y in zip(p.predictions, truth)]) >= 0.9
    for x in p.predictions:
        assert sum(x.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_train_needs_labels(tmp_path: Path, image_dir: Path, small):
    store = tmp_path / "s.h5"
    imgvec.embed(sorted(image_dir.rglob("*.png"))[:6], store, **small)
    with pytest.raises(BadInputError, match="has no labels"):
        imgvec.train(store, tmp_path / "h.h5")


def test_stale_index_is_detected(store_path: Path, image_dir: Path, tmp_path: Path):
    copy = tmp_path / "photos.h5"
    shutil.copy(store_path, copy)
    imgvec.build_index(copy)
    extra = tmp_path / "extra"
    shutil.copytree(image_dir / "reds", extra / "reds")
    (extra / "reds" / "reds_000.png").rename(extra / "reds" / "new.png")
    imgvec.embed([extra / "reds" / "new.png"], copy)
    # The query still covers the store: the row the index lacks is searched beside it, and said so.
    partial = imgvec.query(copy, [extra / "reds" / "new.png"], k=2)
    assert partial.unindexed == 1 and "1 of 25 rows" in partial.notes[0] and "imgvec index" in partial.notes[0]
    assert {Path(n.path).name for n in partial.queries[0].results} == {"new.png", "reds_000.png"}
    assert imgvec.info(copy).fields["index"]["state"].startswith("stale: index covers 24 rows")
    imgvec.build_index(copy)
    assert imgvec.info(copy).fields["index"]["state"] == "up to date"
    top = imgvec.query(copy, [extra / "reds" / "new.png"], k=2).queries[0].results  # new.png is a copy of reds_000
    assert {Path(n.path).name for n in top} == {"new.png", "reds_000.png"} and top[1].score > 0.999


@pytest.mark.parametrize("fallback_rows", [100_000, 10], ids=["in-memory-fallback", "index-file-required"])
def test_sync_drops_removed_files_and_index_catches_up(tmp_path: Path, image_dir: Path, small, monkeypatch,
                                                       fallback_rows: int):
    import imgvec.api

    # Above the fallback size a store can only be queried through its index file.
    monkeypatch.setattr(imgvec.api, "AUTO_FLAT_MAX_ROWS", fallback_rows)
    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    store = tmp_path / "photos.h5"
    imgvec.embed([folder], store, **small)
    first = imgvec.build_index(store)
    assert (first.updated, first.rows) == (False, 24)
    # New images only: the index is extended, not rebuilt, and finds them.
    shutil.copy(folder / "reds" / "reds_000.png", folder / "reds" / "copy.png")
    imgvec.embed([folder], store)
    again = imgvec.build_index(store)
    assert (again.updated, again.added, again.rows) == (True, 1, 25)
    hits = imgvec.query(store, [folder / "reds" / "copy.png"], k=2)
    assert {n.path for n in hits.queries[0].results} == {"reds/copy.png", "reds/reds_000.png"}
    # Removed files: without --sync they stay, with it they go, and the index must be rebuilt.
    (folder / "blues" / "blues_001.png").unlink()
    assert imgvec.embed([folder], store).rows == 25
    synced = imgvec.embed([folder], store, sync=True)
    assert (synced.removed, synced.rows) == (1, 24)
    with open_store(store) as s:
        assert "blues/blues_001.png" not in s.paths()
    stale = imgvec.query(store, [folder / "blues"], k=24)  # the stale index is not used: every row searched
    assert "predates rows removed" in stale.notes[0] and stale.unindexed == 0
    assert "blues/blues_001.png" not in {n.path for q in stale.queries for n in q.results}
    rebuilt = imgvec.build_index(store)
    assert (rebuilt.updated, rebuilt.rows) == (False, 24)
    # The user's next step: the rebuilt index answers queries, and never with the removed row.
    hits = imgvec.query(store, [folder / "blues", folder / "reds" / "copy.png"], k=24)
    found = {n.path for q in hits.queries for n in q.results}
    assert "blues/blues_001.png" not in found and len(hits.queries[0].results) == 24
    assert hits.queries[-1].results[0].path in {"reds/copy.png", "reds/reds_000.png"}
    assert imgvec.info(store).fields["index"]["state"] == "up to date"
    # And the index keeps up with later runs (extended again, then queried).
    shutil.copy(folder / "greens" / "greens_000.png", folder / "greens" / "copy.png")
    imgvec.embed([folder], store)
    assert imgvec.build_index(store).updated
    assert imgvec.query(store, [folder / "greens" / "copy.png"], k=1).queries[0].results[0].score > 0.999


def test_messy_folder_embeds_the_good_and_lists_the_bad(tmp_path: Path, image_dir: Path, small):
    folder = tmp_path / "messy"
    shutil.copytree(image_dir / "reds", folder / "reds")
    (folder / "reds" / "page.jpg").write_bytes(b"<html>oops</html>")
    (folder / "reds" / "empty.png").write_bytes(b"")
    (folder / "reds" / ".DS_Store").write_bytes(b"junk")
    (folder / "reds" / "notes.txt").write_text("not an image")
    (folder / "reds" / "dead.png").symlink_to(folder / "gone.png")
    (folder / "empty_class").mkdir()
    s = imgvec.embed([folder], tmp_path / "m.h5", **small)
    assert s.added == 6
    assert sorted(k for k, _ in s.skipped) == ["reds/dead.png", "reds/empty.png", "reds/page.jpg"]
    with open_store(tmp_path / "m.h5") as st:
        assert sorted(st.skipped()) == sorted(s.skipped) and st.rows == 6
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "readme.txt").write_text("no images here")
    with pytest.raises(BadInputError, match="no images found"):
        imgvec.embed([tmp_path / "nothing"], tmp_path / "n.h5", **small)
    assert not (tmp_path / "n.h5").exists()


def test_one_embed_config_reaches_the_embedder(tmp_path: Path, image_dir: Path, small, monkeypatch):
    """One frozen EmbedConfig: fields by name override it, the Embedder is made from it, and gives it back."""
    import dataclasses

    from imgvec.embedding.embedder import EmbedConfig, Embedder

    config = EmbedConfig(**small, batch_size=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 6  # type: ignore[misc]
    with pytest.raises(TypeError):  # by name only: a positional list of ten settings is never read right
        EmbedConfig(small["model"])  # type: ignore[misc]
    made = []
    real = Embedder.from_config.__func__

    def spy(cls, cfg):
        made.append(cfg)
        return real(cls, cfg)

    monkeypatch.setattr(Embedder, "from_config", classmethod(spy))
    s = imgvec.embed([image_dir / "reds"], tmp_path / "s.h5", config, batch_size=3)
    assert made == [dataclasses.replace(config, batch_size=3)] and s.added == 6
    embedder = real(Embedder, made[0])
    assert (embedder.batch_size, embedder.image_size, embedder.weights.kind) == (3, 64, "random")
    assert real(Embedder, embedder.config).config == embedder.config  # what a Ray worker rebuilds


def test_compare_takes_its_own_options(tmp_path: Path, image_dir: Path, small, monkeypatch):
    """imgvec.compare is the comparison itself: Cs and the speed sample reach it, nothing is restated."""
    import imgvec.analyses.comparison

    seen = []
    real = imgvec.analyses.comparison.cross_validate

    def spy(X, y, split, Cs=None, random_state=0, **rest):  # rest: progress and the backbone's name
        seen.append(Cs)
        return real(X, y, split, Cs=Cs, random_state=random_state, **rest)

    monkeypatch.setattr(imgvec.analyses.comparison, "cross_validate", spy)
    c = imgvec.compare(image_dir, ["mobilenetv3small"], cv=2, stores=tmp_path / "stores", weights="none",
                       image_size=64, Cs=[0.5, 2.0], speed_sample=5)
    assert seen == [[0.5, 2.0]] and c.speed_images == 5 and c.rows[0].embedded == 24


def test_beside_runs_the_first_on_another_thread_and_its_error_wins():
    """query opens the index beside loading the model: results in order, and an index error is the one told."""
    import threading

    from imgvec.api import _beside

    here = threading.get_ident()
    seen: list[int] = []
    assert _beside(lambda: seen.append(threading.get_ident()) or "index", lambda: "rows") == ("index", "rows")
    assert seen and seen[0] != here

    def bad_index():
        raise BadInputError("damaged index")

    def bad_image():
        raise ValueError("no image decodes")

    with pytest.raises(BadInputError, match="damaged index"):
        _beside(bad_index, bad_image)
    with pytest.raises(ValueError, match="no image decodes"):
        _beside(lambda: "index", bad_image)
    with pytest.raises(BadInputError, match="damaged index"):
        _beside(bad_index, lambda: "rows")

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while the model loads is not turned into the index's error
        _beside(bad_index, interrupted)
