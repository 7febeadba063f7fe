"""Drawing for the demos' pictures without an imaging library: PNG
encoding, a 3x5 pixel font, outlines and title rows on (H, W, 3) uint8
tensors."""
from __future__ import annotations

import struct
import zlib

import torch
from torch import Tensor


def encode_png(rgb: Tensor) -> bytes:
    """A (H, W, 3) uint8 tensor as PNG bytes (no imaging library needed)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(row.contiguous().view(-1).tolist()) for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def upscale(tile: Tensor, scale: int) -> Tensor:
    """(H, W, ...) -> (H * scale, W * scale, ...), nearest."""
    return tile.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def outline(canvas: Tensor, x0: int, y0: int, x1: int, y1: int, colour: Tensor) -> None:
    h, w, _ = canvas.shape
    x0, x1 = max(0, min(x0, w - 1)), max(0, min(x1, w - 1))
    y0, y1 = max(0, min(y0, h - 1)), max(0, min(y1, h - 1))
    canvas[y0, x0:x1 + 1] = colour
    canvas[y1, x0:x1 + 1] = colour
    canvas[y0:y1 + 1, x0] = colour
    canvas[y0:y1 + 1, x1] = colour


# a 3x5 pixel font for the labels and titles (digits, '.', capitals used)
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", " ": "000000000000000",
    ">": "100010001010100", "=": "000111000111000", "(": "010100100100010",
    ")": "010001001001010", "-": "000000111000000",
}
_LETTERS = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011",
    "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101",
    "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "W": "101101111111101", "Y": "101101010010010",
    "J": "001001001101010", "Q": "010101101110011", "V": "101101101101010",
    "X": "101101010101101", "Z": "111001010100111", ":": "000010000010000",
}
_GLYPHS.update(_LETTERS)


def write_text(canvas: Tensor, text: str, x: int, y: int, colour: Tensor, size: int = 1) -> None:
    """Draw ``text`` (upper-cased) with its top-left at (x, y), clipped."""
    h, w, _ = canvas.shape
    for i, char in enumerate(text.upper()):
        bits = _GLYPHS.get(char, _GLYPHS[" "])
        for j, bit in enumerate(bits):
            if bit != "1":
                continue
            top = y + (j // 3) * size
            left = x + (i * 4 + j % 3) * size
            if 0 <= top and top + size <= h and 0 <= left and left + size <= w:
                canvas[top:top + size, left:left + size] = colour


def title_row(titles: list[str], width: int, column: int) -> Tensor:
    """A white (16, width, 3) strip with title i at x = i * column."""
    row = torch.full((16, width, 3), 255, dtype=torch.uint8)
    black = torch.zeros(3, dtype=torch.uint8)
    for i, title in enumerate(titles):
        write_text(row, title, i * column + 4, 3, black, size=2)
    return row
