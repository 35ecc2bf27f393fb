"""The wire format between :class:`~trl_flow_egrpo.rewards.remote.RemoteReward` and the reward server.

The contract that makes a remote score equal the local one: images travel as uint8, quantized on the client
by :func:`quantize`, ``u = clamp(round(255 x), 0, 255)``, and turned back into floats on the server by
:func:`dequantize`, ``x' = u / 255`` in float32. The server's reward sees exactly the image a local reward
would see after the same quantization; nothing else is lossy (PNG is lossless, floats travel as JSON
``repr``, which round-trips).

A request body (content type :data:`CONTENT_TYPE`) is, in order:

* :data:`MAGIC` (4 bytes), then the header length ``N`` as an unsigned big-endian 32-bit integer;
* ``N`` bytes of UTF-8 JSON: ``{"version": 1, "encoding": "raw" | "png", "shape": [B, 3, H, W],
  "prompts": [B strings], "columns": {name: [B JSON values]}}``, plus ``"png_lengths": [B ints]`` for PNG;
* the pixels: for ``"raw"`` the ``B * 3 * H * W`` bytes of the uint8 array in C order (channels first); for
  ``"png"`` ``B`` RGB PNG files of ``H`` x ``W`` pixels, back to back, of the lengths the header gives.

No pickle anywhere: a request carries data only, so whoever reaches the port cannot run code on either side.
The response is JSON, ``{"scores": [B floats], "reward": name}``; an error response is ``{"detail": message}``.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"TFE\x01"
PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/x-trl-egrpo-images"
TOKEN_ENV = "TRL_EGRPO_REWARD_TOKEN"
"""The environment variable that holds the bearer token, on the server and (by default) on the client."""
DEFAULT_REQUEST_TIMEOUT = 5.0
"""Seconds a server connection has to send a complete request head, and the longest a request body may stall
(``serve-reward --request-timeout``)."""
MIN_TOKEN_LENGTH = 16
"""The fewest characters a bearer token may have (``openssl rand -hex 16`` gives 32)."""
ENCODINGS = ("raw", "png")
RESERVED_COLUMNS = ("images", "prompts")
"""Column names a request cannot use: the reward receives the images and prompts under these names."""
MAX_HEADER_DEPTH = 32
"""The deepest nesting of lists and objects a request header may have (a dataset column of lists of lists
is 5 levels deep); deeper headers are refused before they reach the reward."""
_LENGTH = struct.Struct(">I")


class ProtocolError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with (400, or 413 when too big)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ScoreBatch:
    """One decoded request: ``images`` uint8 ``[B, 3, H, W]`` (CPU), ``B`` prompts, dataset columns of length B."""

    images: torch.Tensor
    prompts: list[str]
    columns: dict[str, list]

    def __len__(self) -> int:
        return len(self.prompts)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 on the CPU: ``clamp(round(255 x), 0, 255)`` (round half to even),
    computed in float32 on the images' device. This is the one lossy step of remote scoring."""
    # mul allocates the one new tensor; rounding and clamping then work in place on it (3x faster than copies).
    return images.detach().float().mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu()


def dequantize(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images -> float32 ``u / 255`` on ``device``: what the server hands its reward."""
    return images.to(device).float() / 255


def check_token(token: str) -> None:
    """Check a bearer token: at least :data:`MIN_TOKEN_LENGTH` visible ASCII characters, no whitespace.

    Shorter tokens can be guessed; whitespace cannot travel in an ``Authorization`` header unchanged (HTTP
    strips it around the value, so a server holding it would match no client); other characters are not
    sent alike by every HTTP client.

    Raises:
        ValueError: naming the rule the token breaks (never the token) and how to make a good one.
    """
    fix = "Make one with `openssl rand -hex 16` or `python -c 'import secrets; print(secrets.token_hex(16))'`."
    if any(character.isspace() for character in token):
        raise ValueError(f"The token contains whitespace, which HTTP does not carry unchanged. {fix}")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"The token has {len(token)} characters; it needs at least {MIN_TOKEN_LENGTH}. {fix}")
    if not all("!" <= character <= "~" for character in token):
        raise ValueError(f"The token must be visible ASCII characters only (letters, digits, punctuation). {fix}")


# ---------------------------------------------------------------------------------------------- encoding


def encode_request(
    images: torch.Tensor, prompts: Sequence[str], columns: dict[str, Sequence], encoding: str = "raw"
) -> bytes:
    """The request body for uint8 ``images`` ``[B, 3, H, W]``, their prompts and dataset columns.

    Raises:
        ValueError: unknown encoding, wrong dtype or shape, or a column whose values are not JSON data.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}.")
    reserved = [name for name in columns if name in RESERVED_COLUMNS]
    if reserved:
        raise ValueError(_reserved_message(reserved))
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"encode_request needs uint8 images [B, 3, H, W] (see quantize), got {images.dtype} {tuple(images.shape)}."
        )
    array = images.cpu().contiguous().numpy()
    header = {
        "version": PROTOCOL_VERSION,
        "encoding": encoding,
        "shape": list(array.shape),
        "prompts": [str(prompt) for prompt in prompts],
        "columns": _json_columns(columns),
    }
    if encoding == "raw":
        payload = [array.tobytes()]
    else:
        payload = [_png_bytes(image) for image in array]
        header["png_lengths"] = [len(chunk) for chunk in payload]
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(header_bytes)), header_bytes, *payload])


