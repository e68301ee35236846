"""TFRecord reading: framing with CRC checks and byte offsets, Example parsing, JPEG (or PNG) decoding.

The framing is ``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``.
The ``tfrecord`` package's iterator neither checks CRCs nor reports where a file is broken, so the
framing is read here (with the same CRC32C as its writer); Examples are parsed with its protobuf.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Iterator

import crc32c
import numpy as np
import simplejpeg
from tfrecord import example_pb2

from data_modules.errors import CorruptRecordError, FrameSizeError

_MASK_DELTA = 0xA282EAD8
JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the endings of record files in a split directory (DeepMind's ``0001-of-2160.tfrecord``; TensorFlow's own
#: examples write ``*.tfrecords``)
RECORD_SUFFIXES = (".tfrecord", ".tfrecords")
#: how messages name them: "*.tfrecord or *.tfrecords"
RECORD_NAMES = " or ".join(f"*{suffix}" for suffix in RECORD_SUFFIXES)


def record_files(directory) -> list:
    """The record files (:data:`RECORD_SUFFIXES`) directly in a local ``directory`` (a ``Path``), sorted."""
    return sorted(p for p in directory.iterdir() if p.suffix in RECORD_SUFFIXES and p.is_file())


def masked_crc(data) -> int:
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _open(source):
    """A binary file object for a path, a remote URL (streamed, see ``data_modules.remote``) or an open file."""
    if hasattr(source, "read"):
        return contextlib.nullcontext(source)
    from data_modules.remote import is_url, local_path, open_url

    return open_url(str(source)) if is_url(source) else open(local_path(source), "rb")


def iter_records(path, on_bad_data=None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(byte offset, record bytes)`` for every record of an uncompressed TFRecord file.

    ``path``: a local path, a remote URL (``gs://...``, any fsspec URL) or an open binary file object
    (whose ``name`` appears in errors).

    A record whose data fails its CRC still has sound framing (its length passed its own CRC): if
    ``on_bad_data`` is given it is called with the error and reading goes on with the next record;
    otherwise the error is raised. Broken framing always raises (the rest of the file is unreadable).
    """
    with _open(path) as fh:
        path = getattr(fh, "name", path) if hasattr(path, "read") else path
        offset = 0
        while True:
            header = fh.read(12)
            if not header:
                return
            if len(header) < 12:
                raise CorruptRecordError(path, offset, f"truncated record header ({len(header)} of 12 bytes)")
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc(header[:8]) != length_crc:
                raise CorruptRecordError(path, offset, "length CRC mismatch (not a TFRecord file, or damaged)")
            data = fh.read(length)
            footer = fh.read(4)
            if len(data) < length or len(footer) < 4:
                raise CorruptRecordError(
                    path, offset, f"truncated record: expected {length} bytes of data, file ends early"
                )
            if masked_crc(data) != struct.unpack("<I", footer)[0]:
                err = CorruptRecordError(path, offset, "data CRC mismatch (the record is damaged)")
                if on_bad_data is None:
                    raise err
                on_bad_data(err)
            else:
                yield offset, data
            offset += 16 + length


def parse_scene(data: bytes, path="<bytes>", offset: int = 0) -> tuple[list[bytes], np.ndarray]:
    """Parse one Example into (JPEG byte strings, cameras ``[V, 5]`` float32)."""
    try:
        feats = example_pb2.Example.FromString(data).features.feature
    except Exception as err:  # protobuf raises DecodeError
        raise CorruptRecordError(path, offset, f"not a tf.train.Example ({err})") from None
    if "frames" not in feats or "cameras" not in feats:
        raise CorruptRecordError(
            path, offset, f"Example lacks 'frames'/'cameras' features (has {sorted(feats)}); not GQN data"
        )
    frames = list(feats["frames"].bytes_list.value)
    cameras = np.asarray(feats["cameras"].float_list.value, dtype=np.float32)
    if cameras.size != 5 * len(frames):
        raise CorruptRecordError(
            path, offset, f"{len(frames)} frames but {cameras.size} camera floats (expected {5 * len(frames)})"
        )
    return frames, cameras.reshape(len(frames), 5)


def _not_an_image(jpeg: bytes, index: int) -> str:
    return f"frame {index} is neither a JPEG nor a PNG (starts with {jpeg[:4]!r})"


def _decode_png(png: bytes, path, offset: int, index: int) -> np.ndarray:
    """A PNG frame (a writer other than DeepMind's may store PNGs) as uint8 ``[H, W, 3]``; alpha dropped, grey
    repeated."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            if im.mode.startswith("I"):  # 16-bit grey (PIL's I;16 / I): to 8 bits, not clipped by convert("RGB")
                grey = (np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's errors for a bad image
        raise CorruptRecordError(path, offset, f"frame {index}: broken PNG ({str(err).splitlines()[0]})") from None


def decode_frame(jpeg: bytes, expected_size: int, path="<bytes>", offset: int = 0, index: int = 0) -> np.ndarray:
    """Decode a frame (a JPEG, as DeepMind's records hold, or a PNG) to uint8 ``[H, W, 3]``, checking its size."""
    if jpeg.startswith(PNG_MAGIC):
        image = _decode_png(jpeg, path, offset, index)
    elif not jpeg.startswith(JPEG_MAGIC):
        raise CorruptRecordError(path, offset, _not_an_image(jpeg, index))
    else:
        try:
            image = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
        except ValueError as err:
            raise CorruptRecordError(path, offset, f"frame {index}: broken JPEG ({err})") from None
    if image.shape[0] != expected_size or image.shape[1] != expected_size:
        raise FrameSizeError(
            path,
            offset,
            f"frame {index} is {image.shape[1]}x{image.shape[0]} but this dataset has "
            f"{expected_size}x{expected_size} frames",
        )
    return image


def camera_to_pose(cameras: np.ndarray) -> np.ndarray:
    """Raw ``[..., 5]`` ``[x, y, z, yaw, pitch]`` -> ``[..., 7]`` ``[x, y, z, sin, cos (yaw), sin, cos (pitch)]``."""
    xyz, yaw, pitch = cameras[..., :3], cameras[..., 3:4], cameras[..., 4:5]
    return np.concatenate([xyz, np.sin(yaw), np.cos(yaw), np.sin(pitch), np.cos(pitch)], axis=-1).astype(
        np.float32
    )


def frame_size(jpeg: bytes, path="<bytes>", offset: int = 0, index: int = 0, decode: bool = False):
    """(height, width) of a JPEG (or PNG) frame from its header; ``decode`` also decodes it fully (verify)."""
    if jpeg.startswith(PNG_MAGIC):
        if decode:
            return _decode_png(jpeg, path, offset, index).shape[:2]
        width, height = struct.unpack(">II", jpeg[16:24]) if len(jpeg) >= 24 else (0, 0)  # IHDR: always first
        if jpeg[12:16] != b"IHDR" or not (width and height):
            raise CorruptRecordError(path, offset, f"frame {index}: broken PNG (no valid IHDR header)")
        return height, width
    if not jpeg.startswith(JPEG_MAGIC):
        raise CorruptRecordError(path, offset, _not_an_image(jpeg, index))
    try:
        if decode:
            return simplejpeg.decode_jpeg(jpeg, colorspace="RGB").shape[:2]
        return tuple(simplejpeg.decode_jpeg_header(jpeg)[:2])
    except ValueError as err:
        raise CorruptRecordError(path, offset, f"frame {index}: broken JPEG ({err})") from None
