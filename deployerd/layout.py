"""Where a service's files live on a host: one value that transfer, the runtimes, retention and locks share.

Under ``<base_dir>/<qualified name>``::

    releases/<release>/              the transferred source (Transfer; complete once renamed into place)
    releases/<release>.partial/      a transfer in progress (renamed to ``<release>`` at its end)
    releases/<release>.manifest.json written last: the release dir is complete
    env/<release>.env                the release's environment (0600 in a 0700 dir, outside any build context)
    venvs/<release>                  systemd: a link to the release's environment in ``pyenvs/``
    pyenvs/<key>/                    systemd: a venv keyed by the digest of what it depends on (requirements,
                                     wheels, the host's Python), shared by releases that share them
    current -> releases/<release>    systemd: the unit's WorkingDirectory, switched atomically
    data/                            systemd: the only path the service may write
    .build.lock                      systemd: held by every step that writes a venv

Pure: no I/O, same input, same paths.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

RELEASE_SUFFIXES = (".manifest.json", ".partial", ".env")


@dataclass(frozen=True)
class Layout:
    """The on-host paths of one service (``base_dir`` from hosts.yaml, ``name`` its qualified name)."""

    base_dir: str
    name: str

    @property
    def service_dir(self) -> str:
        return posixpath.join(self.base_dir, self.name)

    def _in(self, *parts: str) -> str:
        return posixpath.join(self.service_dir, *parts)

    @property
    def releases_dir(self) -> str:
        return self._in("releases")

    def release_dir(self, release: str) -> str:
        return self._in("releases", release)

    def partial_dir(self, release: str) -> str:
        return self._in("releases", f"{release}.partial")

    def manifest(self, release: str) -> str:
        return self._in("releases", f"{release}.manifest.json")

    @property
    def env_dir(self) -> str:
        return self._in("env")

    def env_file(self, release: str) -> str:
        """Outside the release dir, so a Dockerfile's ``COPY .`` can never bake secrets into an image."""
        return self._in("env", f"{release}.env")

    @property
    def venvs_dir(self) -> str:
        return self._in("venvs")

    def venv(self, release: str) -> str:
        """The path a release's unit names for its venv (a link into ``pyenvs/``)."""
        return self._in("venvs", release)

    @property
    def pyenvs_dir(self) -> str:
        return self._in("pyenvs")

    def pyenv(self, key: str) -> str:
        """The real venv for one set of dependencies (``key``: their digest)."""
        return self._in("pyenvs", key)

    @property
    def current(self) -> str:
        return self._in("current")

    @property
    def data_dir(self) -> str:
        return self._in("data")

    @property
    def build_lock(self) -> str:
        return self._in(".build.lock")

    def release_paths(self, release: str) -> list[str]:
        """Every path one release owns (its venv link, not the shared venv it points at)."""
        return [self.release_dir(release), self.partial_dir(release), self.manifest(release),
                self.venv(release), self.env_file(release)]

    @property
    def release_folders(self) -> list[str]:
        """The folders whose entries name releases (``release_id`` reads them back)."""
        return [self.releases_dir, self.venvs_dir]

    @property
    def written_folders(self) -> list[str]:
        """The folders deployerd writes files into atomically (where a killed write leaves a temp file)."""
        return [self.service_dir, self.releases_dir, self.env_dir]


def release_id(entry: str) -> str:
    """The release an entry of ``releases/``, ``venvs/`` or ``env/`` belongs to."""
    for suffix in RELEASE_SUFFIXES:
        entry = entry.removesuffix(suffix)
    return entry
