"""What a file is, from its first bytes: shared by the checkpoint and image readers to name a wrong file."""

from __future__ import annotations

import codecs
import unicodedata

_TEXT_WHITESPACE = frozenset("\t\n\r")


def looks_like_text(head: bytes) -> bool:
    """Whether ``head``, the start of a file (possibly cut inside a character), is UTF-8 text.

    Text means: it decodes as UTF-8 and holds no control character other than tab and line ends. Binary data
    almost never passes (random bytes fail the decoding within a few bytes), so a leading ``{`` or ``<`` alone
    never makes a file "text".
    """
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return bool(text) and all(c in _TEXT_WHITESPACE or unicodedata.category(c) != "Cc" for c in text)


def looks_like_safetensors(data: bytes, file_size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length that fits the file, then a JSON text header."""
    if len(data) < 9 or data[8:9] != b"{":
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len <= file_size - 8 and looks_like_text(data[8 : 8 + header_len])
