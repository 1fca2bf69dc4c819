"""Chunk indexes (version-1 B-trees), walked bounded before HDF5 reads a chunked dataset.

A chunked dataset finds its chunks through a B-tree ("TREE" nodes) named by its layout message.
HDF5 follows that tree recursively and trusts it: a node whose child is itself, or a level no
tree of this file could have, makes it recurse until the stack is gone (SIGSEGV, no message).
So the tree is walked here first, from the file's bytes, with every step bounded: each node is
visited once, a child's level is exactly its parent's less one (so levels fall strictly to 0),
no node holds more entries than the file's node size allows, every node and every chunk lies
inside the file past the superblock, every chunk is at a chunk-aligned position of the dataset
with the size an unfiltered chunk has, and sibling links name nodes of the same level (written
from the HDF5 file format specification: "Superblock" versions 0 and 1, "Version 1 B-trees",
"Data Layout Message" version 3).

Only what imgvec writes (h5py's defaults: superblock version 0 or 1, version-1 object headers,
layout message version 3) is accepted: the other chunk indexes of layout version 4 (fixed and
extensible arrays, version-2 B-trees) are :class:`MalformedChunks`, as is anything else.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import numpy as np

from imgvec.files.h5heap import MalformedHeap, Read, header_messages, reader

UNDEFINED = (1 << 64) - 1  # HDF5's "no address"
NODE_HEADER = 24  # "TREE", type, level, entries used, left and right sibling
DEFAULT_ISTORE_K = 32  # a version-0 superblock does not store it: HDF5's default
MAX_LEVEL = 64  # a tree of 2 entries a node this deep holds 2**64 chunks
LAYOUT_MESSAGE = 0x0008


class MalformedChunks(ValueError):
    """A chunk index HDF5 could misread or recurse in without end (its message says what)."""


def check_dataset(ds: Any, itemsize: int) -> int:
    """Walk the chunk index of the chunked dataset ``ds`` (an h5py Dataset); the chunks it holds.

    ``itemsize`` is what one element takes in the file. A file open for writing is flushed
    first, so the bytes walked are the ones HDF5 will read (and its size is taken after that).
    """
    import h5py

    fid = h5py.h5i.get_file_id(ds.id)
    if fid.get_intent() & h5py.h5f.ACC_RDWR:
        h5py.h5f.flush(fid)
    fd = fid.get_vfd_handle()
    read, file_size = reader(fd), os.fstat(fd).st_size
    superblock_end, istore_k = _superblock(read)
    try:
        # The header's address from H5Gget_objinfo: H5Oget_info (h5o.get_info) sums the storage of
        # the chunk index, walking it (recursing in a looped one) before any check could.
        header, high = h5py.h5g.get_objinfo(ds.id).objno
        layout = _layout(read, header | high << 64, file_size)
    except MalformedHeap as error:
        raise MalformedChunks(str(error)) from None
    return walk(read, layout, file_size, superblock_end, istore_k, tuple(ds.shape), tuple(ds.chunks or ()),
                itemsize)


def _superblock(read: Read) -> tuple[int, int]:
    """Where a version-0 or -1 superblock (at byte 0, 8-byte addresses) ends, and its chunk B-tree K."""
    head = read(0, 28)
    if len(head) < 28 or head[:8] != b"\x89HDF\r\n\x1a\n":
        raise MalformedChunks("no HDF5 superblock at byte 0")
    version = head[8]
    if version not in (0, 1) or head[13:15] != b"\x08\x08":
        raise MalformedChunks(f"a superblock of version {version}, which imgvec does not write")
    if version == 0:
        return 96, DEFAULT_ISTORE_K
    k = struct.unpack_from("<H", head, 24)[0]
    if k == 0:
        raise MalformedChunks("a chunk B-tree K of 0")
    return 100, k


def _layout(read: Read, header: int, file_size: int) -> tuple[int, tuple[int, ...]]:
    """(B-tree address, chunk dimensions with the element size last) from the dataset's layout message."""
    found = [body for kind, _, body in header_messages(read, header, file_size) if kind == LAYOUT_MESSAGE]
    if len(found) != 1:
        raise MalformedChunks(f"{len(found)} layout messages")
    body = found[0]
    if len(body) < 2 or body[0] != 3:
        version = body[0] if body else "no"
        raise MalformedChunks(f"a layout message of version {version} (a chunk index imgvec does not write)")
    if body[1] != 2:
        raise MalformedChunks("a chunked dataset whose layout message is not chunked")
    if len(body) < 11:
        raise MalformedChunks("a short layout message")
    rank = body[2]
    if not 2 <= rank <= 33 or len(body) < 11 + 4 * rank:
        raise MalformedChunks(f"a layout message of {rank} dimensions")
    address = struct.unpack_from("<Q", body, 3)[0]
    return address, struct.unpack_from(f"<{rank}I", body, 11)


