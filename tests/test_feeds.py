"""Feeds: real data in every accepted format, synthetic inputs, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from modelshrink.errors import ConfigError, DataError
from modelshrink.feeds import input_specs, load_feeds, parse_input_shapes

import models


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def test_parse_input_shapes() -> None:
    assert parse_input_shapes(["x:1x3x224x224", "ids:2,16"]) == {"x": (1, 3, 224, 224), "ids": (2, 16)}
    assert parse_input_shapes(["a:b:4x4"]) == {"a:b": (4, 4)}
    for bad in ("x", "x:", ":1x2", "x:1xx2", "x:0x2", "x:-1"):
        with pytest.raises(ConfigError):
            parse_input_shapes([bad])


def test_synthetic_dynamic_batch_is_one_and_recorded_without_a_warning() -> None:
    feeds = load_feeds(_ir(models.mlp()), data=None, seed=3, samples=4)
    assert len(feeds) == 4 and not feeds.real
    assert feeds.samples[0]["x"].shape == (1, 16)
    assert feeds.samples[0]["x"].dtype == np.float32
    assert not feeds.warnings  # a batch of 1 is what verification needs: nothing to warn about
    (info,) = feeds.inputs
    assert info.shape == (1, 16) and info.guessed_shape and info.declared == "[batch,16]"


def test_synthetic_is_seeded() -> None:
    a = load_feeds(_ir(models.mlp()), data=None, seed=1, samples=2)
    b = load_feeds(_ir(models.mlp()), data=None, seed=1, samples=2)
    c = load_feeds(_ir(models.mlp()), data=None, seed=2, samples=2)
    np.testing.assert_array_equal(a.samples[1]["x"], b.samples[1]["x"])
    assert not np.array_equal(a.samples[1]["x"], c.samples[1]["x"])


def test_input_shape_override_and_validation() -> None:
    model = _ir(models.mlp())
    feeds = load_feeds(model, data=None, input_shapes={"x": (5, 16)}, samples=1)
    assert feeds.samples[0]["x"].shape == (5, 16) and not feeds.warnings
    with pytest.raises(ConfigError, match="fixed at 16"):
        load_feeds(model, data=None, input_shapes={"x": (5, 17)})
    with pytest.raises(ConfigError, match="no such input"):
        load_feeds(model, data=None, input_shapes={"nope": (1, 16)})
    with pytest.raises(ConfigError, match="dims"):
        load_feeds(model, data=None, input_shapes={"x": (1, 2, 16)})


def test_input_shape_overrides_a_minus_one_dim() -> None:
    """Paddle exports write a dynamic axis as dim_value -1 (PP-OCR's classifier): it is dynamic."""
    proto = models.mlp()
    proto.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    feeds = load_feeds(_ir(proto), data=None, input_shapes={"x": (3, 16)}, samples=1)
    assert feeds.samples[0]["x"].shape == (3, 16)


def test_integer_inputs_feeding_gather_stay_in_range() -> None:
    model = _ir(models.token_model(vocab=7))
    spec = input_specs(model)[0]
    assert spec.index_bound == 7
    feeds = load_feeds(model, data=None, input_shapes={"ids": (4, 32)}, samples=3)
    ids = np.stack([f["ids"] for f in feeds.samples])
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 7 and ids.max() > 3


def test_huge_declared_shape_is_refused() -> None:
    model = _ir(models.mlp())
    with pytest.raises(DataError, match="too many"):
        load_feeds(model, data=None, input_shapes={"x": (100_000_000, 16)})


def test_npz_batched_rows_split_into_batches_of_one(tmp_path: Path) -> None:
    x = np.arange(5 * 16, dtype=np.float64).reshape(5, 16)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(5))
    feeds = load_feeds(_ir(models.mlp()), data=str(tmp_path / "d.npz"))
    assert feeds.real and len(feeds) == 5
    assert feeds.samples[2]["x"].shape == (1, 16) and feeds.samples[2]["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds.samples[2]["x"][0], x[2].astype(np.float32))
    assert any("labels" in w for w in feeds.warnings)
    assert any("cast" in w for w in feeds.warnings)


def test_npz_batch_size_from_input_shape_and_samples_cap(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 16), np.float32))
    feeds = load_feeds(_ir(models.mlp()), data=str(tmp_path / "d.npz"), input_shapes={"x": (4, 16)})
    assert [f["x"].shape for f in feeds.samples] == [(4, 16), (4, 16)]
    capped = load_feeds(_ir(models.mlp()), data=str(tmp_path / "d.npz"), samples=3)
    assert len(capped) == 3 and "3 of 10" in capped.source


def test_npz_one_full_input_per_row(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2, 16), np.float32))
    feeds = load_feeds(_ir(models.mlp()), data=str(tmp_path / "d.npz"))
    assert [f["x"].shape for f in feeds.samples] == [(2, 16)] * 3


