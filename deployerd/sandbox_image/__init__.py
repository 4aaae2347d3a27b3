"""The test-host image: a Debian root filesystem (debootstrap) with systemd, sshd and Docker, built once.

Order at `up`: image already in the engine, else the cached ``docker save | zstd`` tarball, else a build
(minutes, needs the Debian mirror) that is then cached. The tag is a digest of the recipe, so a change to the
packages, the build revision or any helper file in this directory rebuilds. Bump RECIPE_REVISION when the
build steps below change.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from deployerd.sandbox_image._proc import file_lock, logged, pipe, run

log = logging.getLogger("deployerd.sandbox")

IMAGE_REPO = "deployerd-testhost"
IMAGE_DIR = Path(__file__).parent
SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "openssh-server", "python3", "python3-venv", "dbus", "iproute2")
# git: deployerd itself runs on a test host too; python3-docker, rsync: the peers in bench/ (Ansible
# community.docker, rsync); caddy, haproxy: the per-host ingress proxy (zero-downtime switch); docker-registry:
# a Swarm cluster's image registry. Their packaged units are left disabled: deployerd (or the sandbox) runs
# them as its own units where a host is configured for them.
CHROOT_PACKAGES = ("docker.io", "busybox-static", "git", "python3-docker", "rsync", "caddy", "haproxy",
                   "docker-registry", "curl")
DISABLED_UNITS = ("caddy.service", "caddy-api.service", "haproxy.service", "docker-registry.service")
# Bump when the build steps below change in a way the helper files do not show.
RECIPE_REVISION = "3"


def cache_dir() -> Path:
    return Path(os.environ.get("DEPLOYERD_CACHE_DIR") or Path.home() / ".cache" / "deployerd")


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 ``URIs:`` or one-line ``deb`` form)."""
    if env := os.environ.get("DEPLOYERD_DEBIAN_MIRROR"):
        return env
    src = Path("/etc/apt/sources.list.d")
    for f in sorted([*src.glob("*.sources"), *src.glob("*.list"), Path("/etc/apt/sources.list")]):
        with contextlib.suppress(OSError):
            for line in f.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] or words[:1] == ["deb"]:
                    for w in words[1:]:
                        if w.startswith("http") and w.rstrip("/").endswith("/debian"):
                            return w.rstrip("/")
    return "http://deb.debian.org/debian"


def image_version() -> str:
    """A digest of the recipe: packages, build revision and every helper file, so any change rebuilds."""
    h = hashlib.sha256()
    h.update(f"{SUITE}|{','.join(BASE_PACKAGES)}|{','.join(CHROOT_PACKAGES)}|{RECIPE_REVISION}".encode())
    for f in sorted(IMAGE_DIR.iterdir()):
        if f.is_file() and f.suffix != ".py":
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def image_ref() -> str:
    return f"{IMAGE_REPO}:{image_version()}"


async def ensure_image(docker_env: dict[str, str]) -> str:
    """The host image in the engine ``docker_env`` points at: already there, else loaded from the cached
    tarball, else built and cached."""
    ref = image_ref()
    if (await run(["docker", "image", "inspect", ref], env=docker_env, check=False)).rc == 0:
        return ref
    async with file_lock(cache_dir() / "image.lock", "image build"):
        return await _load_or_build(docker_env, ref)


async def _load_or_build(docker_env: dict[str, str], ref: str) -> str:
    if (await run(["docker", "image", "inspect", ref], env=docker_env, check=False)).rc == 0:
        return ref  # another process loaded or built it while we waited
    tarball = cache_dir() / f"{IMAGE_REPO}-{image_version()}.tar.zst"
    if tarball.exists():
        t0 = time.monotonic()
        log.info("loading cached image %s from %s", ref, tarball)
        await pipe(["zstd", "-dc", str(tarball)], ["docker", "load", "-q"], env=docker_env,
                    logfile=cache_dir() / "load.log")
        log.info("image loaded in %.1f s", time.monotonic() - t0)
        return ref
    await build_image(docker_env, ref, tarball)
    return ref


