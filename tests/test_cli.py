"""The imgvec command end to end, through typer's CliRunner and one real subprocess."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgvec.cli import app

SMALL_ARGS = ["-m", "mobilenetv3small", "--weights", "none", "--image-size", "64"]


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, image_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "photos"
    shutil.copytree(image_dir, folder)
    (folder / "reds" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    store = folder.parent / "photos.h5"
    r = run("embed", folder, "-o", store, *SMALL_ARGS, "--batch-size", "8")
    assert "24 images embedded" in r.stdout and "1 skipped" in r.stdout
    assert "skipped reds/broken.jpg" in r.stderr and "RANDOM weights" in r.stderr
    r = run("index", store)
    assert "flat index over 24 rows" in r.stdout
    return store


def test_query_json_self_match_first(cli_store: Path):
    photo = cli_store.parent / "photos" / "blues" / "blues_002.png"
    r = run("query", cli_store, photo, "-k", "4", "--format", "json")
    data = json.loads(r.stdout)
    assert data["root"] == str(cli_store.parent / "photos") and data["store"] == str(cli_store)
    assert len(data["queries"]) == 1 and data["queries"][0]["query"] == str(photo) and data["skipped"] == []
    results = data["queries"][0]["results"]
    assert [x["rank"] for x in results] == [1, 2, 3, 4]
    assert results[0]["path"] == str(photo) and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert set(results[0]) == {"rank", "path", "score", "label"} and results[0]["label"] == "blues"


def test_query_table_and_csv_say_what_made_them(cli_store: Path):
    folder = cli_store.parent / "photos" / "greens"
    r = run("query", cli_store, folder, "-k", "2")
    assert "RANDOM weights" in r.stdout.splitlines()[0] and r.stdout.count("query:") == 6
    assert f"paths relative to {cli_store.parent / 'photos'}" in r.stdout.splitlines()[0]
    rows = list(csv.DictReader(io.StringIO(run("query", cli_store, folder, "-k", "2", "-f", "csv").stdout)))
    assert len(rows) == 12 and set(rows[0]) == {"query", "rank", "path", "score", "label"}
    assert all(row["label"] == Path(row["path"]).parent.name for row in rows)  # the label the table shows


def test_train_then_predict_json(cli_store: Path, holdout_dir: Path, tmp_path: Path):
    head = tmp_path / "head.h5"
    r = run("train", cli_store, "-o", head, "--cv", "3")
    assert "4 classes, 24 images" in r.stdout and "CV accuracy" in r.stdout
    for name in ("blues", "greens", "reds", "yellows"):
        assert name in r.stdout
    data = json.loads(run("predict", head, holdout_dir, "-f", "json").stdout)["predictions"]
    assert len(data) == 12 and set(data[0]) == {"path", "predicted", "true", "correct", "probabilities"}
    assert all(d["true"] == Path(d["path"]).parent.name and d["correct"] == (d["predicted"] == d["true"]) for d in data)
    correct = sum(d["correct"] for d in data)
    assert correct >= 10
    assert sorted(data[0]["probabilities"]) == ["blues", "greens", "reds", "yellows"]
    table = run("predict", head, holdout_dir).stdout
    assert "predicted" in table.splitlines()[2] and "true" in table.splitlines()[2]
    assert (f"accuracy {correct / 12:.3f}: {correct} of 12 images in class folders predicted right (chance: 0.250 "
            "always guessing the most common class, 0.250 ± 0.125 guessing by the class shares)") in table
    assert "cross-validated accuracy" in table.splitlines()[0] and "C=" in table.splitlines()[0]
    rows = list(csv.DictReader(io.StringIO(run("predict", head, holdout_dir / "reds", holdout_dir / "blues",
                                               "-f", "csv").stdout)))
    assert len(rows) == 6 and {r["true"] for r in rows} == {"reds", "blues"}  # class folders given one by one
    loose = json.loads(run("predict", head, holdout_dir / "reds" / "reds_000.png", "-f", "json").stdout)["predictions"]
    assert set(loose[0]) == {"path", "predicted", "probabilities"}  # no class folder, no truth claimed


def test_models_and_info(cli_store: Path):
    models = json.loads(run("models", "-f", "json").stdout)
    assert len(models) == 41 and {"name", "input_size", "dim", "params", "top1", "top5", "size_mb", "depth",
                                  "images_per_second"} <= set(models[0])
    b0 = {m["name"]: m for m in models}["efficientnetb0"]
    assert (b0["dim"], b0["top1"], b0["top5"], b0["size_mb"], b0["depth"]) == (1280, 0.771, 0.933, 29, 132)
    assert {m["name"]: m for m in models}["convnexttiny"]["top1"] is None  # Keras publishes none: null, not invented
    info = json.loads(run("info", cli_store, "-f", "json").stdout)
    assert info["rows"] == 24 and info["skipped"] == 1 and info["labels"]["reds"] == 6
    assert info["provenance"]["weights"] == "random" and info["index"]["state"] == "up to date" and info["kind"] == "store"
    assert "RANDOM weights" in run("info", cli_store).stdout


@pytest.mark.parametrize("args, message", [
    (["embed", "/no/such/folder", "-o", "x.h5"], "no such file or folder"),
    (["embed", ".", "-o", "x.h5", "-m", "resnet9000"], "unknown model 'resnet9000'"),
    (["query", "/no/such.h5", "q.png"], "no such store"),
    (["predict", "/no/head.h5", "q.png"], "no such head file"),
    (["index", "/no/such.h5"], "no such store"),
    (["index", "/no/such.h5", "--faiss-gpu", "on"], "the installed faiss has no GPU support"),
])
def test_bad_input_is_one_line_and_non_zero(args, message, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("imgvec: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_models_sort_by_any_column_and_cite_the_benchmark():
    by_top1 = json.loads(run("models", "-f", "json", "--sort", "top1").stdout)
    published = [m["top1"] for m in by_top1 if m["top1"] is not None]
    assert published == sorted(published, reverse=True) and by_top1[0]["name"] == "efficientnetv2l"
    assert all(m["top1"] is None for m in by_top1[len(published):])  # unpublished last
    assert [m["name"] for m in json.loads(run("models", "-f", "json", "--sort", "name").stdout)][:2] == [
        "convnextbase", "convnextlarge"]
    table = run("models", "--sort", "images_per_second").stdout
    assert "keras.io/api/applications" in table and "benchmarks/results/embed.json" in table
    measured = json.loads((Path(__file__).parents[1] / "benchmarks/results/embed.json").read_text())
    speeds = {m["name"]: m["images_per_second"] for m in json.loads(run("models", "-f", "json").stdout)}
    for m in measured["models"]:  # the registry quotes the committed benchmark, rounded
        assert speeds[m["model"]] == round(m["images_per_s"]["imgvec_openvino"], 1)
    r = run("models", "--sort", "speed", code=2)
    assert r.stderr.startswith("imgvec: error: --sort 'speed': expected one of name, input_size")


@pytest.mark.parametrize("args, message", [
    (["query", "s.h5", "q.png", "--format", "xml"], "Invalid value for --format: 'xml' is not one of table, json, csv"),
    (["query"], "Missing argument"),
    (["models", "--colour"], "No such option: --colour"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["embed", ".", "-o", "x.h5", "--workers", "0"], "--workers must be at least 1, not 0"),
    (["embed", ".", "-o", "x.h5", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
])
def test_usage_errors_look_like_every_other_error(args, message, tmp_path: Path, monkeypatch):
    """typer's own usage errors: one `imgvec: error:` line and exit 2, like any other bad input."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("imgvec: error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "╭" not in result.stderr and "Traceback" not in result.stderr


