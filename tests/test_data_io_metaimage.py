"""MetaImage headers checked before ITK reads them: voxel sizes missing or not positive, geometry
fields ITK cannot parse, and data files (compressed, listed, with a header) missing or short."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from image_reads import expect, volume

from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import CaseError, read_image


@pytest.mark.parametrize("size", ["", "ElementSpacing = 0.5 0.6 3\n", "ElementSize = 0.5 0.6 3\n"])
def test_a_metaimage_without_a_voxel_size_is_refused(tmp_path, size):
    # ITK read it with 1 mm voxels without a word: every size, distance and crop in mm wrong.
    head = f"ObjectType = Image\nNDims = 3\nOffset = 1 2 3\n{size}DimSize = 2 3 4\n"
    head += "ElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    path = tmp_path / "x.mha"
    path.write_bytes(head.encode() + bytes(48))
    if size:
        assert read_image(path).GetSpacing() == (0.5, 0.6, 3.0)
        return
    assert sitk.ReadImage(str(path)).GetSpacing() == (1.0, 1.0, 1.0)
    expect(path, "MetaImage header gives no voxel size (no ElementSpacing or ElementSize field)")


@pytest.mark.parametrize("spacing", ["0.5 -0.6 3", "0.5 0.6 -3", "0 0.6 3"])
@pytest.mark.parametrize("field", ["ElementSpacing", "ElementSize"])
def test_a_metaimage_voxel_size_that_is_not_positive_is_refused(tmp_path, field, spacing):
    """ITK mirrors the axis of a negative ElementSpacing without a word: the crop centre moved 51
    mm and two slices were predicted (a negative NIfTI pixdim was refused)."""
    head = f"ObjectType = Image\nNDims = 3\nOffset = 1 2 3\n{field} = {spacing}\n"
    head += "DimSize = 2 3 4\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    path = tmp_path / "x.mha"
    path.write_bytes(head.encode() + bytes(48))
    expect(path, f"MetaImage header field {field} = {spacing!r} gives a voxel size that is not "
            "positive")  # fmt: skip


@pytest.mark.parametrize("compressed", [False, True])
def test_metaimage_header_with_missing_or_short_data_file(tmp_path, capfd, compressed):
    # A `.mhd` header and its `.raw`/`.zraw` data file: a missing or short data file was reported
    # as "File cannot be read: x.mhd", with ITK's own lines on stderr.
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    sitk.WriteImage(image, str(tmp_path / "x.mhd"), useCompression=compressed)
    data = tmp_path / ("x.zraw" if compressed else "x.raw")
    assert read_image(tmp_path / "x.mhd").GetSize() == (6, 5, 4)
    full = data.read_bytes()
    data.write_bytes(full[: len(full) // 2])
    capfd.readouterr()
    kind = "compressed data" if compressed else "image data"
    expected = int(_header(tmp_path / "x.mhd").get("CompressedDataSize", 240))
    with pytest.raises(CaseError, match=rf"{len(full) // 2} bytes of {kind} in {data.name}, "
                                        rf"header promises {expected}\)"):  # fmt: skip
        read_image(tmp_path / "x.mhd", case="c")
    data.unlink()
    with pytest.raises(CaseError, match=f"data file {data} named by the header not found"):
        read_image(tmp_path / "x.mhd", case="c")
    assert capfd.readouterr().err == ""


def _header(path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines)}


@pytest.mark.parametrize(
    ("field", "value"),
    [("Offset", "-10, 20, 5.5"), ("Offset", "-10 20"), ("Offset", "nan 20 5.5"),
     ("Offset", "1_0 20 5.5"), ("ElementSpacing", "0.5 0.7"),
     ("TransformMatrix", "1 0 0 0 1 0 0 0 inf")],
)  # fmt: skip
def test_a_metaimage_geometry_field_itk_cannot_parse_is_refused(tmp_path, field, value):
    """MetaIO read the numbers it could and 0 for the rest: `Offset = -10, 20, 5.5` placed the
    image at (-10, 0, 0), 20 mm from where its header meant, without a word."""
    _, image = volume()
    write_image(image, tmp_path / "ok.mha")
    lines = (tmp_path / "ok.mha").read_bytes().split(b"\n")
    edited = [f"{field} = {value}".encode() if line.startswith(field.encode()) else line
              for line in lines]  # fmt: skip
    assert edited != lines
    (tmp_path / "bad.mha").write_bytes(b"\n".join(edited))
    expect(tmp_path / "bad.mha", f"MetaImage header field {field} = {value!r} is not ")
    assert read_image(tmp_path / "ok.mha").GetOrigin() == pytest.approx((-10.0, 20.0, 5.5))
    # More numbers than NDims: ITK reads the first ones, as is this reader.
    extra = [b"Offset = -10 20 5.5 0" if line.startswith(b"Offset") else line for line in lines]
    (tmp_path / "extra.mha").write_bytes(b"\n".join(extra))
    assert read_image(tmp_path / "extra.mha").GetOrigin() == pytest.approx((-10.0, 20.0, 5.5))


def _int16_volume() -> tuple[np.ndarray, sitk.Image]:
    array = np.random.default_rng(0).integers(1, 1000, (6, 8, 10)).astype(np.int16)
    return array, sitk.GetImageFromArray(array)


def _without(path, field: str) -> None:
    """`path`'s MetaImage header without its line `field = ...`."""
    data = path.read_bytes()
    start = data.index(field.encode())
    path.write_bytes(data[:start] + data[data.index(b"\n", start) + 1 :])


