"""Every common DICOM transfer syntax loads: lossless ones exactly, lossy ones within a stated bound.

Syntaxes pydicom can encode here are made at test time from 3 slices of the real CT series;
the JPEG ones it cannot encode are small fixtures in tests/data/dicom_syntaxes (see its README).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.pixels import get_decoder

import medinpaint
from medinpaint.errors import MedinpaintError

from conftest import shared

FIXTURES = Path(__file__).parent / "data" / "dicom_syntaxes"
SLICES = slice(8, 11)  # 3 neighbouring files of ct_abdomen_dicom
J2K_PSNR_DB = 60.0  # asked of the JPEG 2000 encoder; over the 12-bit range that is an RMS error of 4.1 HU

# name -> (transfer syntax, encoder options, largest error allowed in HU; None: see the lossy test)
ENCODED = {
    "rle": (uid.RLELossless, {}, 0),
    "jpeg_ls": (uid.JPEGLSLossless, {}, 0),
    "jpeg_ls_near": (uid.JPEGLSNearLossless, {"jls_error": 3}, 3),  # the standard bounds |error| by NEAR
    "jpeg_2000": (uid.JPEG2000Lossless, {}, 0),
    "jpeg_2000_lossy": (uid.JPEG2000, {"j2k_psnr": [J2K_PSNR_DB]}, None),
    "deflate": (uid.DeflatedExplicitVRLittleEndian, None, 0),  # the whole dataset deflated, not the pixels
}
# fixture folder -> (transfer syntax, stored values in source.npz, (max, mean) |error| allowed in stored units)
DECODE_ONLY = {
    "jpeg_lossless_p14": (uid.JPEGLossless, "stored12", (0, 0)),
    "jpeg_lossless_sv1": (uid.JPEGLosslessSV1, "stored12", (0, 0)),
    # quality 90: measured max 14, mean 2.86 (12-bit) and max 12, mean 1.40 (8-bit, 5.5 HU a level)
    "jpeg_extended_12bit": (uid.JPEGExtended12Bit, "stored12", (24, 4.0)),
    "jpeg_baseline_8bit": (uid.JPEGBaseline8Bit, "stored8", (16, 2.0)),
}


@pytest.fixture(scope="module")
def plain_series(tmp_path_factory) -> Path:
    """3 slices of the real CT (JPEG 2000 lossless as shared), decompressed to Explicit VR Little Endian."""
    folder = tmp_path_factory.mktemp("plain")
    for path in sorted(shared("ct_abdomen_dicom").iterdir())[SLICES]:
        ds = pydicom.dcmread(path)
        ds.decompress()
        ds.save_as(folder / path.name, enforce_file_format=True)
    return folder


def _encode(plain: Path, target: Path, syntax: uid.UID, options: dict | None) -> Path:
    target.mkdir()
    for path in sorted(plain.iterdir()):
        ds = pydicom.dcmread(path)
        if options is None:
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax, **options)
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


@pytest.mark.parametrize("name", sorted(ENCODED))
def test_encoded_series_loads_like_the_uncompressed_one(plain_series, tmp_path, name):
    syntax, options, bound = ENCODED[name]
    folder = _encode(plain_series, tmp_path / name, syntax, options)
    files = sorted(folder.iterdir())
    assert {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in files} == {syntax}
    assert sum(p.stat().st_size for p in files) < 0.9 * sum(p.stat().st_size for p in plain_series.iterdir())

    expected = medinpaint.load(plain_series)
    volume = medinpaint.load(folder)
    np.testing.assert_array_equal(volume.affine, expected.affine)
    error = np.abs(volume.array.astype(np.float64) - expected.array)
    if bound == 0:
        np.testing.assert_array_equal(volume.array, expected.array)
    elif bound is not None:
        assert 0 < error.max() <= bound
    else:  # lossy JPEG 2000: the RMS error the PSNR asks for (+10% for openjpeg's rate control)
        allowed = (2**12 - 1) / 10 ** (J2K_PSNR_DB / 20) * 1.1
        assert 0 < np.sqrt(np.mean(error**2)) <= allowed
        assert error.max() <= 40


@pytest.mark.parametrize("name", sorted(DECODE_ONLY))
def test_decode_only_jpeg_fixture_loads_within_its_bound(name):
    syntax, key, (max_error, mean_error) = DECODE_ONLY[name]
    files = sorted((FIXTURES / name).iterdir())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert {h.file_meta.TransferSyntaxUID for h in headers} == {syntax}
    source = np.load(FIXTURES / "source.npz")
    stored = source[key].astype(np.float64)  # [k, row, column], k along the slice normal
    slope, intercept = float(headers[0].RescaleSlope), float(headers[0].RescaleIntercept)
    truth = np.transpose(stored * slope + intercept, (2, 1, 0))  # medinpaint's [i, j, k]

    volume = medinpaint.load(FIXTURES / name)
    assert volume.shape == (64, 64, 3) and volume.modality == "CT"
    error = np.abs(volume.array - truth) / slope  # in stored units
    if max_error == 0:
        np.testing.assert_array_equal(volume.array, truth)
    else:
        assert 0 < error.max() <= max_error and error.mean() <= mean_error


@pytest.mark.parametrize("name", sorted(DECODE_ONLY))
def test_the_declared_pylibjpeg_plugins_decode_every_jpeg_syntax_alone(name):
    """Not only through Pillow or pyjpegls when present: pylibjpeg is what pyproject installs."""
    syntax = DECODE_ONLY[name][0]
    assert "pylibjpeg" in get_decoder(syntax).available_plugins
    path = FIXTURES / name / "slice1.dcm"
    by_pylibjpeg = pydicom.pixels.pixel_array(path, decoding_plugin="pylibjpeg")
    assert by_pylibjpeg.shape == (64, 64)
    expected = np.load(FIXTURES / "source.npz")[DECODE_ONLY[name][1]][0]
    assert np.abs(by_pylibjpeg.astype(int) - expected).max() <= DECODE_ONLY[name][2][0]


@pytest.mark.parametrize("syntax", [uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000,
                                    uid.RLELossless])
def test_the_declared_plugins_cover_the_encodable_syntaxes(syntax):
    assert "pylibjpeg" in get_decoder(syntax).available_plugins


def test_missing_decoder_is_one_line_naming_file_and_syntax(cli, monkeypatch, tmp_path):
    decoder = get_decoder(uid.JPEGLosslessSV1)
    monkeypatch.setattr(decoder, "_available", {})  # as on a machine without pylibjpeg-libjpeg
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg", "pylibjpeg-libjpeg")})
    folder = FIXTURES / "jpeg_lossless_sv1"
    with pytest.raises(MedinpaintError) as caught:
        medinpaint.load(folder)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(folder))
    assert "(1.2.840.10008.1.2.4.70): no decoder installed; pip install pylibjpeg pylibjpeg-libjpeg" in message
    assert uid.JPEGLosslessSV1.name in message

    code, out, err = cli("info", folder)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "no decoder installed" in err


def test_corrupt_compressed_pixels_are_one_line_naming_the_syntax(tmp_path):
    folder = shutil.copytree(FIXTURES / "jpeg_lossless_p14", tmp_path / "corrupt")
    path = folder / "slice2.dcm"
    ds = pydicom.dcmread(path)
    frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frame[:20]])  # cut inside the JPEG headers
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(MedinpaintError) as caught:
        medinpaint.load(folder)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    assert f"cannot decode {uid.JPEGLossless.name} (1.2.840.10008.1.2.4.57) pixel data (" in message
    assert "libjpeg" in message  # the decoder's own reason, which pydicom puts on a second line
