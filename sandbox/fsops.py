"""File operations that run *inside* the container, as the agent's user, stdlib only.

The host sends this file's source with `python3 -I -S -c` (so it always matches the host's
version and never depends on files the agent could replace). Every path is walked one component
at a time with O_NOFOLLOW from an fd of the workspace root; a symlink is followed only after its
target is checked to stay inside the workspace. That makes the check and the use the same
operation, so an agent cannot swap a directory for a symlink between them.

Protocol: argv = [op, workspace, relpath, max_bytes]; file content on stdin/stdout; on refusal
exit 3 with a one-line message on stderr (exit 4: not found, 5: too large).
"""

import contextlib
import json
import os
import posixpath
import stat
import sys

MAX_SYMLINK_HOPS = 40


class Refused(Exception):
    code = 3


class NotFound(Refused):
    code = 4


class TooLarge(Refused):
    code = 5


def _split(rel):
    return [p for p in rel.split("/") if p not in ("", ".")]


def _open_verified(name, dir_fd, expected, flags):
    """open() that refuses to land anywhere but the inode lstat saw.

    O_NOFOLLOW alone is not enough: gVisor (runsc 2024) follows a symlink given O_DIRECTORY|O_NOFOLLOW,
    and an agent can swap an entry between our lstat and our open. Comparing (dev, inode) catches both.
    """
    fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
        os.close(fd)
        raise Refused(f"{name} changed while it was being opened (symlink swap?)")
    return fd


def _resolve(root_fd, parts, create_dirs):
    """Walk `parts` below root_fd with every symlink resolved and kept inside the root.

    Returns (dir_fd, last_name, open_parent_fds); last_name is "." when parts name the root itself.
    """
    hops = 0
    stack = []  # open directory fds, stack[-1] is the current directory's parent
    names = []  # the logical path walked so far (for messages)
    fd = os.dup(root_fd)
    todo = list(parts)
    try:
        while todo:
            name = todo.pop(0)
            if name == "..":
                if not stack:
                    raise Refused("path leaves the workspace")
                os.close(fd)
                fd = stack.pop()
                names.pop()
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not todo:
                    return fd, name, stack
                if not create_dirs:
                    raise NotFound("no such file or directory: " + "/".join(names + [name]))
                os.mkdir(name, 0o755, dir_fd=fd)
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise Refused("too many levels of symbolic links")
                target = os.readlink(name, dir_fd=fd)
                shown = "/".join(names + [name])
                if target.startswith("/"):
                    # Absolute targets are judged against the workspace's own absolute path.
                    rel = posixpath.relpath(posixpath.normpath(target), WORKSPACE)
                    if rel == ".." or rel.startswith("../"):
                        raise Refused(f"symlink {shown} -> {target} leaves the workspace")
                    while stack:
                        os.close(fd)
                        fd = stack.pop()
                    names = []
                    todo = _split(rel) + todo
                else:
                    # Relative targets resolve from the link's directory; '..' above the root is refused.
                    todo = _split(target) + todo
                continue
            if not todo:
                return fd, name, stack
            if not stat.S_ISDIR(st.st_mode):
                raise NotFound("not a directory: " + "/".join(names + [name]))
            child = _open_verified(name, fd, st, os.O_RDONLY | os.O_DIRECTORY)
            stack.append(fd)
            names.append(name)
            fd = child
        return fd, ".", stack
    except BaseException:
        _close(fd, stack)
        raise


