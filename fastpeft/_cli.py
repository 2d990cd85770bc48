"""What the command lines share (``fastpeft train``, ``fastpeft demo``, ``fastpeft bench``): argparse types that refuse
a bad value when the options are parsed, naming the option, and output files written whole or not at all.

An output path is checked with the options (``output_file``: its folder exists and is writable), not after a run
of minutes; the files themselves are written to a temporary name beside the target and renamed over it
(``write_text_atomic``, ``save_figure_atomic``), so a run killed mid-write or a full disk leaves the previous file,
never a truncated one, and no temporary behind.
"""
from __future__ import annotations

import argparse
import os


def positive_int(s):
    """An argparse ``type``: the option's value as an int, refused unless > 0 (tokens, ranks, steps, sizes)."""
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {s}")
    return v


def non_negative_int(s):
    """An argparse ``type``: an int >= 0 (a count where 0 means none)."""
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {s}")
    return v


def positive_float(s):
    """An argparse ``type``: a float, refused unless > 0 (a learning rate, a time limit, a timing budget)."""
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def non_negative_float(s):
    """An argparse ``type``: a float >= 0 (a warm-up time)."""
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def rate(s):
    """An argparse ``type``: a dropout rate in [0, 1)."""
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def fraction(s):
    """An argparse ``type``: a share in (0, 1] (a sparse delta's density)."""
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a fraction, 0.01 = 1 %), got {s}")
    return v


def kxn(s):
    """An argparse ``type``: ``"4096x11008"`` -> (4096, 11008), a (K, N) = (in, out) pair of positive ints."""
    parts = s.lower().split("x")
    try:
        k, n = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be KxN, two positive ints (in x out) like 4096x4096, got {s!r}"
                                         ) from None
    if k <= 0 or n <= 0:
        raise argparse.ArgumentTypeError(f"must be KxN with K and N positive, got {s!r}")
    return k, n


def output_file(s):
    """An argparse ``type``: a path to write a file to, checked before any work: its folder exists and is
    writable, and the path is not a folder. The file itself is written at the end (``write_text_atomic``)."""
    folder = os.path.dirname(os.path.abspath(s))
    if os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s!r} is a folder; give a file path")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder!r} of {s!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into the folder {folder!r} of {s!r}")
    return s


def _temporary(path: str) -> str:
    """A temporary name beside ``path``, with its extension (matplotlib reads the format from it)."""
    root, ext = os.path.splitext(path)
    return f"{root}.tmp{os.getpid()}{ext}"


def _replace(tmp: str, path: str, write) -> None:
    """``write(tmp)``, then ``tmp`` renamed over ``path``; on any failure the temporary is removed."""
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """``text`` into ``path`` whole: written beside it, then renamed over it."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _replace(_temporary(path), path, write)


def save_figure_atomic(fig, path: str, **kwargs) -> None:
    """``fig.savefig(path, **kwargs)`` whole: saved beside it, then renamed over it."""
    _replace(_temporary(path), path, lambda tmp: fig.savefig(tmp, **kwargs))
