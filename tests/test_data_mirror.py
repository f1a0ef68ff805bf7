"""Data directories on a bucket: written once through the local mirror, read by any host."""
import os

import ml_collections
import pytest
from etils import epath
from array_record.python.array_record_module import ArrayRecordWriter

from m2omni_jax.data import mirror
from m2omni_jax.data.sources import array_record
from m2omni_jax.experiments.shapes_world import source
from m2omni_jax.experiments.shapes_world import writer as wsw
from test_workdir import bucket  # noqa: F401  (the in-memory gs:// fixture)


def test_local_paths_pass_through_and_urls_map_into_the_mirror(tmp_path):
    assert mirror.local_path("~/data") == os.path.expanduser("~/data")
    assert mirror.local_path("gs://b/data/x", str(tmp_path)) == str(tmp_path / "gs" / "b" / "data" / "x")
    assert mirror.local_path("gs://b/../x", str(tmp_path)) == str(tmp_path / "gs" / "b" / "x")  # never above it
    with mirror.mirrored(str(tmp_path / "here")) as local:
        assert local == str(tmp_path / "here")


def test_shapes_world_on_a_bucket_is_written_once_and_copied_down_by_the_next_host(tmp_path, monkeypatch, bucket):  # noqa: F811
    config = ml_collections.ConfigDict({"data": {"dir": "gs://bucket/data", "seed": 0}})
    world = ml_collections.ConfigDict({"dir": "", "num_train": 4, "num_eval": 2, "tasks": ("caption", "ocr")})
    remote = source.shapes_world_dir(config, world)
    assert remote.startswith("gs://bucket/data/shapes_world/")

    monkeypatch.setenv("M2OMNI_MIRROR_DIR", str(tmp_path / "host0"))
    local0, tasks = source.write_builtin_shapes_world(config, world)
    assert local0.startswith(str(tmp_path / "host0"))
    key = remote[len("gs://"):]
    names = {k.rsplit("/", 1)[1] for k in bucket if k.startswith(f"/{key}/")}
    assert names == {"manifest.json", "shapes_world-train.array_record", "shapes_world-eval.array_record"}
    assert bucket[f"/{key}/shapes_world-train.array_record"].getvalue() == \
        open(wsw.split_path(local0, "train"), "rb").read()

    # Another host: its mirror is empty; it copies the variant down (a marker file put only in
    # the bucket arrives too) and reads the same records.
    epath.Path(f"{remote}/written_by.txt").write_text("host0")
    monkeypatch.setenv("M2OMNI_MIRROR_DIR", str(tmp_path / "host1"))
    local1, tasks1 = source.write_builtin_shapes_world(config, world)
    assert local1.startswith(str(tmp_path / "host1")) and tasks1 == tasks
    assert open(os.path.join(local1, "written_by.txt")).read() == "host0"
    assert [wsw.open_split(local1, "eval")[i] for i in range(2)] == [wsw.open_split(local0, "eval")[i] for i in range(2)]


def test_array_record_files_on_a_bucket_are_globbed_and_read_locally(tmp_path, monkeypatch, bucket):  # noqa: F811
    made = tmp_path / "made"
    made.mkdir()
    for k in range(2):
        w = ArrayRecordWriter(str(made / f"part-{k}.array_record"), "group_size:1")
        w.write(f"record {k}".encode())
        w.close()
    mirror.upload_dir(str(made), "gs://bucket/mine")
    monkeypatch.setenv("M2OMNI_MIRROR_DIR", str(tmp_path / "mirror"))
    files = array_record.expand_files("gs://bucket/mine/part-*.array_record", "config.data.sources.mine.train_files")
    assert [os.path.basename(f) for f in files] == ["part-0.array_record", "part-1.array_record"]
    assert all(f.startswith(str(tmp_path / "mirror")) for f in files)
    assert [array_record.ArrayRecordFiles(files)[i] for i in range(2)] == [b"record 0", b"record 1"]
    with pytest.raises(FileNotFoundError, match="train_files='gs://bucket/mine/none-\\*' matches no file"):
        array_record.expand_files("gs://bucket/mine/none-*", "config.data.sources.mine.train_files")