def _open_root():
    try:
        return os.open(WORKSPACE, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise Refused(f"workspace {WORKSPACE} is not a directory ({exc.strerror})")


def _close(fd, stack):
    os.close(fd)
    for f in stack:
        os.close(f)


@contextlib.contextmanager
def _lookup(rel, create_dirs=False):
    """(parent dir fd, final name, lstat of the final entry or None if it does not exist); the directory
    fds the walk opened stay open for the block and are closed after it."""
    root = _open_root()
    try:
        fd, name, stack = _resolve(root, _split(rel), create_dirs)
    finally:
        os.close(root)
    try:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        yield fd, name, st
    finally:
        _close(fd, stack)


def _refuse_missing_or_dir(st, rel):
    """Refuse a read or delete of an entry that does not exist or is a directory."""
    if st is None:
        raise NotFound(f"no such file: {rel}")
    if stat.S_ISDIR(st.st_mode):
        raise Refused(f"is a directory: {rel}")


def op_read(rel, max_bytes):
    with _lookup(rel) as (fd, name, st):
        _refuse_missing_or_dir(st, rel)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"not a regular file: {rel}")  # FIFOs and devices could block or never end
        if st.st_size > max_bytes:
            raise TooLarge(f"{rel} is {st.st_size} bytes, over the {max_bytes}-byte limit")
        f = _open_verified(name, fd, st, os.O_RDONLY | os.O_NONBLOCK)
        try:
            out = sys.stdout.buffer
            remaining = max_bytes + 1
            while chunk := os.read(f, min(1 << 20, remaining)):
                remaining -= len(chunk)
                if remaining <= 0:
                    raise TooLarge(f"{rel} grew past the {max_bytes}-byte limit while being read")
                out.write(chunk)
            out.flush()
        finally:
            os.close(f)


def op_write(rel, max_bytes):
    if not _split(rel):
        raise Refused("cannot write to the workspace root itself")
    data = sys.stdin.buffer.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f"content is over the {max_bytes}-byte limit")
    with _lookup(rel, create_dirs=True) as (fd, name, st):
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise Refused(f"is a directory: {rel}")
        mode = stat.S_IMODE(st.st_mode) if st is not None else 0o644
        # Write a sibling temp file and rename over: readers never see a half-written file. In a directory
        # the user may not write (a writable file in a root-owned directory), rewrite the file in place.
        tmp = f".{name}.labrat-{os.getpid()}"
        try:
            f = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=fd)
        except PermissionError:
            if st is None:
                raise Refused(f"permission denied: cannot create {rel}") from None
            try:
                f = _open_verified(name, fd, st, os.O_WRONLY | os.O_TRUNC)
            except PermissionError:
                raise Refused(f"permission denied: {rel} is read-only") from None
            tmp = None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(f, view):]
            if tmp:
                os.fchmod(f, mode)
        finally:
            os.close(f)
        if tmp:
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)


def op_list(rel, max_entries):
    with _lookup(rel) as (fd, name, st):
        if st is None:
            raise NotFound(f"no such directory: {rel}")
        if not stat.S_ISDIR(st.st_mode):
            raise Refused(f"not a directory: {rel}")
        d = _open_verified(name, fd, st, os.O_RDONLY | os.O_DIRECTORY)
        try:
            entries = []
            for entry_name in sorted(os.listdir(d))[:max_entries]:
                st = os.stat(entry_name, dir_fd=d, follow_symlinks=False)
                kind = (
                    "dir" if stat.S_ISDIR(st.st_mode)
                    else "file" if stat.S_ISREG(st.st_mode)
                    else "symlink" if stat.S_ISLNK(st.st_mode)
                    else "other"
                )
                entries.append({"name": entry_name, "kind": kind, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode)})
            sys.stdout.write(json.dumps(entries))
        finally:
            os.close(d)


def op_delete(rel, _limit):
    with _lookup(rel) as (fd, name, st):
        _refuse_missing_or_dir(st, rel)
        try:
            os.unlink(name, dir_fd=fd)  # removes a symlink itself, never its target
        except PermissionError:
            raise Refused(f"permission denied: cannot delete {rel}") from None