def test_help_shows_the_ray_extra_literally():
    text = " ".join(run("embed", "--help").stdout.split())
    assert "pip install 'imgvec[ray]'" in text


def test_class_folders_given_one_by_one_are_labelled(tmp_path: Path, image_dir: Path):
    store = tmp_path / "a.h5"
    r = run("embed", image_dir / "reds", image_dir / "blues", "-o", store, *SMALL_ARGS)
    assert "12 images embedded" in r.stdout and "model built in" in r.stdout and "images/s" in r.stdout
    info = json.loads(run("info", store, "-f", "json").stdout)
    assert info["labels"] == {"blues": 6, "reds": 6} and info["unlabelled"] == 0
    assert info["root"] == str(image_dir)
    r = run("embed", image_dir / "greens", "-o", store)  # resumed: labelled under the store's root
    assert json.loads(run("info", store, "-f", "json").stdout)["labels"]["greens"] == 6
    assert "images/s" in r.stdout and "1 already" not in r.stdout


def test_interrupt_says_what_is_stored_and_how_to_resume(tmp_path: Path, image_dir: Path, monkeypatch):
    import imgvec.cli.reporter

    calls = []

    def interrupt_on_second_batch(self, done: int, total: int, phase: str = "") -> None:
        if phase.startswith("embedding") and done:
            calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(imgvec.cli.reporter.Reporter, "__call__", interrupt_on_second_batch)
    store = tmp_path / "s.h5"
    result = CliRunner().invoke(app, ["embed", str(image_dir), "-o", str(store), *SMALL_ARGS, "--batch-size", "4"])
    assert result.exit_code == 130
    line = result.stderr.strip().splitlines()[-1]
    rows = json.loads(run("info", store, "-f", "json").stdout)["rows"]
    assert rows == 8 and line == (f"imgvec: interrupted; {rows} rows are safely stored in {store}; "
                                  "running the same command again resumes from there")
    monkeypatch.undo()
    again = run("embed", image_dir, "-o", store, *SMALL_ARGS, "--batch-size", "4")
    assert f"{24 - rows} images embedded, {rows} already there" in again.stdout


