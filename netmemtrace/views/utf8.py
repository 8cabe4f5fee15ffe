"""Every string a view writes must be valid UTF-8; names from the kernel need not be.

Linux file names are bytes: a memory cgroup directory may be named with bytes that are not
UTF-8, and Python decodes them with surrogateescape (os.fsdecode), leaving lone surrogates
that no UTF-8 encoder accepts. Encoding such a label failed the whole scrape and wrote
surrogates into dump's JSON. Views pass every string through visible() instead.
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    # surrogateescape maps an undecodable byte B to U+DC00 + B (B >= 0x80): show the byte.
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """text as valid UTF-8: each undecodable byte written as the four characters \\xNN
    (a lone surrogate of another origin as \\uNNNN); text without any is returned as is."""
    return _SURROGATE.sub(_escape, text) if _SURROGATE.search(text) else text