def walk(read: Read, layout: tuple[int, tuple[int, ...]], file_size: int, superblock_end: int, istore_k: int,
         shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int) -> int:
    """Walk the B-tree of ``layout`` (see the module's docstring); how many chunks it holds."""
    root, dims = layout
    if tuple(dims[:-1]) != chunks or dims[-1] != itemsize or len(shape) != len(chunks):
        raise MalformedChunks(f"the layout message's chunks {list(dims)[:8]} disagree with the dataset's "
                              f"{list(chunks)[:8]} of {itemsize}-byte elements")
    if root == UNDEFINED:
        return 0  # no chunk written yet
    rank = len(dims)
    chunk_bytes = math.prod(chunks) * itemsize
    entry = np.dtype([("size", "<u4"), ("mask", "<u4"), ("offset", "<u8", (rank,)), ("child", "<u8")])
    bound = np.array([*shape, 1], np.uint64)
    step = np.array([*chunks, 1], np.uint64)

    leaves = _walk_tree(read, root, 1, entry, 2 * istore_k, file_size, superblock_end)
    if not leaves:
        return 0
    # every chunk checked at once, not node by node (the leaves' bytes joined, then read as one array)
    entries = np.frombuffer(b"".join(raw for _, raw in leaves), entry)
    offsets, children = entries["offset"], entries["child"]
    wrong = ((entries["size"] != chunk_bytes) | (entries["mask"] != 0) | ((offsets % step) != 0).any(axis=1)
             | (offsets >= bound).any(axis=1) | (offsets[:, -1] != 0))
    outside = ((children < superblock_end) | (children > np.uint64(max(file_size - chunk_bytes, 0)))
               if chunk_bytes <= file_size else np.ones(len(entries), bool))
    for bad, what in ((wrong, "a chunk of the wrong size or at a position outside the dataset"),
                      (outside, "a chunk outside the file")):
        if bad.any():
            node = np.repeat([a for a, _ in leaves], [len(raw) // entry.itemsize for _, raw in leaves])[
                int(np.argmax(bad))]
            raise MalformedChunks(f"the chunk B-tree node at byte {int(node):,} lists {what}")
    return len(entries)


def _walk_tree(read: Read, root: int, node_type: int, entry: np.dtype, capacity: int, file_size: int,
               superblock_end: int) -> list[tuple[int, bytes]]:
    """Walk the version-1 B-tree of ``node_type`` (0: a group's, 1: a chunk index) at ``root``, bounded
    (each node once, each child one level below its parent, at most ``capacity`` entries a node, every
    node inside the file, siblings of the same level); ``(address, entries' bytes)`` of each leaf that
    has any (an entry: a key, then the child's address), for the caller to check."""
    what = ("group", "chunk")[node_type]
    node_size = NODE_HEADER + capacity * entry.itemsize + entry.itemsize - 8  # 2K children, 2K + 1 keys
    todo: list[tuple[int, int | None]] = [(root, None)]
    levels: dict[int, int] = {}  # node address -> level
    siblings: list[tuple[int, int, int]] = []  # (level, left, right) of each node
    leaves = []
    while todo:
        address, want = todo.pop()
        if address in levels:
            raise MalformedChunks(f"the {what} B-tree reaches its node at byte {address:,} twice")
        if address < superblock_end or address > file_size - node_size:
            raise MalformedChunks(f"a {what} B-tree node at byte {address:,} lies outside the file")
        if len(levels) * node_size > file_size:
            raise MalformedChunks(f"the {what} B-tree has more nodes than the file holds")
        block = read(address, node_size)
        if len(block) < node_size or block[:4] != b"TREE" or block[4] != node_type:
            raise MalformedChunks(f"no {what} B-tree node at byte {address:,}")
        level, used = block[5], struct.unpack_from("<H", block, 6)[0]
        left, right = struct.unpack_from("<QQ", block, 8)
        if (want is None and level > MAX_LEVEL) or (want is not None and level != want):
            raise MalformedChunks(f"the {what} B-tree node at byte {address:,} is at level {level}"
                                  + (f", its parent's child level is {want}" if want is not None else ""))
        if used > capacity:
            raise MalformedChunks(f"the {what} B-tree node at byte {address:,} holds {used} entries, "
                                  f"room for {capacity}")
        levels[address] = level
        siblings.append((level, left, right))
        if level > 0:
            entries = np.frombuffer(block, entry, count=used, offset=NODE_HEADER)
            todo.extend((child, level - 1) for child in entries["child"].tolist())
        elif used:
            leaves.append((address, block[NODE_HEADER : NODE_HEADER + used * entry.itemsize]))
    for level, left, right in siblings:
        if any(link != UNDEFINED and levels.get(link) != level for link in (left, right)):
            raise MalformedChunks(f"a {what} B-tree sibling link to a node not of its level")
    return leaves


def check_group(gid: Any) -> int:
    """Walk the symbol-table B-tree of the group ``gid`` (an h5py GroupID) before HDF5 looks a name up in
    it: a looped one made HDF5 recurse without end, as a chunk index does. Each leaf's symbol-table
    node ("SNOD") is checked to lie in the file and hold at most its room of entries. Returns how many
    symbol-table nodes there are. Only groups as imgvec writes them (one symbol-table message) pass."""
    import h5py

    fid = h5py.h5i.get_file_id(gid)
    writable = fid.get_intent() & h5py.h5f.ACC_RDWR
    if writable:
        h5py.h5f.flush(fid)
    fd = fid.get_vfd_handle()
    st = os.fstat(fd)
    read, file_size = reader(fd), st.st_size
    header, high = h5py.h5g.get_objinfo(gid).objno
    # A file open read-only is walked once per group (every name looked up asks again); by identity,
    # size and time, so a file changed in place is walked anew.
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, header | high << 64)
    if not writable and key in _GROUPS_WALKED:
        return _GROUPS_WALKED[key]
    found = _check_group(read, file_size, header | high << 64)
    if not writable:
        if len(_GROUPS_WALKED) >= 1024:
            _GROUPS_WALKED.clear()
        _GROUPS_WALKED[key] = found
    return found