def test_dedup_says_what_found_each_group_and_lists_copies_once(tmp_path: Path, image_dir: Path):
    from PIL import Image

    folder = tmp_path / "photos"
    shutil.copytree(image_dir, folder)
    shutil.copy(folder / "reds" / "reds_000.png", folder / "reds" / "copy.png")  # byte-identical
    Image.open(folder / "reds" / "reds_000.png").save(folder / "reds" / "resaved.jpg", quality=92)  # near
    store = tmp_path / "s.h5"
    run("embed", folder, "-o", store, *SMALL_ARGS)
    table = run("dedup", store, "-t", "0.99").stdout
    assert "1 group of identical files (sha256), 1 group of near duplicates: cosine >= 0.99" in table
    assert "mobilenetv3small @ 64px, RANDOM weights" in table.splitlines()[0]
    data = json.loads(run("dedup", store, "-t", "0.99", "-f", "json").stdout)
    assert data["root"] == str(folder) and data["threshold"] == 0.99
    exact, near = data["groups"]
    assert exact["found_by"] == "identical files (sha256)" and {i["path"] for i in exact["images"]} == {
        str(folder / "reds" / "copy.png"), str(folder / "reds" / "reds_000.png")}
    assert near["found_by"].startswith("cosine >= 0.99 on mobilenetv3small @ 64px features, RANDOM weights")
    paths = [i["path"] for i in near["images"]]
    resaved = str(folder / "reds" / "resaved.jpg")
    assert len(paths) == 2 and resaved in paths  # one of the identical pair stands for both
    stands_for = [i for i in near["images"] if i["path"] != resaved][0]
    assert stands_for["identical_files_group"] == 1
    assert "(identical files: group 1)" in table
    page = run("dedup", store, "-t", "0.99", "-f", "html").stdout
    assert "cosine &gt;= 0.99 on mobilenetv3small @ 64px features" in page and "identical files: group 1" in page


