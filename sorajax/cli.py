"""Shared command-line plumbing: bad input -> one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import jax

from sorajax.errors import RunFailed, UserError


class Parser(argparse.ArgumentParser):
    """argparse with the command contract's bad-input answer: one `error:` line, exit 2."""

    def error(self, message):
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "sorajax", "xla")


def use_compilation_cache(env=os.environ) -> str:
    """Turns JAX's persistent compilation cache on for the commands, so that a second `sample`,
    `evaluate` or resumed `train` of the same shapes loads its programs instead of recompiling
    them: JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/sorajax/xla; SORAJAX_COMPILATION_CACHE=0
    leaves it off. Returns the directory in use ("" when off)."""
    if env.get("SORAJAX_COMPILATION_CACHE", "1") == "0":
        return ""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(DEFAULT_COMPILATION_CACHE))
    return jax.config.jax_compilation_cache_dir


def run(fn, argv=None) -> int:
    """Calls fn(argv); maps UserError to `error: ...` + exit 2, RunFailed to exit 1 and Ctrl-C to
    exit 130. The persistent compilation cache is on (use_compilation_cache)."""
    level = os.environ.get("SORAJAX_LOGLEVEL", "WARNING")
    logging.basicConfig(level=level,
                        format="%(levelname)s %(name)s: %(message)s")
    use_compilation_cache()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return int(fn(argv) or 0)
    except UserError as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2
    except RunFailed as e:  # e.g. training stopped on repeated non-finite steps
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def check_writable_output(path: str, exts: tuple[str, ...], flag: str) -> None:
    """Raises UserError unless `path` has one of `exts` and its directory exists and is writable."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in exts:
        raise UserError(f"{flag} {path!r}: unsupported extension {ext or '(none)'!r}; use one of {', '.join(exts)}")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UserError(f"{flag} {path!r}: directory {d!r} does not exist")
    if not os.access(d, os.W_OK):
        raise UserError(f"{flag} {path!r}: directory {d!r} is not writable")
    probe_writable_dir(d, f"{flag} {path!r}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r}: is a directory")


def probe_writable_dir(d: str, what: str) -> None:
    """Creates and removes a temporary file in `d`: os.access says yes to root on read-only
    or pseudo file systems (/proc, a read-only mount) where creating the output would fail
    only after all the work is done."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".sorajax-probe-", dir=d)
    except OSError as e:
        raise UserError(f"{what}: cannot create files in {d!r} ({e.strerror or e})") from None
    os.close(fd)
    os.remove(tmp)
