"""HDF5 global heap collections, checked before the HDF5 library reads one.

Variable-length strings (imgvec's paths, labels and string attributes) live in global heap
collections ("GCOL" blocks); a string is a length, a collection address and an object index.
The HDF5 library walks a whole collection when it first reads any string in it, and its walk
(``H5HG__cache_heap_deserialize``, HDF5 1.14 and 2.0) never ends on a free-space entry of size 0:
a forged byte makes ``imgvec info`` hang, deaf to SIGTERM. So the collections a read will touch
are walked here first, the same way, with every step bounded (written from the HDF5 file format
specification, "Global Heap"; the attribute messages of a version-1 object header, "Attribute
Message", likewise).

Only the layout imgvec writes is accepted (h5py's defaults: superblock version 0, version-1 object
headers, compact attributes); anything else is :class:`MalformedHeap`.
"""

from __future__ import annotations

import os
import struct
from typing import Callable, Iterable, Iterator

import numpy as np

from imgvec.errors import BadInputError

MIN_COLLECTION = 4096  # H5HG_MINSIZE: no collection is smaller
MAX_OBJECTS = 65535  # H5HG_MAXIDX: object indexes are 16 bits
BATCH_BYTES = 4 << 20  # collections walked together, at most about this many bytes of them
SIDE_BY_SIDE = 16  # more collections than this in a batch: their walks step together (numpy), else one by one
MAX_HEADER_CHUNKS = 64  # imgvec's headers have 1-3; bounded so a looped continuation cannot spin
MAX_HEADER_BLOCK = 1 << 20  # imgvec's header blocks are a few KiB: none is read bigger than this

Read = Callable[[int, int], bytes]  # (offset, size) -> the file's bytes there (fewer at its end)


class MalformedHeap(BadInputError):
    """A heap collection or object header that HDF5 could misread (its message says what); like
    :class:`~imgvec.files.faissblob.MalformedBlob`, a :class:`~imgvec.errors.BadInputError`."""


def reader(fd: int) -> Read:
    return lambda offset, size: os.pread(fd, size, offset)


def check_collections(read: Read, addresses: Iterable[int], file_size: int, checked: set[int]) -> None:
    """Walk every collection at ``addresses`` not in ``checked`` (and add it there), as HDF5 will.

    HDF5 steps from object to object: an object of ``n`` bytes with index > 0 takes 16 + n rounded
    up to 8; index 0 (free space) takes its size as is; fewer than 16 bytes left are free space to
    the end. The walk must land exactly on the collection's end through 8-aligned steps that all
    move forward. Where each 8-byte slot of a collection would step to is worked out for all slots
    at once (vectorised, for a batch of collections), then the walks follow those steps, side by side
    when there are many: at most HDF5's 65,535 objects per collection.
    """
    todo = sorted({int(a) for a in addresses} - checked - {0})  # address 0: empty strings, nothing read
    batch: list[tuple[int, bytes]] = []
    held = 0
    for address in todo:  # a batch at a time, so memory stays bounded however many strings there are
        block = _collection(read, address, file_size)
        batch.append((address, block))
        held += len(block)
        if held >= BATCH_BYTES:
            _walk(batch)
            batch, held = [], 0
    if batch:
        _walk(batch)
    checked.update(todo)