def test_appending_with_another_backbone_is_refused(tmp_path: Path, image_dir: Path):
    """One store, one embedding space: a second backbone cannot be mixed into it."""
    other = tmp_path / "other.h5"
    run("embed", image_dir, "-o", other, "-m", "mobilenetv2", "--weights", "none", "--image-size", "64")
    r = run("embed", image_dir, "-o", other, *SMALL_ARGS, code=3)
    assert "backbone: mobilenetv2 vs mobilenetv3small" in r.stderr


def test_real_process_entry_point(tmp_path: Path, image_dir: Path):
    """`python -m imgvec` works, keeps stdout clean for JSON, and --help needs no TensorFlow."""
    out = subprocess.run([sys.executable, "-m", "imgvec", "models", "-f", "json"], capture_output=True, text=True,
                         check=True)
    assert len(json.loads(out.stdout)) == 41
    heavy = ("tensorflow", "keras", "sklearn", "scipy", "openvino", "faiss")  # --help starts in a fraction of a second
    code = ("import sys, imgvec.cli; imgvec.cli.app(['--help'], standalone_mode=False); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("[]")


def test_real_process_stderr_has_no_tensorflow_start_up_chatter(tmp_path: Path, image_dir: Path):
    """TensorFlow's native INFO lines (oneDNN, CUDA probing) are not shown; imgvec's own lines are."""
    out = subprocess.run([sys.executable, "-m", "imgvec", "embed", str(image_dir), "-o", str(tmp_path / "s.h5"),
                          *SMALL_ARGS], capture_output=True, text=True, check=True)
    assert "RANDOM weights" in out.stderr
    assert out.stderr.startswith("imgvec: "), "no blank line (or anything else) before imgvec's own lines"
    for noise in ("absl::InitializeLog", "oneDNN custom operations", "cuda", "I0000"):
        assert noise not in out.stderr, out.stderr


def test_device_gpu_without_a_gpu_is_one_line(tmp_path: Path, image_dir: Path):
    result = CliRunner().invoke(app, ["embed", str(image_dir), "-o", str(tmp_path / "s.h5"), *SMALL_ARGS,
                                      "--device", "gpu"])
    assert result.exit_code == 2 and "--device gpu: TensorFlow sees no GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "s.h5").exists()


def test_merge_cli(cli_store: Path, tmp_path: Path):
    r = run("merge", cli_store, cli_store, "-o", tmp_path / "all.h5")
    assert "24 rows from 2 stores (24 duplicate paths dropped" in r.stdout
    info = json.loads(run("info", tmp_path / "all.h5", "-f", "json").stdout)
    assert info["rows"] == 24 and info["provenance"]["precision"] == "float32"


@pytest.mark.parametrize("command", [
    ["query", "{store}", "{photo}"],
    ["predict", "{head}", "{photo}"],
    ["evaluate", "{head}", "{folder}"],
    ["compare", "{folder}", "-m", "mobilenetv3small", "--stores", "{tmp}/stores"],
])
def test_html_output_is_checked_before_the_work(command, cli_store: Path, tmp_path: Path):
    """A missing folder for --html is one line at once, not a traceback after the whole run."""
    values = dict(store=cli_store, photo=cli_store.parent / "photos" / "reds" / "reds_000.png",
                  head=tmp_path / "head.h5", folder=cli_store.parent / "photos", tmp=tmp_path)
    if command[0] in ("predict", "evaluate"):
        run("train", cli_store, "-o", values["head"], "--cv", "2")
    args = [a.format(**values) for a in command] + ["--html", str(tmp_path / "missing" / "page.html")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == f"imgvec: error: cannot write {tmp_path}/missing/page.html: the folder " \
                            f"{tmp_path}/missing does not exist\n"
    assert result.stdout == "" and not (tmp_path / "stores").exists()  # nothing was computed or written


# -- records: the CLI prints what the api's results say, and every path opens -------------------
@pytest.fixture(scope="module")
def cli_head(cli_store: Path, tmp_path_factory) -> Path:
    head = tmp_path_factory.mktemp("head") / "head.h5"
    run("train", cli_store, "-o", head, "--cv", "3")
    return head


@pytest.fixture()
def messy_inputs(tmp_path: Path, holdout_dir: Path) -> Path:
    """Held-out class folders with one file that cannot be decoded."""
    folder = tmp_path / "inputs"
    shutil.copytree(holdout_dir, folder)
    (folder / "reds" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


def _json(*args) -> dict:
    return json.loads(run(*args).stdout)


def test_cli_json_is_the_api_records(cli_store: Path, cli_head: Path, messy_inputs: Path):
    """The same records, whoever asks: a notebook (result.to_records()), the CLI's JSON, a service."""
    import imgvec

    assert _json("query", cli_store, messy_inputs, "-k", "3", "-f", "json") == imgvec.query(
        cli_store, [messy_inputs], k=3).to_records()
    assert _json("predict", cli_head, messy_inputs, "-f", "json") == imgvec.predict(
        cli_head, [messy_inputs]).to_records()
    assert _json("dedup", cli_store, "-t", "0.9", "-f", "json") == imgvec.dedup(cli_store, threshold=0.9).to_records()
    assert _json("evaluate", cli_head, messy_inputs, "-f", "json") == imgvec.evaluate(
        cli_head, messy_inputs).to_records()
    assert _json("info", cli_store, "--skipped", "-f", "json") == imgvec.api.skipped_files(cli_store).to_records()


def test_skipped_inputs_are_in_query_and_predict_json(cli_store: Path, cli_head: Path, messy_inputs: Path):
    broken = str(messy_inputs / "reds" / "broken.jpg")
    for data in (_json("query", cli_store, messy_inputs, "-k", "1", "-f", "json"),
                 _json("predict", cli_head, messy_inputs, "-f", "json")):
        assert [s["path"] for s in data["skipped"]] == [broken] and data["skipped"][0]["reason"]
    assert len(_json("predict", cli_head, messy_inputs, "-f", "json")["predictions"]) == 12


def _paths(data) -> list[str]:
    """Every value under a "path", "query", "store", "root", "head" or "data" key of a JSON document."""
    if isinstance(data, list):
        return [p for item in data for p in _paths(item)]
    if not isinstance(data, dict):
        return []
    own = [v for k, v in data.items() if k in ("path", "query", "store", "root", "head", "data") and v]
    return own + [p for v in data.values() for p in _paths(v)]


def test_json_and_csv_paths_open_from_another_folder(cli_store: Path, cli_head: Path, messy_inputs: Path,
                                                     tmp_path: Path, monkeypatch):
    """Inputs given relative to one folder; every path the answers name opens from another."""
    monkeypatch.chdir(messy_inputs.parent)
    rel = messy_inputs.name
    store_copy = Path("photos.h5")
    shutil.copy(cli_store, store_copy)
    answers = [_json("query", store_copy, rel, "-k", "3", "-f", "json"),
               _json("predict", cli_head, rel, "-f", "json"),
               _json("dedup", store_copy, "-t", "0.9", "-f", "json"),
               _json("evaluate", cli_head, rel, "-f", "json"),
               _json("info", store_copy, "--skipped", "-f", "json")]
    csv_paths = [row["path"] for args in (["query", store_copy, rel, "-k", "2"], ["predict", cli_head, rel],
                                         ["dedup", store_copy, "-t", "0.9"], ["info", store_copy, "--skipped"])
                 for row in csv.DictReader(io.StringIO(run(*args, "-f", "csv").stdout))]
    assert answers[0]["root"] == answers[2]["root"] == str(cli_store.parent / "photos")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    paths = [p for data in answers for p in _paths(data)] + csv_paths
    assert len(paths) > 100 and len(csv_paths) > 40
    missing = [p for p in paths if not Path(p).exists()]
    assert missing == []
    assert all(Path(p).is_absolute() for p in paths)  # one rule: never relative to a store root or an old cwd


def test_dedup_writes_html_like_the_other_commands(cli_store: Path, tmp_path: Path, monkeypatch):
    page = tmp_path / "dups.html"
    r = run("dedup", cli_store, "-t", "0.9", "-f", "json", "--html", page)
    assert f"imgvec: wrote {page}" in r.stderr and "groups" in json.loads(r.stdout)  # stdout stays the JSON
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "imgvec dedup" in text
    assert "(sha256) (sha256" not in text
    import types

    import imgvec
    import imgvec.analyses.duplicates as duplicates

    clock = iter([5000.0, 5002.5])  # the search's start and end: its own time, never the clock's reading
    monkeypatch.setattr(duplicates, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert imgvec.dedup(cli_store, threshold=0.9).seconds == 2.5
    monkeypatch.undo()
    r = CliRunner().invoke(app, ["dedup", str(cli_store), "--html", str(tmp_path / "no" / "x.html")])
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_info_lists_skipped_files_with_reasons(cli_store: Path):
    table = run("info", cli_store, "--skipped").stdout
    assert "1 file skipped" in table and "reds/broken.jpg" in table
    data = _json("info", cli_store, "--skipped", "-f", "json")
    assert data["skipped"] == [{"path": str(cli_store.parent / "photos" / "reds" / "broken.jpg"),
                                "reason": data["skipped"][0]["reason"]}] and data["skipped"][0]["reason"]
    rows = list(csv.DictReader(io.StringIO(run("info", cli_store, "--skipped", "-f", "csv").stdout)))
    assert [r["path"] for r in rows] == [data["skipped"][0]["path"]] and rows[0]["reason"]


def test_train_and_evaluate_print_chance_from_the_class_counts(tmp_path: Path, image_dir: Path):
    """4 reds and 6 blues: the majority guess scores 0.6, the random one 0.52 ± sqrt(10 * 0.24) / 10."""
    folder = tmp_path / "photos"
    shutil.copytree(image_dir / "blues", folder / "blues")
    (folder / "reds").mkdir()
    for p in sorted((image_dir / "reds").glob("*.png"))[:4]:
        shutil.copy(p, folder / "reds" / p.name)
    store = tmp_path / "s.h5"
    run("embed", folder, "-o", store, *SMALL_ARGS)
    r = run("train", store, "-o", tmp_path / "h.h5", "--cv", "2")
    assert ("chance: 0.600 always guessing the most common class, 0.520 ± 0.155 guessing by the class shares "
            "(on the 10 training images)") in r.stdout
    r = run("evaluate", tmp_path / "h.h5", folder)
    assert r.stdout.strip().splitlines()[-1].endswith("on 10 images (chance: 0.600 always guessing the most "
                                                      "common class, 0.520 ± 0.155 guessing by the class shares)")


def test_cosmetics_plurals_numbers_index_and_provenance(tmp_path: Path, image_dir: Path, monkeypatch):
    store = tmp_path / "one.h5"
    r = run("embed", image_dir / "reds" / "reds_000.png", "-o", store, *SMALL_ARGS)
    assert "1 image embedded" in r.stdout and "1 row in all" in r.stdout
    r = run("query", store, image_dir / "reds" / "reds_001.png", "-k", "1")
    assert "exact search in memory (no index file)" in r.stdout.splitlines()[0] and "flat index" not in r.stdout
    run("index", store)
    assert "flat index " + str(store.parent / "one.index.h5") in run("query", store, image_dir / "reds").stdout
    info = run("info", store).stdout
    assert "tensorflow_version" not in info  # OpenVINO ran the model: nothing to show, no blank row
    assert "created (when the embeddings were made)" in info
    import imgvec.api
    from imgvec.results import CacheSummary
    from imgvec.runtime.loader import CacheEntry

    entry = CacheEntry(tmp_path / "m", "mobilenetv2", 224, "imagenet", 29_200_000, "", 60.0, True)
    monkeypatch.setattr(imgvec.api, "cache", lambda clear=False: CacheSummary(tmp_path, [entry]))
    table = run("cache").stdout
    assert "1 compiled model, 29.2 MB" in table and "29.2000" not in table and "0.0000" not in table
    assert " 0.0 " in table and " 29.2 " in table
