"""A real ext4 file system on a loop device, made by the test, for storage faults.

``Ext4`` makes an image in the test's tmp dir, mounts it (``errors=remount-ro``) and
can then: make the kernel turn it read-only under open files (ext4's
``trigger_fs_error``, as a real I/O or metadata error would), freeze it so every
write blocks (``fsfreeze``), and repair it the way an operator must (unmount,
``e2fsck -fy``, mount again). Needs root (CI runs as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


class Ext4:
    def __init__(self, workdir: Path, size_mb: int = 64) -> None:
        missing = [t for t in ("mkfs.ext4", "e2fsck", "fsfreeze", "mount", "umount") if shutil.which(t) is None]
        if os.geteuid() != 0 or missing:
            pytest.skip(f"needs root and {', '.join(missing) or 'e2fsprogs/util-linux'} to loop-mount an ext4 "
                        "image (CI runs as root on Debian, where both are installed)")
        self.image = workdir / "ext4.img"
        self.mnt = workdir / "disk"
        self.mnt.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(size_mb << 20)
        r = _run("mkfs.ext4", "-q", "-F", str(self.image))
        assert r.returncode == 0, r.stderr
        self.frozen = False
        self.mounted = False
        self.mount()

    def mount(self) -> None:
        r = _run("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mnt))
        if r.returncode != 0:
            pytest.skip(f"cannot loop-mount an ext4 image here (no loop device?): {r.stderr.strip()}")
        self.mounted = True
        self.device = _run("findmnt", "-no", "SOURCE", str(self.mnt)).stdout.strip()

    def options(self) -> list[str]:
        return _run("findmnt", "-no", "OPTIONS", str(self.mnt)).stdout.strip().split(",")

    def read_only(self) -> bool:
        """Mounted ro, or (Linux 6.x) still listed rw but flagged ``emergency_ro`` after an error."""
        opts = self.options()
        return "ro" in opts or "emergency_ro" in opts

    def trigger_error(self) -> None:
        """What a failing disk does to ext4: an error, the journal aborted, the file system
        remounted read-only under every open file (``errors=remount-ro``)."""
        knob = Path("/sys/fs/ext4") / os.path.basename(self.device) / "trigger_fs_error"
        if not knob.exists():
            pytest.skip(f"this kernel has no {knob} to inject an ext4 error")
        knob.write_text("shardlog fault test: injected error\n")

    def freeze(self) -> None:
        r = _run("fsfreeze", "-f", str(self.mnt))
        assert r.returncode == 0, r.stderr
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            r = _run("fsfreeze", "-u", str(self.mnt))
            assert r.returncode == 0, r.stderr
            self.frozen = False

    def umount(self) -> None:
        r = _run("umount", str(self.mnt))
        assert r.returncode == 0, f"umount: {r.stderr} (a process still holds files on it?)"
        self.mounted = False

    def repair(self) -> str:
        """Unmount, e2fsck -fy, mount again read-write (ext4 refuses ``remount,rw`` after
        an error until it has been checked). Returns e2fsck's summary."""
        self.umount()
        r = _run("e2fsck", "-fy", str(self.image))
        assert r.returncode in (0, 1), f"e2fsck exit {r.returncode}: {r.stdout}{r.stderr}"
        self.mount()
        assert not self.read_only()
        return r.stdout

    def cleanup(self) -> None:
        self.thaw()
        if self.mounted:
            if _run("umount", str(self.mnt)).returncode != 0:
                _run("umount", "-l", str(self.mnt))  # a process of the test still holds it
            self.mounted = False