def op_manifest(rel, max_entries):
    """Every regular file below rel: path, size and sha256 (for files up to MANIFEST_HASH_BYTES; the
    hashed total is capped too). Walks with directory fds and never follows a symlink."""
    import hashlib

    entries, hashed = [], 0
    with _lookup(rel) as (fd, name, st):
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise NotFound(f"no such directory: {rel}")
        top = _open_verified(name, fd, st, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                dirnames.sort()
                for entry_name in sorted(filenames):
                    st = os.stat(entry_name, dir_fd=dirfd, follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    digest = None
                    if st.st_size <= MANIFEST_HASH_BYTES and hashed + st.st_size <= MANIFEST_TOTAL_BYTES:
                        f = _open_verified(entry_name, dirfd, st, os.O_RDONLY | os.O_NONBLOCK)
                        try:
                            digest = hashlib.sha256(os.read(f, st.st_size + 1)).hexdigest()
                        finally:
                            os.close(f)
                        hashed += st.st_size
                    entries.append({"path": posixpath.normpath(posixpath.join(dirpath, entry_name)),
                                    "size": st.st_size, "sha256": digest})
                    if len(entries) >= max_entries:
                        raise TooLarge(f"more than {max_entries} files below {rel}")
            sys.stdout.write(json.dumps(entries))
        except RecursionError:  # os.fwalk recurses once per level: a directory chain ~1000 deep exhausts it
            raise TooLarge(f"directories below {rel} are nested too deep to walk (about {sys.getrecursionlimit()} "
                           "levels or more)") from None
        finally:
            os.close(top)


def op_pack(rel, max_bytes):
    """A tar stream on stdout of the regular files below rel (symlinks, devices and FIFOs left out, never
    followed), names relative to rel; refused once the files' bytes pass max_bytes."""
    import tarfile

    total = 0
    with _lookup(rel) as (fd, name, st):
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise NotFound(f"no such directory: {rel}")
        top = _open_verified(name, fd, st, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                    dirnames.sort()
                    for entry_name in sorted(filenames):
                        st = os.stat(entry_name, dir_fd=dirfd, follow_symlinks=False)
                        if not stat.S_ISREG(st.st_mode):
                            continue
                        total += st.st_size
                        if total > max_bytes:
                            raise TooLarge(f"the files below {rel} are over the {max_bytes}-byte limit")
                        info = tarfile.TarInfo(posixpath.normpath(posixpath.join(dirpath, entry_name)))
                        info.size, info.mode, info.mtime = st.st_size, stat.S_IMODE(st.st_mode) & 0o755, int(st.st_mtime)
                        f = _open_verified(entry_name, dirfd, st, os.O_RDONLY | os.O_NONBLOCK)
                        with os.fdopen(f, "rb") as source:
                            tar.addfile(info, source)
        except RecursionError:
            raise TooLarge(f"directories below {rel} are nested too deep to pack") from None
        finally:
            os.close(top)


def op_unpack(rel, max_bytes):
    """Extract a tar stream from stdin below rel: regular files only (each created new, never over an existing
    entry), names confined to rel; anything else (links, devices, absolute or '..' names) is skipped."""
    import tarfile

    total = skipped = 0
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
        for member in tar:
            parts = _split(member.name)
            if not member.isreg() or not parts or ".." in parts or member.name.startswith("/"):
                skipped += not member.isdir()
                continue
            total += member.size
            if total > max_bytes:
                raise TooLarge(f"the archive is over the {max_bytes}-byte limit")
            with _lookup("/".join(_split(rel) + parts), create_dirs=True) as (fd, name, st):
                if st is not None:
                    skipped += 1
                    continue
                f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, member.mode & 0o755, dir_fd=fd)
                with os.fdopen(f, "wb") as out, tar.extractfile(member) as source:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
    sys.stdout.write(json.dumps({"bytes": total, "skipped": skipped}))


MANIFEST_HASH_BYTES = 1024 * 1024
MANIFEST_TOTAL_BYTES = 64 * 1024 * 1024
OPS = {"read": op_read, "write": op_write, "list": op_list, "delete": op_delete, "manifest": op_manifest,
       "pack": op_pack, "unpack": op_unpack}

if __name__ == "__main__":
    op, WORKSPACE, relpath, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    try:
        OPS[op](relpath, limit)
    except Refused as exc:
        sys.stderr.write(str(exc).replace("\n", " ") + "\n")
        sys.exit(exc.code)
    except OSError as exc:
        sys.stderr.write(f"{exc.strerror or exc}: {relpath}\n")
        sys.exit(3)