@pytest.mark.parametrize("name", ["x", "my scan é"])
def test_a_compressed_metaimage_without_its_size_or_short_is_refused(tmp_path, capfd, name):
    """Without `CompressedDataSize` the compressed data went unchecked: ITK read a stream cut in
    half (or a whole one it could not size) as other voxels, printing only on stderr. A data
    file named with a space (a file, for MetaIO, as long as it holds no %) went unchecked too."""
    array, image = _int16_volume()
    sitk.WriteImage(image, str(tmp_path / f"{name}.mhd"), useCompression=True)
    _without(tmp_path / f"{name}.mhd", "CompressedDataSize")
    back = read_image(tmp_path / f"{name}.mhd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    full = (tmp_path / f"{name}.zraw").read_bytes()
    (tmp_path / f"{name}.zraw").write_bytes(full[: len(full) // 2])
    capfd.readouterr()
    with pytest.raises(CaseError, match=rf"compressed data in {name}\.zraw inflate to \d+ bytes, "
                                        r"header promises 960\)$"):  # fmt: skip
        read_image(tmp_path / f"{name}.mhd", case="c")
    assert capfd.readouterr().err == ""


def test_a_compressed_metaimage_of_a_gzip_stream_without_its_size_is_read(tmp_path):
    """MetaIO inflates a gzip stream as well as a zlib one."""
    import gzip

    array, image = _int16_volume()
    sitk.WriteImage(image, str(tmp_path / "x.mhd"), useCompression=True)
    _without(tmp_path / "x.mhd", "CompressedDataSize")
    (tmp_path / "x.zraw").write_bytes(gzip.compress(array.tobytes()))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "x.mhd")), array)


def test_a_compressed_flag_written_in_lower_case_is_read_as_metaio_reads_it(tmp_path):
    """`CompressedData = true` (MetaIO takes T, t or 1) was refused as 783 bytes of image data
    where 960 were promised."""
    array, image = _int16_volume()
    sitk.WriteImage(image, str(tmp_path / "x.mha"), useCompression=True)
    data = (tmp_path / "x.mha").read_bytes()
    (tmp_path / "x.mha").write_bytes(
        data.replace(b"CompressedData = True", b"CompressedData = true")
    )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "x.mha")), array)


def test_a_slice_list_short_of_files_or_bytes_is_refused(tmp_path):
    """`ElementDataFile = LIST` naming fewer slice files than DimSize needs: ITK read the missing
    slice from memory it never filled, without a word."""
    array, _ = _int16_volume()
    for k, plane in enumerate(array):
        (tmp_path / f"s{k}.raw").write_bytes(plane.tobytes())
    head = ("ObjectType = Image\nNDims = 3\nDimSize = 10 8 6\nElementType = MET_SHORT\n"
            "ElementSpacing = 1 1 1\nOffset = 0 0 0\nElementDataFile = LIST 2D\n")  # fmt: skip
    (tmp_path / "x.mhd").write_text(head + "".join(f"s{k}.raw\n" for k in range(6)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "x.mhd")), array)
    (tmp_path / "x.mhd").write_text(head + "".join(f"s{k}.raw\n" for k in range(5)))
    with pytest.raises(CaseError, match=r"\(ElementDataFile LIST names 5 files, DimSize needs "
                                        r"6\)$"):  # fmt: skip
        read_image(tmp_path / "x.mhd", case="c")
    (tmp_path / "x.mhd").write_text(head + "".join(f"s{k}.raw\n" for k in range(6)))
    (tmp_path / "s5.raw").write_bytes(array[5].tobytes()[:100])
    with pytest.raises(CaseError, match=r"\(900 bytes of image data in the LIST's files, header "
                                        r"promises 960\)$"):  # fmt: skip
        read_image(tmp_path / "x.mhd", case="c")


@pytest.mark.parametrize("case", ["long long", "header size"])
def test_a_short_metaimage_of_64_bit_voxels_or_a_header_size_names_what_is_missing(tmp_path, case):
    """MET_LONG_LONG voxels (unsized) and a data file's `HeaderSize` (not counted): a short file
    was refused with ITK's stale errno, 'Reason: Success'."""
    array, image = _int16_volume()
    if case == "long long":
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt64), str(tmp_path / "x.mhd"))
        assert _header(tmp_path / "x.mhd")["ElementType"] == "MET_LONG_LONG"
        (tmp_path / "x.raw").write_bytes(array.astype(np.int64).tobytes()[:-400])
        message = r"\(3440 bytes of image data in x\.raw, header promises 3840\)$"
    else:
        sitk.WriteImage(image, str(tmp_path / "x.mhd"))
        text = (tmp_path / "x.mhd").read_text()
        (tmp_path / "x.mhd").write_text(
            text.replace("ElementDataFile", "HeaderSize = 100\nElementDataFile")
        )
        (tmp_path / "x.raw").write_bytes(bytes(100) + array.tobytes()[:-150])
        message = r"\(810 bytes of image data in x\.raw, header promises 960\)$"
    with pytest.raises(CaseError, match=message):
        read_image(tmp_path / "x.mhd", case="c")