_GROUPS_WALKED: dict[tuple[int, ...], int] = {}


def _check_group(read: Read, file_size: int, header: int) -> int:
    superblock_end, _ = _superblock(read)
    leaf_k, internal_k = struct.unpack_from("<HH", read(16, 4))  # the superblock's group K values
    try:
        messages = [(kind, body) for kind, _, body in header_messages(read, header, file_size)
                    if kind in (0x0002, 0x0011)]
    except MalformedHeap as error:
        raise MalformedChunks(str(error)) from None
    tables = [body for kind, body in messages if kind == 0x0011]
    infos = [body for kind, body in messages if kind == 0x0002]
    heap_at = 2 + 8 * (infos[0][1] & 1) if len(infos) == 1 and len(infos[0]) >= 2 else 0
    if not tables and heap_at and len(infos[0]) >= heap_at + 8:  # links kept in the header itself (HDF5 makes
        # such a group of one given an external link): no tree to walk, unless they are in dense storage
        if struct.unpack_from("<Q", infos[0], heap_at)[0] != UNDEFINED:
            raise MalformedChunks("links in dense storage, which imgvec never writes")
        return 0
    if len(tables) != 1 or infos or len(tables[0]) < 16 or not leaf_k or not internal_k:
        raise MalformedChunks("a group not stored as imgvec stores groups (one symbol table)")
    root = struct.unpack_from("<Q", tables[0])[0]
    snod_size = 8 + 2 * leaf_k * 40
    entry = np.dtype([("key", "<u8"), ("child", "<u8")])
    leaves = _walk_tree(read, root, 0, entry, 2 * internal_k, file_size, superblock_end)
    seen: set[int] = set()
    for address, raw in leaves:
        for child in np.frombuffer(raw, entry)["child"].tolist():
            if child in seen or child < superblock_end or child > file_size - snod_size:
                raise MalformedChunks(f"the group B-tree node at byte {address:,} lists a symbol table at byte "
                                      f"{child:,}, outside the file or listed twice")
            seen.add(child)
            head = read(child, 8)
            if head[:4] != b"SNOD" or head[4] != 1 or struct.unpack_from("<H", head, 6)[0] > 2 * leaf_k:
                raise MalformedChunks(f"no symbol table of at most {2 * leaf_k} names at byte {child:,}")
    return len(seen)
