"""Predictions files `focalnet evaluate` refuses, naming the file and the reason: missing or
misshapen contract keys, an unreadable .npz, no patient id, an unsafe case id, a lesion on no
slice, no pixel."""

from __future__ import annotations

import json
import struct
import zipfile

import numpy as np
import pytest
from cli_calls import cli_error, run_cli
from evaluation_cohort import _evaluate_argv, write_blob_case

from focalnet_jax.evaluation.predictions import PredictionsError, read_case, write_case


def test_bad_predictions_name_file_and_reason(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = cli_error(["evaluate", "--predictions", str(empty), "--out", str(tmp_path / "o")])
    assert str(empty) in message and "no <case_id>.npz" in message

    good = write_blob_case(tmp_path / "good", "ok", lesion=(2, (4, 20, 20)))
    with np.load(good) as data:
        arrays = dict(data)
    missing = tmp_path / "missing"
    missing.mkdir()
    np.savez(missing / "case.npz", **{k: v for k, v in arrays.items() if k != "spacing"})
    message = cli_error(["evaluate", "--predictions", str(missing), "--out", str(tmp_path / "o")])
    assert str(missing / "case.npz") in message and "missing contract key(s) ['spacing']" in message

    shapes = tmp_path / "shapes"
    shapes.mkdir()
    np.savez(shapes / "case.npz", **{**arrays, "lesions": arrays["lesions"][:, :40]})
    with pytest.raises(
        PredictionsError, match=r"case\.npz: 'lesions' shape \(8, 40, 48\) does not"
    ):
        read_case(shapes / "case.npz")

    np.savez(shapes / "case.npz", **{**arrays, "lesion_classes": np.array([], np.int32)})
    with pytest.raises(PredictionsError, match=r"case\.npz: 'lesions' ids must lie in 0\.\.0"):
        read_case(shapes / "case.npz")

    # float16 scores passed the check and ended in scipy's traceback (no file named); big-endian
    # float32 is float32.
    np.savez(shapes / "case.npz", **{**arrays, "scores": arrays["scores"].astype(np.float16)})
    message = cli_error(["evaluate", "--predictions", str(shapes), "--out", str(tmp_path / "o")])
    assert message.endswith("case.npz: 'scores' must be float32 (or float64), got float16")
    assert not (tmp_path / "o").exists()
    np.savez(shapes / "case.npz", **{**arrays, "scores": arrays["scores"].astype(">f4")})
    assert read_case(shapes / "case.npz").scores.dtype == np.dtype(">f4")

    (shapes / "case.npz").write_bytes(b"")  # a writer killed, a full disk: numpy's EOFError
    with pytest.raises(PredictionsError, match=r"case\.npz: not a readable \.npz file \(No data"):
        read_case(shapes / "case.npz")

    (shapes / "case.npz").write_text("not a zip")
    with pytest.raises(PredictionsError, match=r"case\.npz: not a valid predictions \.npz file"):
        read_case(shapes / "case.npz")

    # Each ended in a traceback: a .npy under the .npz name, a damaged compressed member, and a
    # member that is no .npy array.
    with (shapes / "case.npz").open("wb") as f:
        np.save(f, arrays["scores"])
    with pytest.raises(PredictionsError, match=r"case\.npz: not a valid predictions \.npz file "
                                               r"\(one \.npy array, not a zip"):  # fmt: skip
        read_case(shapes / "case.npz")
    np.savez_compressed(shapes / "case.npz", **arrays)
    assert read_case(shapes / "case.npz").scores.shape == arrays["scores"].shape
    with zipfile.ZipFile(shapes / "case.npz") as archive:
        info = archive.getinfo("scores.npy")
    data = bytearray((shapes / "case.npz").read_bytes())
    name_and_extra = sum(
        struct.unpack("<2H", data[info.header_offset + 26 : info.header_offset + 30])
    )
    start = info.header_offset + 30 + name_and_extra  # after the member's local header
    data[start : start + 8] = b"\xff" * 8  # the deflate stream's first bytes
    (shapes / "case.npz").write_bytes(bytes(data))
    with pytest.raises(PredictionsError, match=r"case\.npz: not a readable \.npz file \(Error"):
        read_case(shapes / "case.npz")
    np.savez(shapes / "case.npz", **arrays)
    with zipfile.ZipFile(shapes / "case.npz", "a") as archive:
        archive.writestr("t2w", b"not an array")
    with pytest.raises(PredictionsError, match=r"case\.npz: 't2w' is no \.npy array"):
        read_case(shapes / "case.npz")


def test_predictions_without_a_patient_id_are_refused(tmp_path):
    """The FP rate is per patient id: three lesion-free cases of patient id '' (or 'None', which
    str(None) wrote) were one patient, their 3 false positives 3 FP per patient, not 1."""
    for case_id, peak in (("n1", 0.7), ("n2", 0.6), ("n3", 0.5)):
        write_blob_case(tmp_path / "given", case_id, blobs=[((4, 24, 24), peak)])
    out = tmp_path / "given_eval"
    run_cli(["evaluate", "--predictions", str(tmp_path / "given"), "--out", str(out),
             "--no-picai", "--no-figures"])  # fmt: skip
    curve = json.loads((out / "metrics.json").read_text())["froc"]["all"]["curve"]
    assert curve["fp"] == pytest.approx([1 / 3, 2 / 3, 1.0])  # one FP each, 3 patients
    empty = tmp_path / "empty_id"
    empty.mkdir()
    for case_id in ("n1", "n2", "n3"):
        with np.load(tmp_path / "given" / f"{case_id}.npz") as data:
            np.savez(empty / f"{case_id}.npz", **{**dict(data), "patient_id": np.asarray("")})
    message = cli_error(["evaluate", "--predictions", str(empty), "--out", str(tmp_path / "o")])
    assert f"{empty / 'n1.npz'}: 'patient_id' is empty" in message
    assert not (tmp_path / "o").exists()
    with np.load(tmp_path / "given" / "n1.npz") as data:
        arrays = {k: data[k] for k in ("scores", "lesions", "lesion_classes", "spacing")}
    with pytest.raises(PredictionsError, match=r"n1\.npz: 'patient_id' is None"):
        write_case(tmp_path / "none", "n1", patient_id=None, **arrays)
    # Saved as bytes (h5py-based tools): read as "b'P1'", another patient than 'P1'.
    with np.load(tmp_path / "given" / "n1.npz") as data:
        np.savez(tmp_path / "given" / "n1.npz", **{**dict(data), "patient_id": np.bytes_(b"n2")})
    with np.load(tmp_path / "given" / "n2.npz") as data:
        np.savez(tmp_path / "given" / "n2.npz", **{**dict(data), "patient_id": np.asarray("n2")})
    assert read_case(tmp_path / "given" / "n1.npz").patient_id == "n2"
    run_cli(["evaluate", "--predictions", str(tmp_path / "given"), "--out", str(out),
             "--no-picai", "--no-figures"])  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["num_patients"] == 2
    with np.load(tmp_path / "given" / "n1.npz") as data:
        np.savez(tmp_path / "given" / "n1.npz", **{**dict(data), "patient_id": np.bytes_(b"\xff")})
    with pytest.raises(PredictionsError, match=r"n1\.npz: 'patient_id' must be a string"):
        read_case(tmp_path / "given" / "n1.npz")


def test_predictions_with_unsafe_names_or_a_lesion_on_no_slice_are_refused(tmp_path):
    for name in ("a b", ".hidden"):
        folder = tmp_path / name.strip(".").replace(" ", "_")
        write_blob_case(folder, "ok", lesion=(2, (4, 20, 20)))
        (folder / "ok.npz").rename(folder / f"{name}.npz")
        message = cli_error(
            ["evaluate", "--predictions", str(folder), "--out", str(tmp_path / "o")]
        )
        assert f"{folder}: case id of {name}.npz {name!r}" in message
        assert not (tmp_path / "o").exists()
    with np.load(write_blob_case(tmp_path / "five", "c", lesion=(5, (4, 20, 20)))) as data:
        arrays = dict(data)
    for key in ("scores", "lesions", "t2w", "adc", "slice_index"):
        arrays[key] = arrays[key][:1]  # slice 0 alone: the GS 5 lesion (slices 3-5) would vanish
    np.savez(tmp_path / "empty.npz", **arrays)
    with pytest.raises(
        PredictionsError, match=r"lesion id\(s\) \[1\] of 'lesion_classes' appear on no"
    ):
        read_case(tmp_path / "empty.npz")


@pytest.mark.parametrize("shape", [(0, 48, 48), (8, 0, 48), (8, 48, 0)])
def test_predictions_without_a_pixel_are_refused_in_one_line(tmp_path, shape):
    """A lesion-free case with no slice (or no row, or no column) passed validation and
    `focalnet evaluate` then failed in the local maxima with a NumPy traceback ("zero-size array
    to reduction operation maximum")."""
    arrays = {"scores": np.zeros((*shape, 5), np.float32), "lesions": np.zeros(shape, np.int32),
              "lesion_classes": np.zeros(0, np.int32)}  # fmt: skip
    with pytest.raises(PredictionsError, match=r"e\.npz: 'scores' shape .* holds no pixel"):
        write_case(tmp_path / "w", "e", spacing=(0.625, 0.625), patient_id="p", **arrays)
    write_blob_case(tmp_path / "p", "c1", blobs=[((4, 24, 24), 0.3)])
    np.savez(tmp_path / "p" / "e.npz", spacing=np.float32([0.625, 0.625]),
             patient_id=np.asarray("p"), **arrays)  # fmt: skip
    message = cli_error(_evaluate_argv(tmp_path / "p", tmp_path / "o"))
    assert f"{tmp_path / 'p' / 'e.npz'}: 'scores' shape {(*shape, 5)} holds no pixel" in message
    assert not (tmp_path / "o").exists()