def _json_columns(columns: dict[str, Sequence]) -> dict[str, list]:
    """Columns as JSON-ready lists; numpy and torch values become plain numbers and lists."""
    ready = {}
    for name, values in columns.items():
        try:
            ready[name] = json.loads(json.dumps(list(values), default=_plain))
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Column {name!r} cannot be sent to a remote reward: its values must be JSON data "
                f"(numbers, strings, lists, dicts), and {error}. Drop or convert the column."
            ) from error
    return ready


def _plain(value):
    """numpy / torch scalars and arrays -> Python numbers and lists (``json.dumps`` fallback)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _png_bytes(image: np.ndarray) -> bytes:
    """One ``[3, H, W]`` uint8 image as an RGB PNG (lossless; compression level 1 favours speed)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- decoding


def decode_request(body: bytes, max_images: int, max_pixel_bytes: int) -> ScoreBatch:
    """Parse and check a request body; every problem is a :class:`ProtocolError` naming it.

    Args:
        body: the request body.
        max_images: the most images one request may carry (more: status 413).
        max_pixel_bytes: the most bytes the decoded images ``B * 3 * H * W`` may take (more: status 413), so a
            small PNG cannot expand into a huge array.
    """
    prefix = len(MAGIC) + _LENGTH.size
    if len(body) < prefix or not body.startswith(MAGIC):
        raise ProtocolError(
            f"The body is not a scoring request: it must start with {MAGIC!r} and a header "
            "length (see trl_flow_egrpo.serve.protocol). Send requests with RemoteReward."
        )
    (header_length,) = _LENGTH.unpack_from(body, len(MAGIC))
    if header_length > len(body) - prefix:
        raise ProtocolError(f"The header length {header_length} exceeds the {len(body) - prefix} bytes that follow.")
    try:
        header = json.loads(body[prefix : prefix + header_length])
    except ValueError as error:
        raise ProtocolError(f"The header is not valid JSON ({error}).") from error
    except RecursionError as error:  # json nests one Python call per level
        raise ProtocolError(_too_deep_message()) from error
    if not isinstance(header, dict):
        raise ProtocolError(f"The header must be a JSON object, got {type(header).__name__}.")
    if nesting_depth(header) > MAX_HEADER_DEPTH:
        raise ProtocolError(_too_deep_message())
    payload = memoryview(body)[prefix + header_length :]
    batch, height, width = _check_header(header, max_images, max_pixel_bytes)
    if header["encoding"] == "raw":
        images = _decode_raw(payload, batch, height, width)
    else:
        images = _decode_png(payload, header.get("png_lengths"), batch, height, width)
    return ScoreBatch(images, header["prompts"], header["columns"])


