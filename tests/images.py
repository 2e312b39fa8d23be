"""Real image files for tests, made with qemu-img."""

import subprocess


def qcow2(path, backing=None, backing_fmt="qcow2", size="64M"):
    """A qcow2 file at ``path``; with ``backing``, an overlay whose header names
    it as written (relative or not, not checked: ``-u``). Returns the path."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-u", "-F", backing_fmt, "-b", str(backing)]
    subprocess.run([*cmd, str(path), size], check=True)
    return str(path)