def test_folder_of_npy_and_single_npy(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    np.save(folder / "x.npy", np.ones((2, 16), np.float32))
    assert len(load_feeds(_ir(models.mlp()), data=str(folder))) == 2
    np.save(tmp_path / "one.npy", np.ones((3, 16), np.float32))
    assert len(load_feeds(_ir(models.mlp()), data=str(tmp_path / "one.npy"))) == 3


def test_onnx_test_data_sets(tmp_path: Path) -> None:
    for i in range(2):
        folder = tmp_path / f"test_data_set_{i}"
        folder.mkdir()
        tensor = numpy_helper.from_array(np.full((1, 16), i, np.float32), "x")
        (folder / "input_0.pb").write_bytes(tensor.SerializeToString())
    feeds = load_feeds(_ir(models.mlp()), data=str(tmp_path))
    assert len(feeds) == 2 and feeds.samples[1]["x"][0, 0] == 1.0


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros((2, 16), np.float32)}, "no array for input 'x'"),
        ({"x": np.zeros((2, 15), np.float32)}, r"\[1, 15\].*\[batch,16\]"),
        ({"x": np.zeros((2,), np.float32)}, "rank"),
        ({"x": np.array([["a"] * 16] * 2)}, "dtype"),
        ({"x": np.zeros((0, 16), np.float32)}, "empty"),
    ],
)
def test_bad_npz_is_a_clear_error(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_feeds(_ir(models.mlp()), data=str(tmp_path / "d.npz"))
    assert "\n" not in str(info.value)


def test_unreadable_or_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such"):
        load_feeds(_ir(models.mlp()), data=str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="readable"):
        load_feeds(_ir(models.mlp()), data=str(tmp_path / "bad.npz"))
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(DataError, match="format"):
        load_feeds(_ir(models.mlp()), data=str(tmp_path / "data.csv"))


def test_mismatched_sample_counts(tmp_path: Path) -> None:
    model = _ir(models.constant_and_subgraph())
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 8), np.float32), flag=np.array([True, False]))
    with pytest.raises(DataError, match="different numbers"):
        load_feeds(model, data=str(tmp_path / "d.npz"))


def test_rows_select_samples_of_the_data(tmp_path: Path) -> None:
    x = np.arange(10 * 16, dtype=np.float32).reshape(10, 1, 16)  # 10 samples, one per row
    np.savez(tmp_path / "d.npz", x=x)
    model = _ir(models.mlp())
    picked = {
        spec: [
            int(s["x"][0, 0]) // 16
            for s in load_feeds(model, data=str(tmp_path / "d.npz"), rows=spec).samples
        ]
        for spec in ("2:5", "%5=4", "%5!=4", "::3")
    }
    assert picked == {
        "2:5": [2, 3, 4],
        "%5=4": [4, 9],
        "%5!=4": [0, 1, 2, 3, 5, 6, 7, 8],
        "::3": [0, 3, 6, 9],
    }
    held, calibration = set(picked["%5=4"]), set(picked["%5!=4"])
    assert not held & calibration and held | calibration == set(range(10))  # a split that never leaks
    with pytest.raises(DataError, match="selects none"):
        load_feeds(model, data=str(tmp_path / "d.npz"), rows="20:30")
    for bad in ("x", "%0=0", "%5=5", "1:2:0"):
        with pytest.raises(ConfigError, match="--rows"):
            load_feeds(model, data=str(tmp_path / "d.npz"), rows=bad)


def test_rows_select_rows_not_feeds_when_a_feed_holds_several(tmp_path: Path) -> None:
    """At --input-shape x:4x16 a feed holds 4 rows: --rows still picks rows (as distill does), so
    a split never puts one row on both sides."""
    x = np.repeat(np.arange(40, dtype=np.float32)[:, None], 16, axis=1)  # row i holds i
    np.savez(tmp_path / "d.npz", x=x)
    model = _ir(models.mlp())
    shapes = {"x": (4, 16)}

    def rows_of(spec: str) -> list[list[int]]:
        feeds = load_feeds(model, data=str(tmp_path / "d.npz"), input_shapes=shapes, rows=spec)
        return [s["x"][:, 0].astype(int).tolist() for s in feeds.samples]

    assert rows_of("%5=4") == [[4, 9, 14, 19], [24, 29, 34, 39]]
    assert rows_of("%5!=4")[0] == [0, 1, 2, 3] and len(rows_of("%5!=4")) == 8
    held = {r for f in rows_of("%5=4") for r in f}
    assert not held & {r for f in rows_of("%5!=4") for r in f}
    with pytest.raises(DataError, match="fewer than one feed of 4"):
        rows_of("0:3")
