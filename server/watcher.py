"""Hot loading: watch the patch directory and the tenant file, and apply changes without a restart.

A new or changed ``*.safetensors`` file, or OMS bundle beside one (``*.safetensors.sig``), is verified
and published (or refused with its reason, the previous version serving on); a removed file is unloaded
unless a tenant's default stack needs it; a changed tenant file is validated and swapped in whole, or
refused. Built on ``watchfiles`` (inotify, or polling for network volumes).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from watchfiles import Change, awatch  # noqa: F401 - Change: the type of a batch's entries

from patches.oms import patch_of_bundle
from server.control import ControlPlane

log = logging.getLogger(__name__)

# Kubernetes updates a mounted ConfigMap by swapping this symlink, not the file itself.
_CONFIGMAP_SWAP = "..data"
# With no change, the watch wakes this often (the first wake-up starts the catch-up rescan).
_IDLE_MS = 500


class PatchWatcher:
    """Turns file-system changes into control-plane changes.

    Args:
        control: Applies every change (the one writer).
    """

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.patch_dir = control.patch_dir.resolve()
        self.tenants_file = control.tenants_file.resolve()
        rev = control.revocations_file if control.verifier is not None else None
        self.revocations_file = rev.resolve() if rev else None

    def relevant(self, _change: Change, raw: str) -> bool:
        """Only our files: patch files, the tenant file, the revocation list (and ConfigMap swaps)."""
        path = Path(raw)
        if path.parent == self.patch_dir:  # an OMS bundle (x.safetensors.sig) counts as its patch file
            return (patch_of_bundle(path) or path).suffix == ".safetensors" and not path.name.startswith(".")
        names = {_CONFIGMAP_SWAP}
        for watched in (self.tenants_file, self.revocations_file):
            if watched is not None and path.parent == watched.parent:
                names.add(watched.name)
        return path.name in names

    def apply(self, changes: set[tuple[Change, str]]) -> None:
        """Apply one batch of changes (blocking; run it in a thread)."""
        reload_tenants = reload_revocations = False
        for _change, raw in sorted(changes, key=lambda c: c[1]):
            path = Path(raw)
            if path.parent == self.patch_dir:
                path = patch_of_bundle(path) or path  # a changed OMS bundle is a change of its patch
            if path.parent == self.tenants_file.parent and path.name in (self.tenants_file.name, _CONFIGMAP_SWAP):
                reload_tenants = True
            rev = self.revocations_file
            if rev is not None and path.parent == rev.parent and path.name in (rev.name, _CONFIGMAP_SWAP):
                reload_revocations = True
            if path.parent == self.patch_dir and path.suffix == ".safetensors" and not path.name.startswith("."):
                self.control.file_changed(path)
        if reload_revocations:
            self.control.reload_revocations()
        if reload_tenants:
            self.control.reload_tenants()

    async def run(self, stop: asyncio.Event, *, polling: bool = False) -> None:
        """Watch until ``stop`` is set. Changes missed while this was not running (start-up, a crash
        before a restart by the supervisor) are caught up by a rescan once the watch is live, so none
        falls between the two: the first batch (or timeout) arrives only after the watch is set up."""
        dirs = {self.patch_dir, self.tenants_file.parent}
        if self.revocations_file is not None:
            dirs.add(self.revocations_file.parent)
        paths = sorted(str(d) for d in dirs if d.is_dir())
        caught_up = False
        async for changes in awatch(
            *paths,
            watch_filter=self.relevant,
            stop_event=stop,
            debounce=50,
            step=10,
            recursive=False,
            force_polling=polling,
            poll_delay_ms=100,
            rust_timeout=_IDLE_MS,
            yield_on_timeout=True,
        ):
            if not caught_up:
                await asyncio.to_thread(self.rescan)
                caught_up = True
            if changes:
                await asyncio.to_thread(self.apply, changes)

    def rescan(self) -> None:
        """Bring memory in line with the patch directory: load new or changed files (a file read before
        with the same identity is not verified again), unload vanished sources, reload the tenant file
        and the revocation list."""
        if self.revocations_file is not None:
            self.control.reload_revocations()
        present = {p.name for p in self.patch_dir.glob("*.safetensors") if not p.name.startswith(".")}
        loaded = {e.source for e in self.control.registry.entries() if e.source.endswith(".safetensors")}
        for name in sorted(present | loaded):
            self.control.file_changed(self.patch_dir / name, only_if_new=True)
        self.control.reload_tenants()
