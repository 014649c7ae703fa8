"""User-facing errors. CLIs print `error: <message>` on one line and exit with code 2."""


class UserError(Exception):
    """Bad input from the user (flags, files, configs): one line, exit code 2."""


class WeightsMismatch(UserError):
    """A checkpoint's tensors do not match the model: lists what is missing/unexpected/misshapen."""

    def __init__(self, what, missing=(), unexpected=(), shape_mismatch=()):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.shape_mismatch = list(shape_mismatch)
        parts = []
        if self.missing:
            parts.append(f"missing keys {self.missing[:20]}" + (" ..." if len(self.missing) > 20 else ""))
        if self.unexpected:
            parts.append(f"unexpected keys {self.unexpected[:20]}" + (" ..." if len(self.unexpected) > 20 else ""))
        if self.shape_mismatch:
            parts.append(f"shape mismatches {self.shape_mismatch[:20]}")
        super().__init__(f"{what}: " + "; ".join(parts))


class RunFailed(Exception):
    """A run that cannot finish as asked (repeated non-finite steps, end-of-training sampling
    that failed): one line, exit code 1. Its checkpoints are kept."""
