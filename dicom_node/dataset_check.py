"""Is a received data set complete? Checked on the encoded bytes before we acknowledge it.

pydicom reads a truncated data set without complaint (a cut element is dropped, a short value
is returned short), so a sender whose transfer broke off would get 0x0000 and delete its copy.
`walk_elements` follows the encoding of every element to the end (PS3.5 7.1: explicit and
implicit VR, defined and undefined lengths, sequences and items, encapsulated Pixel Data) and
`check_pixel_length` compares native Pixel Data with the length its attributes imply
(PS3.5 8.1.1, PS3.3 C.7.6.3). Both raise `Incomplete` with a sentence that names the problem.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass, field

UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
ANY_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA})
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 table 7.1-1).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
# Every VR PS3.5 6.2 defines: an explicit VR outside these makes pydicom re-read the element as
# implicit (its `assume_implicit_vr_switch`), so a walk that met one reports `odd_vr`.
KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
BIG_ENDIAN = "1.2.840.10008.1.2.2"
IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})
MAX_DEPTH = 32  # nested sequences; deeper is treated as malformed (stack safety)


class Incomplete(ValueError):
    """The data set is truncated or inconsistent; the message is one readable sentence."""


@dataclass(frozen=True)
class PixelElement:
    defined_length: int | None  # None: undefined length (encapsulated)


# A top-level element found by the walk: (VR as encoded or None when implicit, value length,
# offset of the value in the walked buffer).
Found = tuple[bytes | None, int, int]


@dataclass(frozen=True)
class Walked:
    pixel: PixelElement | None  # top-level (7FE0,0010), None if absent
    has_pixel_data: bool  # Pixel Data, Float Pixel Data or Double Float Pixel Data at top level
    # The top-level elements asked for (`walk_elements(..., collect=)`) met before any Pixel
    # Data, by tag (the last one wins when a tag repeats, as in pydicom): lets the caller read
    # them without parsing the data set a second time.
    found: dict[int, Found] = field(default_factory=dict)
    odd_vr: bool = False  # an explicit VR outside KNOWN_VRS was met (anywhere)


def _tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        implicit: bool,
        big: bool,
        collect: Collection[int] = (),
    ) -> None:
        self.data = memoryview(data)
        self.implicit = implicit
        self.end = len(data)
        self.tag_fmt = struct.Struct(">HH" if big else "<HH")
        self.u16 = struct.Struct(">H" if big else "<H")
        self.u32 = struct.Struct(">L" if big else "<L")
        self.pixel: PixelElement | None = None
        self.has_pixel_data = False
        self.collect = collect
        self.found: dict[int, Found] = {}
        self.odd_vr = False

    def header(self, at: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, offset of the value)."""
        if at + 8 > self.end:
            raise Incomplete(f"Data Set truncated: element header at byte {at} is cut off")
        group, elem = self.tag_fmt.unpack_from(self.data, at)
        tag = group << 16 | elem
        if group == 0xFFFE or self.implicit:
            return tag, None, self.u32.unpack_from(self.data, at + 4)[0], at + 8
        vr = bytes(self.data[at + 4 : at + 6])
        if vr not in KNOWN_VRS:
            self.odd_vr = True
        if vr in LONG_VRS:
            if at + 12 > self.end:
                raise Incomplete(f"Data Set truncated: element {_tag_str(tag)} header is cut off")
            return tag, vr, self.u32.unpack_from(self.data, at + 8)[0], at + 12
        return tag, vr, self.u16.unpack_from(self.data, at + 6)[0], at + 8

    def dataset(self, at: int, stop: int, depth: int, until_item_end: bool) -> int:
        """Walk elements from `at`; returns the offset after the data set (after its delimiter)."""
        if depth > MAX_DEPTH:
            raise Incomplete("Data Set nests sequences deeper than 32 levels")
        while at < stop:
            tag, vr, length, value_at = self.header(at)
            if tag == ITEM_END:
                if not until_item_end:
                    raise Incomplete(f"unexpected Item Delimitation at byte {at}")
                return value_at
            if depth == 0:
                if tag in ANY_PIXEL_DATA:
                    self.has_pixel_data = True
                    if tag == PIXEL_DATA:
                        self.pixel = PixelElement(None if length == UNDEFINED else length)
                elif tag in self.collect and not self.has_pixel_data:
                    self.found[tag] = (vr, length, value_at)
            if length == UNDEFINED:
                if vr is not None and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                    raise Incomplete(
                        f"element {_tag_str(tag)} has undefined length with VR {vr.decode('ascii', 'replace')}"
                    )
                at = self.sequence(value_at, stop, depth + 1, tag)
                continue
            if value_at + length > stop:
                raise Incomplete(
                    f"Data Set truncated: element {_tag_str(tag)} declares {length} bytes, {stop - value_at} remain"
                )
            if vr == b"SQ" or (vr is None and self.implicit and self._looks_like_sequence(value_at, length)):
                self.items(value_at, value_at + length, depth + 1)
            at = value_at + length
        if until_item_end:
            raise Incomplete("Data Set truncated: an item has no Item Delimitation")
        return at

    def _looks_like_sequence(self, at: int, length: int) -> bool:
        # Implicit VR: a value starting with an Item tag is a sequence (PS3.5 7.5).
        return length >= 8 and self.tag_fmt.unpack_from(self.data, at) == (0xFFFE, 0xE000)

    def items(self, at: int, stop: int, depth: int) -> None:
        """Defined-length sequence: items up to `stop`."""
        while at < stop:
            tag, _, length, value_at = self.header(at)
            if tag != ITEM:
                raise Incomplete(f"sequence holds {_tag_str(tag)} where an Item was expected")
            if length == UNDEFINED:
                at = self.dataset(value_at, stop, depth, until_item_end=True)
            else:
                if value_at + length > stop:
                    raise Incomplete("Data Set truncated: a sequence item is cut off")
                self.dataset(value_at, value_at + length, depth, until_item_end=False)
                at = value_at + length

    def sequence(self, at: int, stop: int, depth: int, owner: int) -> int:
        """Undefined-length sequence or encapsulated Pixel Data: items up to a Sequence Delimitation."""
        while at < stop:
            tag, _, length, value_at = self.header(at)
            if tag == SEQUENCE_END:
                return value_at
            if tag != ITEM:
                raise Incomplete(f"{_tag_str(owner)} holds {_tag_str(tag)} where an Item was expected")
            if length == UNDEFINED:
                if owner == PIXEL_DATA:
                    raise Incomplete("an encapsulated Pixel Data fragment has undefined length")
                at = self.dataset(value_at, stop, depth, until_item_end=True)
                continue
            if value_at + length > stop:
                raise Incomplete(f"Data Set truncated: an item of {_tag_str(owner)} is cut off")
            if owner != PIXEL_DATA and length:
                self.dataset(value_at, value_at + length, depth, until_item_end=False)
            at = value_at + length
        raise Incomplete(f"Data Set truncated: {_tag_str(owner)} has no Sequence Delimitation")