def _walk(batch: list[tuple[int, bytes]]) -> None:
    sizes = np.array([len(block) // 8 for _, block in batch], np.int64)
    words = np.frombuffer(b"".join(block for _, block in batch), "<u8")
    slots = len(words)
    end, bad = slots, slots + 1  # where a walk stops: at a collection's end, or on an impossible step
    here = np.arange(slots, dtype=np.int64)
    room = (np.repeat(np.cumsum(sizes), sizes) - here) * 8  # bytes from each slot to its collection's end
    length = np.append(words[1:], np.uint64(0))  # an object's size is the word after its index
    over = length > room.astype(np.uint64)
    size = np.where(over, 0, length).astype(np.int64)
    need = np.where(words & 0xFFFF > 0, 16 + ((size + 7) & ~7), size)
    step = np.where(room < 16, end,  # too small for an object header: free space to the end
                    np.where(over | (need == 0) | (need > room) | (need % 8 != 0), bad,
                             np.where(need == room, end, here + need // 8)))
    step = np.append(step, [end, bad])  # a walk that has stopped stays where it stopped
    pos = np.cumsum(sizes) - sizes + 2  # each collection's first object, after its 16-byte header
    if len(batch) > SIDE_BY_SIDE:  # many walks: one vectorised step for all of them at a time
        for taken in range(MAX_OBJECTS + 1):  # every step moves forward: a walk ends within that many
            pos = step[pos]
            if taken % 64 == 63 and (pos >= end).all():
                break
        ends = pos.tolist()
    else:  # a few (a query's hits): each followed on its own, far fewer calls
        steps, ends = step.tolist(), []
        for at in pos.tolist():
            for _ in range(MAX_OBJECTS + 1):
                if at >= end:
                    break
                at = steps[at]
            ends.append(at)
    failed = [address for (address, _), at in zip(batch, ends) if at != end]
    if failed:
        raise MalformedHeap(f"the global heap collection at byte {failed[0]:,} does not walk to its end (an "
                            "object of 0 bytes, or one past the collection)")


def _collection(read: Read, address: int, file_size: int) -> bytes:
    """The bytes of the collection at ``address``, once its header is a collection's and fits the file."""
    if address >= file_size:
        raise MalformedHeap(f"a string points at byte {address:,}, past the file's end")
    head = read(address, 16)
    if len(head) < 16 or head[:4] != b"GCOL" or head[4] != 1:
        raise MalformedHeap(f"a string points at byte {address:,}, where there is no global heap collection")
    size = struct.unpack_from("<Q", head, 8)[0]
    if size < MIN_COLLECTION or size % 8 or size > file_size - address:
        raise MalformedHeap(f"the global heap collection at byte {address:,} claims {size:,} bytes")
    block = read(address, size)
    if len(block) < size:
        raise MalformedHeap(f"the global heap collection at byte {address:,} is cut short")
    return block


def attribute_heaps(read: Read, header: int, file_size: int) -> tuple[list[int], int]:
    """The collections the variable-length attributes of the object header at ``header`` point into,
    and how many attribute messages it holds (a version-1 header, as h5py writes by default; the
    caller compares that count with HDF5's, so no attribute goes unseen)."""
    heaps, attributes = [], 0
    for kind, flags, body in header_messages(read, header, file_size):
        if kind == 0x000C:
            attributes += 1
            if flags & 0x02:
                raise MalformedHeap("a shared attribute message, which imgvec never writes")
            heaps += _attribute_heaps(body)
        elif kind == 0x0015:
            raise MalformedHeap("attributes in dense storage, which imgvec never writes")
    return heaps, attributes


def header_messages(read: Read, header: int, file_size: int) -> Iterator[tuple[int, int, bytes]]:
    """``(type, flags, body)`` of every message of the version-1 object header at ``header``, its
    continuation blocks followed once each and every block bounded (see :data:`MAX_HEADER_CHUNKS`)."""
    prefix = read(header, 16)
    if len(prefix) < 16 or prefix[0] != 1:
        raise MalformedHeap("an object header of a version imgvec does not write")
    chunks, seen = [(header + 16, struct.unpack_from("<I", prefix, 8)[0])], set()
    while chunks:
        start, length = chunks.pop()
        if (start in seen or len(seen) >= MAX_HEADER_CHUNKS or length > MAX_HEADER_BLOCK
                or start > file_size - length):
            raise MalformedHeap(f"an object header block at byte {start:,} of {length:,} bytes is out of place")
        seen.add(start)
        block, p = read(start, length), 0
        while p + 8 <= len(block):
            kind, size = struct.unpack_from("<HH", block, p)
            flags = block[p + 4]
            body = block[p + 8 : p + 8 + size]
            if len(body) < size:
                raise MalformedHeap(f"an object header message at byte {start + p:,} runs past its block")
            if kind == 0x0010:  # continuation: another block of messages
                if size < 16:
                    raise MalformedHeap("a short continuation message")
                chunks.append(struct.unpack_from("<QQ", body))
            else:
                yield kind, flags, body
            p += 8 + size


def _attribute_heaps(body: bytes) -> list[int]:
    """Collection addresses of one attribute message's values, if its type is variable-length."""
    if len(body) < 8:
        raise MalformedHeap("a short attribute message")
    version = body[0]
    name_size, type_size, space_size = struct.unpack_from("<HHH", body, 2)
    if version == 1:
        pad = lambda n: (n + 7) & ~7  # noqa: E731 - version 1 pads each part to 8 bytes
        p = 8
    elif version in (2, 3):
        if body[1] & 0x03:
            raise MalformedHeap("an attribute with a shared type or space, which imgvec never writes")
        pad = lambda n: n  # noqa: E731
        p = 8 if version == 2 else 9
    else:
        raise MalformedHeap(f"an attribute message of version {version}")
    p += pad(name_size)
    dtype = body[p : p + type_size]
    p += pad(type_size)
    space = body[p : p + space_size]
    p += pad(space_size)
    if len(dtype) < 8 or len(space) < 4 or p > len(body):
        raise MalformedHeap("an attribute message cut short")
    if dtype[0] & 0x0F != 9:  # not variable-length: its values hold no heap addresses
        return []
    rank = space[1]
    dims_at = 8 if space[0] == 1 else 4
    count = 1
    for i in range(rank):
        if dims_at + 8 * (i + 1) > len(space):
            raise MalformedHeap("an attribute dataspace cut short")
        count *= struct.unpack_from("<Q", space, dims_at + 8 * i)[0]
    if space[0] == 2 and space[3] == 2:  # a null dataspace holds no values
        count = 0
    if count > 64 or p + 16 * count > len(body):
        raise MalformedHeap(f"an attribute claims {count:,} variable-length values")
    return [struct.unpack_from("<Q", body, p + 16 * i + 4)[0] for i in range(count)]