async def build_image(docker_env: dict[str, str], ref: str, tarball: Path) -> None:
    """Build the host image with debootstrap + chroot apt (minutes, needs the mirror) and save it as ``tarball``."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    buildlog = cache_dir() / "build.log"
    work = Path(tempfile.mkdtemp(prefix="deployerd-image-", dir=cache_dir()))
    rootfs = work / "rootfs"
    mirror = debian_mirror()
    t0 = time.monotonic()
    log.info("building host image %s from %s (first time: several minutes; log %s)", ref, mirror, buildlog)
    try:
        await logged(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                       SUITE, str(rootfs), mirror], buildlog)
        log.info("debootstrap done after %.0f s; installing %s in chroot", time.monotonic() - t0,
                 " ".join(CHROOT_PACKAGES))
        await _chroot_install(rootfs, buildlog)
        _configure_rootfs(rootfs)
        log.info("importing root filesystem into the engine")
        await pipe(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                    ["docker", "import", "--change", 'CMD ["/sbin/init"]', "--change", "ENV container=docker",
                     "--change", f"LABEL deployerd.sandbox.image={image_version()}", "-", ref],
                    env=docker_env, logfile=buildlog)
        log.info("saving image to %s", tarball)
        partial = work / "image.tar.zst"
        await pipe(["docker", "save", ref], ["zstd", "-3", "-T2", "-q", "-f", "-o", str(partial)],
                    env=docker_env, logfile=buildlog)
        partial.rename(tarball)
        for stale in tarball.parent.glob(f"{IMAGE_REPO}-*.tar.zst"):
            if stale != tarball:  # an older recipe's image: never loaded again
                stale.unlink(missing_ok=True)
        log.info("host image built and cached in %.0f s", time.monotonic() - t0)
    finally:
        await run(["rm", "-rf", "--one-file-system", str(work)], check=False)


async def _chroot_install(rootfs: Path, buildlog: Path) -> None:
    """apt-get inside the chroot, with proc/sys/dev mounted and always unmounted again."""
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # no service starts inside the chroot
    policy.chmod(0o755)
    shutil.copyfile("/etc/resolv.conf", rootfs / "etc/resolv.conf")
    mounts = [(["-t", "proc", "proc"], "proc"), (["-t", "sysfs", "sys"], "sys"),
              (["--bind", "/dev"], "dev"), (["--bind", "/dev/pts"], "dev/pts")]
    done: list[Path] = []
    try:
        for args, where in mounts:
            target = rootfs / where
            await run(["mount", *args, str(target)])
            done.append(target)
        await logged(["chroot", str(rootfs), "apt-get", "update"], buildlog)
        await logged(["chroot", str(rootfs), "apt-get", "install", "-y", "--no-install-recommends",
                       *CHROOT_PACKAGES], buildlog)
        await logged(["chroot", str(rootfs), "apt-get", "clean"], buildlog)
    finally:
        for target in reversed(done):
            if (await run(["umount", str(target)], check=False)).rc != 0:
                await run(["umount", "-l", str(target)], check=False)
        policy.unlink(missing_ok=True)


def _configure_rootfs(rootfs: Path) -> None:
    """Put the helper files in place and strip what must be unique per host (host keys, machine-id)."""
    files = {
        "daemon.json": ("etc/docker/daemon.json", 0o644),
        "busybox-image.sh": ("usr/local/sbin/deployerd-busybox-image", 0o755),
        "deployerd-busybox-image.service": ("etc/systemd/system/deployerd-busybox-image.service", 0o644),
        "deployerd-ssh-keygen.service": ("etc/systemd/system/deployerd-ssh-keygen.service", 0o644),
        "sshd-deployerd.conf": ("etc/ssh/sshd_config.d/deployerd.conf", 0o644),
    }
    for name, (dest, mode) in files.items():
        target = rootfs / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(IMAGE_DIR / name, target)
        target.chmod(mode)
    # Enable units the way `systemctl enable` would (symlinks into the .wants dirs named by [Install]).
    wants = {"deployerd-busybox-image.service": ["multi-user.target"],
             "deployerd-ssh-keygen.service": ["multi-user.target", "ssh.service"]}
    for unit, targets in wants.items():
        for t in targets:
            d = rootfs / "etc/systemd/system" / f"{t}.wants"
            d.mkdir(parents=True, exist_ok=True)
            link = d / unit
            link.unlink(missing_ok=True)
            link.symlink_to(f"/etc/systemd/system/{unit}")
    # The packages' postinst enabled them. Their links point into the chroot (/lib/systemd/...), so seen from
    # here they dangle, and Path.glob skips dangling links: look at each .wants folder's entry itself.
    for folder in (rootfs / "etc/systemd/system").glob("*.wants"):
        for unit in DISABLED_UNITS:
            if (folder / unit).is_symlink():
                (folder / unit).unlink()
    for link in (rootfs / "etc").glob("rc?.d/[SK][0-9][0-9]*"):  # their SysV scripts' runlevel links too
        if link.name[3:] in {u.removesuffix(".service") for u in DISABLED_UNITS}:
            link.unlink()
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for sub in ("var/lib/apt/lists", "var/cache/apt/archives", "var/log/apt"):
        for child in (rootfs / sub).glob("*"):
            if child.is_file() or child.is_symlink():
                child.unlink()
    (rootfs / "etc/resolv.conf").write_text("")
    root_ssh = rootfs / "root/.ssh"
    root_ssh.mkdir(mode=0o700, exist_ok=True)