def _check_header(header: dict, max_images: int, max_pixel_bytes: int) -> tuple[int, int, int]:
    """Validate the header's fields; returns ``(B, H, W)``."""
    if header.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"Protocol version {header.get('version')!r} is not supported; this server speaks "
            f"version {PROTOCOL_VERSION}. Use the same trl-flow-egrpo version on both sides."
        )
    if header.get("encoding") not in ENCODINGS:
        raise ProtocolError(f"encoding must be one of {ENCODINGS}, got {header.get('encoding')!r}.")
    shape = header.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(type(n) is int and n >= 1 for n in shape)
        or shape[1] != 3
    ):
        raise ProtocolError(f"shape must be [B, 3, H, W] with positive integers, got {shape!r}.")
    batch, _, height, width = shape
    if batch > max_images:
        raise ProtocolError(
            f"The request holds {batch} images; this server takes at most {max_images} per request "
            "(--max-batch). Send fewer at a time.",
            status=413,
        )
    if math.prod(shape) > max_pixel_bytes:
        raise ProtocolError(
            f"The images take {math.prod(shape)} bytes as uint8; this server takes at most "
            f"{max_pixel_bytes} per request (--max-request-mb). Send fewer or smaller images.",
            status=413,
        )
    prompts = header.get("prompts")
    if not isinstance(prompts, list) or len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError(f"prompts must be a list of {batch} strings (one per image).")
    columns = header.get("columns", {})
    if not isinstance(columns, dict) or not all(isinstance(v, list) and len(v) == batch for v in columns.values()):
        raise ProtocolError(f"columns must map each column name to a list of {batch} values (one per image).")
    reserved = [name for name in columns if name in RESERVED_COLUMNS]
    if reserved:
        raise ProtocolError(_reserved_message(reserved))
    header["columns"] = columns
    return batch, height, width


def nesting_depth(value) -> int:
    """How deeply lists and dicts nest in a decoded JSON ``value`` (a scalar: 0, ``[]``: 1, ``[[1]]``: 2),
    counted level by level, without recursion."""
    depth, level = 0, [value]
    while True:
        containers = [item for item in level if isinstance(item, (list, dict))]
        if not containers:
            return depth
        depth += 1
        level = [child for container in containers for child in _children(container)]


def _children(container: list | dict) -> list:
    return list(container.values()) if isinstance(container, dict) else container


def _too_deep_message() -> str:
    return (
        f"The header nests lists and objects more than {MAX_HEADER_DEPTH} levels deep. Send dataset columns "
        "as flat values or shallow lists."
    )


def _reserved_message(names: list[str]) -> str:
    return (
        f"Column name(s) {names} cannot be sent: the reward receives the images and prompts under the names "
        f"{list(RESERVED_COLUMNS)}. Rename or drop the column(s)."
    )


def _decode_raw(payload: memoryview, batch: int, height: int, width: int) -> torch.Tensor:
    expected = batch * 3 * height * width
    if len(payload) != expected:
        raise ProtocolError(
            f"Raw images of shape [{batch}, 3, {height}, {width}] take {expected} bytes, but "
            f"{len(payload)} follow the header."
        )
    array = np.frombuffer(payload, dtype=np.uint8).reshape(batch, 3, height, width)
    return torch.from_numpy(array.copy())


def _decode_png(payload: memoryview, lengths, batch: int, height: int, width: int) -> torch.Tensor:
    from PIL import Image

    if not isinstance(lengths, list) or len(lengths) != batch or not all(type(n) is int and n > 0 for n in lengths):
        raise ProtocolError(f"png_lengths must be a list of {batch} positive integers (one per image).")
    if sum(lengths) != len(payload):
        raise ProtocolError(f"png_lengths add up to {sum(lengths)} bytes, but {len(payload)} follow the header.")
    images, offset = np.empty((batch, 3, height, width), dtype=np.uint8), 0
    for i, length in enumerate(lengths):
        try:
            with Image.open(io.BytesIO(payload[offset : offset + length])) as image:
                # Checked before decoding, so a small file cannot expand beyond the declared size.
                if image.format != "PNG" or image.mode != "RGB" or image.size != (width, height):
                    raise ProtocolError(
                        f"Image {i} is a {image.format} {image.mode} image of {image.size[0]} x "
                        f"{image.size[1]}; expected an RGB PNG of {width} x {height}."
                    )
                images[i] = np.asarray(image).transpose(2, 0, 1)
        except ProtocolError:
            raise
        except Exception as error:  # whatever PIL raises on a damaged or hostile file: the client's fault
            raise ProtocolError(f"Image {i} is not a readable PNG ({type(error).__name__}: {error}).") from error
        offset += length
    return torch.from_numpy(images)


def decode_scores(body: bytes, expected: int) -> list[float]:
    """The scores of a server response, checked to be ``expected`` numbers.

    Raises:
        ValueError: the response is not the server's JSON or holds the wrong number of scores.
    """
    try:
        scores = json.loads(body)["scores"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"The response is not a scoring response ({body[:200]!r}).") from error
    if (
        not isinstance(scores, list)
        or len(scores) != expected
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
    ):
        raise ValueError(
            f"The response holds {len(scores) if isinstance(scores, list) else 'no'} scores for {expected} images."
        )
    return [float(s) for s in scores]