def walk_elements(
    dataset: bytes | bytearray | memoryview, transfer_syntax_uid: str, collect: Collection[int] = ()
) -> Walked | None:
    """Follow every element of an encoded data set (no file meta) to its end.

    Returns what was found at the top level (with where the top-level elements whose tags are
    in `collect` are, before Pixel Data), or None for a deflated transfer syntax (not walked:
    pydicom's inflate reports a cut stream). Raises Incomplete.
    """
    if not len(dataset):
        raise Incomplete("Data Set is empty")
    if transfer_syntax_uid in DEFLATED:
        return None
    walker = _Walker(dataset, transfer_syntax_uid == IMPLICIT, transfer_syntax_uid == BIG_ENDIAN, collect)
    walker.dataset(0, len(dataset), 0, until_item_end=False)
    return Walked(walker.pixel, walker.has_pixel_data, walker.found, walker.odd_vr)


def expected_pixel_bytes(rows: int, columns: int, samples: int, bits_allocated: int, frames: int) -> int:
    """Native Pixel Data length in bytes before even padding (PS3.5 8.1.1; 1-bit data packed)."""
    bits = rows * columns * samples * frames * bits_allocated
    return (bits + 7) // 8


def check_pixel_length(
    pixel: PixelElement | None,
    transfer_syntax_uid: str,
    *,
    rows: int | None,
    columns: int | None,
    samples: int | None,
    bits_allocated: int | None,
    frames: int | None,
) -> None:
    """Native Pixel Data must have Rows x Columns x Samples x BitsAllocated/8 x Frames bytes (+1 pad)."""
    if pixel is None or transfer_syntax_uid not in NATIVE_SYNTAXES:
        return
    if pixel.defined_length is None:
        raise Incomplete("Pixel Data has undefined length in a native (uncompressed) transfer syntax")
    if not rows or not columns or not bits_allocated:
        raise Incomplete("Pixel Data present without Rows, Columns and Bits Allocated")
    expected = expected_pixel_bytes(rows, columns, samples or 1, bits_allocated, frames or 1)
    if pixel.defined_length not in (expected, expected + (expected & 1)):
        raise Incomplete(
            f"Pixel Data has {pixel.defined_length} bytes; Rows x Columns x Samples x Bits x Frames give {expected}"
        )
