"""One line for an OSError of prepare, train.py or eval.py (the path, what went wrong and what to do about it), and
for a file that torch.load refused."""

from __future__ import annotations

import errno
import pickle
import re


RESUME_RETRY = "continue with --resume auto"  # how a training run carries on once the cause is fixed


def print_line(text: str) -> None:
    """`text` and its newline to stderr in one write. Python's stderr writes through, so print() would make two
    writes, and the lines of ranks that fail together (they share torchrun's stderr) would run into each other."""
    import sys

    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def error_line(e: BaseException, retry: str) -> str:
    """One line for any error: `describe_os_error` for an OSError, else the error's own message."""
    return describe_os_error(e, retry) if isinstance(e, OSError) else str(e)


def describe_os_error(e: OSError, retry: str, what: str = "") -> str:
    """'<path>: <what went wrong>; <what to do>', where `retry` says how to carry on once the cause is fixed
    (e.g. 'continue with --resume auto'). The path is the error's own (our writers set it on failed writes);
    `what` replaces '<path>: <what went wrong>' with '<what> (<what went wrong>)'."""
    if what:
        return f"{what} ({e.strerror or e}); {_advice(e, retry)}"
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; {_advice(e, retry)}"


def _advice(e: OSError, retry: str) -> str:
    advice = {errno.ENOSPC: f"the disk is full: free some space, then {retry}",
              errno.EDQUOT: f"the disk quota is exhausted: free some space, then {retry}",
              errno.EROFS: "the filesystem is read-only: choose a folder on a writable one",
              errno.EACCES: "permission denied: choose another folder, or fix its permissions",
              errno.EPERM: "operation not permitted: choose another folder, or fix its permissions",
              errno.ENOTDIR: "a part of this path is a file, not a folder: check the path",
              errno.EISDIR: "this is a folder, not a file: check the path",
              errno.EEXIST: "something else already has this name: check the path",
              errno.EIO: f"an I/O error: check the disk, then {retry}"}
    return advice.get(e.errno, f"check the path, then {retry}")


def torch_load_error(path, e: BaseException, expected: str, advice: str) -> str:
    """One line for a file that `torch.load(..., weights_only=True)` refused. Pickled code is named as such, and
    torch's own text is never quoted where it advises `weights_only=False` (that would run the code in the file,
    and torch says it even for a file that is not a PyTorch file at all)."""
    text = str(e)
    code = re.search(r"GLOBAL ([\w.]+)", text)
    if code:
        return (f"{path}: refused: the file holds pickled Python code ({code.group(1)}), not only tensors: "
                f"{expected} never does, and stenvan never runs code from a file; {advice}")
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in text or "mmap can only be used" in text:
        detail = "not a PyTorch file, or a damaged one"  # (torch's own text advises unsafe or useless steps)
    else:
        detail = f"{type(e).__name__}: {(text.strip().splitlines() or [''])[0][:200]}"
    return f"{path}: cannot be loaded as {expected} ({detail}); {advice}"
